"""What the spectral and alignment trackers share: logging one snapshot, resuming, the initial-state file.

Both trackers keep the initial state of each module (``tracker._init``: module name -> part name ->
tensor, e.g. ``B0`` / ``A0``) for the update since init, save it beside each checkpoint as
safetensors (keys ``"<module>::<part>"``, no pickle) and restore it when a run resumes; both append
one Dataset per logged step to a :class:`~perl.trackers.store.RunStore`, with the same rule for
which rank computes and writes (:func:`perl.trackers.sharding.writes_snapshot`).

Usage:
    >>> path = save_init_tensors(tracker._init, checkpoint / INIT_STATE_NAME, "perl-spectral-init-1")
    >>> restored = load_init_tensors(path, expected={name: {"B0": (m, r), "A0": (r, n)}, ...})
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
import xarray as xr

from . import sharding

logger = logging.getLogger("perl")

__all__ = ["save_init_tensors", "load_init_tensors", "log_snapshot", "StoreLifecycle"]


def save_init_tensors(init: dict[str, dict[str, torch.Tensor]], path: Path, fmt: str, **metadata: str) -> Path:
    """Write ``init`` to ``path`` as safetensors (CPU, contiguous), with ``format=fmt`` and ``metadata``."""
    from safetensors.torch import save_file

    tensors = {f"{name}::{part}": t.detach().contiguous().cpu() for name, d in init.items() for part, t in d.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": fmt, **metadata})
    return path


def load_init_tensors(path: Path, expected: dict[str, dict[str, tuple]]) -> dict[str, dict[str, torch.Tensor]] | None:
    """The initial state saved by :func:`save_init_tensors` (CPU tensors), None if there is no file.

    Args:
        path (`Path`): the safetensors file.
        expected (`dict`): module name -> part name -> shape, of the model being resumed. A file
            naming another module or holding a part of another shape is refused with one clear error.
    """
    if not path.is_file():
        return None
    from safetensors import safe_open

    restored: dict[str, dict[str, torch.Tensor]] = {name: {} for name in expected}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            name, _, part = key.rpartition("::")
            if name not in restored:
                raise ValueError(
                    f"{path} holds initial factors for {name!r}, which this model does not have; "
                    "resume with the model and adapter config of the original run."
                )
            restored[name][part] = f.get_tensor(key)
    for name, parts in restored.items():
        for part, tensor in parts.items():
            shape = expected[name].get(part)
            if shape is not None and tuple(tensor.shape) != tuple(shape):
                raise ValueError(
                    f"{path}: initial {part} of {name!r} has shape {tuple(tensor.shape)}, the model "
                    f"has {tuple(shape)}; resume with the adapter config of the original run."
                )
    return restored


class StoreLifecycle:
    """Mixin of the spectral and alignment trackers: ``resume`` and ``start_fresh`` of their store.

    A subclass has ``store``, ``is_world_process_zero`` and ``load_init_state``, and sets
    ``_store_kind`` (word in the log), ``_init_state_name`` (the file in a checkpoint) and
    ``_without_init`` (what a resume without that file measures from).
    """

    _store_kind: str
    _init_state_name: str
    _without_init: str

    def resume(self, step: int, checkpoint_dir: str | os.PathLike | None = None) -> None:
        """Continue after resuming from checkpoint-``step``: restore the initial state, drop stored steps > step."""
        if checkpoint_dir is not None and not self.load_init_state(checkpoint_dir):
            logger.warning("No %s in %s: %s", self._init_state_name, checkpoint_dir, self._without_init)
        if self.is_world_process_zero:
            self.store.truncate_after(int(step))

    def start_fresh(self) -> None:
        """Remove a store left by an earlier run in the same folder (a new run starting at step 0)."""
        if self.is_world_process_zero and self.store.steps:
            logger.warning(
                "Replacing the %s store %s of an earlier run (%d steps).",
                self._store_kind,
                self.store.path,
                len(self.store.steps),
            )
            self.store.clear()


def log_snapshot(tracker, step: int, compute: Callable[[int], xr.Dataset]) -> xr.Dataset | None:
    """A tracker's ``log_step``: ``compute(step)`` appended to its store, on the rank that writes.

    Returns the snapshot (None when tracking is off, on processes that do not write, or if ``step``
    is already stored). Non-writing ranks of a sharded model take part in the gathers through
    ``tracker._take_part``.
    """
    if not tracker.enabled:
        return None
    step = int(step)
    if not sharding.writes_snapshot(
        tracker.is_world_process_zero, lambda: step in tracker.store.steps, tracker._params, tracker._take_part
    ):
        return None
    snapshot = compute(step)
    tracker.store.append(snapshot)
    tracker.last_scalars = tracker._scalars(snapshot)
    return snapshot
