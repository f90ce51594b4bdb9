"""Reading sharded parameters and gradients for the trackers: DeepSpeed ZeRO-3 and FSDP2.

Under ZeRO-3 a parameter holds only an empty placeholder (its values are partitioned across the
processes, ``p.ds_tensor`` is this rank's piece); under FSDP2 (``fully_shard``) it is a DTensor
whose local tensor is a row shard. The trackers never gather the whole model: they walk the
modules they measure one at a time, and only at snapshot steps,

- :func:`gathered` makes the full values of a few parameters readable on every rank for the
  duration of a ``with`` block (DeepSpeed's ``GatheredParameters``, DTensor ``full_tensor()``),
  a collective that every rank enters in the same order;
- :func:`resolve` is what :mod:`perl.trackers.discovery` reads a parameter through: the gathered
  full tensor inside :func:`gathered`, the parameter itself otherwise;
- :func:`local_piece` is this rank's share of a tensor, for norms computed as sums of squares
  across ranks without materialising the whole tensor anywhere.

Without sharding (one process, DDP, ZeRO-1/2, whose parameters are whole on every rank) every
function here is a no-op and nothing is communicated.

Usage:
    from perl.trackers import sharding
    with sharding.gathered(list(module.parameters())):        # every rank, same order
        if sharding.rank() == 0:
            w = sharding.resolve(module.weight).clone()          # the full weight
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator

import torch

__all__ = [
    "is_zero3",
    "is_dtensor",
    "is_sharded",
    "any_sharded",
    "distributed",
    "rank",
    "world_size",
    "gathered",
    "resolve",
    "local_piece",
    "full_shape",
    "all_reduce_sum",
    "broadcast_flag",
]

# id(parameter) -> its full tensor, while inside `gathered` (DTensors only; ZeRO-3 gathers in place)
_FULL: dict[int, torch.Tensor] = {}


def is_zero3(t) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_tensor")


def is_dtensor(t) -> bool:
    """A DTensor (FSDP2 ``fully_shard`` parameters and their gradients)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def is_sharded(t) -> bool:
    return is_zero3(t) or is_dtensor(t)


def any_sharded(tensors: Iterable) -> bool:
    return any(is_sharded(t) for t in tensors)


def distributed() -> bool:
    """A process group with more than one process is up."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Every rank together: the full values of ``params`` are readable (through :func:`resolve`) inside.

    Read-only: changes to gathered values are discarded on exit. Unsharded parameters pass
    through untouched, so this costs nothing without sharding.
    """
    params = list({id(p): p for p in params}.values())
    zero3 = [p for p in params if is_zero3(p)]
    dtensors = [p for p in params if is_dtensor(p)]
    with contextlib.ExitStack() as stack:
        if zero3:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(zero3, modifier_rank=None))
        try:
            with torch.no_grad():
                for p in dtensors:
                    _FULL[id(p)] = p.detach().full_tensor()
            yield
        finally:
            for p in dtensors:
                _FULL.pop(id(p), None)


def resolve(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of ``t``: gathered inside :func:`gathered`, ``t`` itself when it is not sharded."""
    full = _FULL.get(id(t))
    if full is not None:
        return full
    if is_dtensor(t):
        raise RuntimeError(
            "A sharded (DTensor) parameter was read outside perl.trackers.sharding.gathered(); "
            "the trackers gather each module before reading it."
        )
    return t


def full_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The shape of the whole tensor (a ZeRO-3 parameter's own is its empty placeholder's; a
    DTensor's is already the global one)."""
    return tuple(t.ds_shape) if is_zero3(t) else tuple(t.shape)


def local_piece(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(this rank's values of t, sharded)``: a shard whose squares summed over ranks give ||t||²,
    or the whole tensor (``sharded`` False) when every rank holds all of it."""
    if is_dtensor(t):
        return t.to_local(), True
    if is_zero3(t):
        part = t.ds_tensor
        size = part.numel()
        # note: the last rank's partition is padded to the common size; the padding is not data
        n = max(0, min(size, int(t.ds_numel) - rank() * size))
        return part.reshape(-1).narrow(0, 0, n), True
    return t, False


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place (no-op without a process group); returns ``t``."""
    if distributed():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def broadcast_flag(flag: bool) -> bool:
    """Global rank 0's ``flag`` on every rank, so that all take the same branch before a collective."""
    if not distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())


def _comm_device() -> torch.device:
    # note: NCCL only communicates CUDA tensors; gloo (CPU) takes CPU tensors
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _is_rank_zero() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def writes_snapshot(
    is_writer: bool, stored: Callable[[], bool], params: Iterable, take_part: Callable[[], None]
) -> bool:
    """Whether this process computes and stores a tracker's snapshot of a step; every rank calls it.

    With sharded ``params`` every rank takes the same branch, since the gathers of a snapshot are
    collectives: the step is skipped everywhere when the writer has it ``stored()`` already, and a
    rank that does not write joins the gathers through ``take_part()``. Otherwise only the writer
    writes a step it has not stored (``stored`` is called on the writer only).
    """
    if distributed() and any_sharded(params):
        if broadcast_flag(is_writer and stored()):
            return False
        if not is_writer:
            take_part()
            return False
        return True
    return is_writer and not stored()
