"""Gradient flow: where the learning signal of each optimizer step goes, per layer x module x component.

At a logged optimizer step ``s`` the tracker records, for every tracked tensor group (a
``(layer, module, component)`` cell such as ``(3, "q_proj", "B")``):

- ``grad_norm``: the L2 norm of the *accumulated, pre-clip* gradient, the sum over all
  gradient-accumulation micro-batches before ``max_grad_norm`` clipping, i.e. what a researcher
  means by "the gradient" of step ``s``;
- ``weight_norm``: the norm of the tensor the gradient was taken at (before the step);
- ``grad_to_weight_ratio`` = grad_norm / weight_norm;
- ``update_ratio`` = ||p_after - p_before|| / weight_norm: what the optimizer actually did (for
  Adam neither the gradient's size nor its direction);

and per step ``total_grad_norm`` (pre-clip, over every trainable parameter: the Trainer's logged
``grad_norm``), ``clip_coef`` (the factor clipping applied, 1 when it did not clip) and
``post_clip_grad_norm`` (measured on the clipped gradients).

Why division by ``clip_coef``: the Trainer clips *before* any callback sees the gradients.
Clipping is one uniform rescale by ``clip_coef = min(1, max_norm / (total + 1e-6))`` (torch's
formula, computed here the same way in the same dtype), so a tensor's pre-clip norm is its
post-clip norm divided by ``clip_coef``, exact up to float rounding. ``total`` is the value the
clip returned, which :class:`~perl.trackers.callbacks.GradientFlowCallback` captures. When the
total is not finite the clip has already destroyed the gradients (they are multiplied by NaN or
0): per-tensor pre-clip norms are then stored as NaN.

Step convention: ``step = s >= 1`` is the s-th optimizer step (the Trainer's ``global_step``
after that update, the number it logs the update's ``grad_norm`` under), so gradient step ``s``
explains the change between spectral snapshots ``s - 1`` and ``s``.

Layer convention: ``layer`` is the transformer block index; ``-1`` holds tensors outside the
numbered blocks (embeddings, final norm, lm_head). Missing is NaN: a cell a method does not
have (a module it does not adapt, ``E`` for LoRA) is NaN, never 0.

Engines: under DDP the gradients rank 0 sees are the all-reduced ones and only rank 0 computes.
DeepSpeed clips and steps inside backward, so :meth:`GradientFlowTracker.capture_gradients` reads
the full gradients (``deepspeed.utils.safe_get_full_grad``) from an engine-step hook, before the
clip; ``total_grad_norm`` is then the engine's own pre-clip norm. With sharded parameters (ZeRO-3
partitions, FSDP2 DTensors) every norm is the square root of a sum of squares of each rank's
shard, all-reduced once per quantity: no whole tensor is materialised, every rank takes part and
only the process with ``writes`` (global rank 0) appends to the store.

Trainer logs: each written step also leaves scalars in ``last_scalars`` (``gradient/step``,
``gradient/total_pre_clip``, ``gradient/clip_coef``, ``gradient/total_post_clip`` and, per component
and module type, ``gradient/<component>/<module>`` = the L2 norm over layers of the pre-clip
``grad_norm``, i.e. the norm of that component's gradient in every tracked layer together), which
:class:`~perl.trackers.callbacks.GradientFlowCallback` adds to the Trainer's next log record.
Non-finite values are left out of the logs (they stay NaN in the store).

Full fine-tuning (no peft adapter) with ``track_adapter_only=True`` tracks the weights of the
modules ``target_modules`` names, component ``weight``: the modules an adapter would adapt.

Cost: norms are computed on the parameters' device in batched ``torch._foreach_norm`` calls and
reach the host in one transfer per logged step. To measure ``update_ratio`` the tracked tensors
are copied once on each logged step (adapter-sized for PEFT; the target modules' weights in full
fine-tuning, a full copy of the model with ``track_adapter_only=False``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import nn

from .. import __version__
from ..fileio import atomic_write_text
from . import sharding
from .discovery import peft_config_of
from .gradient_history import FINAL_NAME, GRADIENT_DIR, STEP_CONVENTION, STORE_NAME, SUMMARY_NAME, GradientFlowHistory
from .gradient_schema import _VARIABLE_ATTRS, COMPONENT_ORDER, LAYER_CONVENTION, MODULE_ORDER
from .gradient_tensors import TrackedTensor, _ordered, tracked_tensors
from .store import RunStore

__all__ = ["GradientFlowTracker", "TrackedTensor", "tracked_tensors", "STEP_CONVENTION"]

logger = logging.getLogger("perl")


# ------------------------------------------------------------------------------------ the tracker
class GradientFlowTracker(GradientFlowHistory):
    """Records the pre-clip gradient, gradient-to-weight and update ratios of every adapter tensor.

    The Trainer integration is :class:`perl.trackers.callbacks.GradientFlowCallback`; the tracker
    itself works in any loop that calls :meth:`log_step` between backward (and clipping) and
    ``optimizer.step()``, and :meth:`log_update` after it.

    Usage:
        tracker = GradientFlowTracker(peft_model, log_frequency=10, save_dir="runs/x")
        # plain loop: backward, clip, record, step
        loss.backward()
        total = torch.nn.utils.clip_grad_norm_(peft_model.parameters(), 1.0)
        if tracker.should_log(step):
            tracker.log_step(step, total_grad_norm=total, max_grad_norm=1.0)
        optimizer.step()
        tracker.log_update()             # update ratios; writes the row
        ...
        tracker.finalize()               # summary JSON, gradient_flow_final.nc, heatmap PNGs
        # later, anywhere
        tracker = GradientFlowTracker.load("runs/x")
        tracker.get_gradient_matrix("B")             # DataArray (layer, step)
        tracker.create_heatmap("B", save_path="b.png")

    Args:
        model (nn.Module): the peft model being trained (or any model with
            ``track_adapter_only=False``). None only for trackers made by :meth:`load`.
        log_frequency (int, defaults to 100): record optimizer steps ``s`` with ``s % log_frequency == 0``.
        save_dir (str | Path, defaults to "."): the tracking folder; the store is
            ``<save_dir>/gradient_logs/gradient_flow.nc``, the final file ``<save_dir>/gradient_flow_final.nc``.
        track_adapter_only (bool, defaults to True): False adds every other trainable parameter
            (all weights in full fine-tuning) under (layer, module, ``weight``/``bias``).
        peft_type (str, optional): method label stored in the attrs (``lora``, ``dora``, ...);
            default: peft's type of the active adapter.
        run_attrs (dict, optional): more global attributes (config YAML, seed, model, ...).
        target_modules (list[str], optional): full fine-tuning: the modules whose weights are
            tracked with ``track_adapter_only=True``; default every ``nn.Linear`` but the output head.
    """

    def __init__(
        self,
        model: nn.Module | None,
        log_frequency: int = 100,
        save_dir: str | os.PathLike = ".",
        track_adapter_only: bool = True,
        peft_type: str | None = None,
        run_attrs: dict | None = None,
        target_modules=None,
    ):
        if not isinstance(log_frequency, int) or isinstance(log_frequency, bool) or log_frequency < 1:
            raise ValueError(
                f"log_frequency must be a positive integer (log every N optimizer steps), got {log_frequency!r}."
            )
        self.model = model
        self.log_frequency = log_frequency
        self.save_dir = Path(save_dir)
        self.track_adapter_only = bool(track_adapter_only)
        self.peft_type = peft_type
        self._pending: dict | None = None
        self._captured: dict | None = None
        self.last_scalars: dict[str, float] = {}
        self._loaded: xr.Dataset | None = None
        self.store: RunStore | None = None
        # whether this process appends to the store (global rank 0; set by the callback)
        self.writes = True
        if model is None:
            return

        tracked = tracked_tensors(model, self.track_adapter_only, target_modules)
        if not tracked:
            raise ValueError("The model has no trainable parameters to track; expected requires_grad tensors.")
        self.peft_type = peft_type or _peft_type_of(model, tracked)
        self.layers = sorted({t.layer for t in tracked})
        self.modules = _ordered([t.module for t in tracked], MODULE_ORDER)
        self.components = _ordered([t.component for t in tracked], COMPONENT_ORDER)
        shape = (len(self.layers), len(self.modules), len(self.components))

        # every trainable tensor, tracked ones first: the post-clip total covers all of them
        tracked_params = [t.param for t in tracked]
        tracked_ids = {id(p) for p in tracked_params}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in tracked_ids]
        self._params = tracked_params + others
        self._n_tracked = len(tracked_params)
        self.device = tracked_params[0].device
        self._single_device = all(p.device == self.device for p in self._params)
        # squares of large norms overflow float32; MPS has no float64
        self._acc_dtype = torch.float32 if self.device.type == "mps" else torch.float64

        cell = [
            np.ravel_multi_index(
                (self.layers.index(t.layer), self.modules.index(t.module), self.components.index(t.component)), shape
            )
            for t in tracked
        ]
        self._cell_index = torch.tensor(cell, dtype=torch.long, device=self.device)
        numel = np.zeros(int(np.prod(shape)), dtype=np.int64)
        np.add.at(numel, cell, [_full_numel(t.param) for t in tracked])
        self._numel = numel.reshape(shape)
        self._shape = shape
        self._empty = self._numel == 0
        self.tracked = tracked

        attrs = {
            "title": "PeRL gradient flow",
            "peft_type": self.peft_type,
            "log_frequency": self.log_frequency,
            "track_adapter_only": self.track_adapter_only,
            "step_convention": STEP_CONVENTION,
            "layer_convention": LAYER_CONVENTION,
            "missing_value_convention": "NaN: not tracked, no gradient, or not measured; never 0",
            "Conventions": "CF-1.8",
            "perl_version": __version__,
            **(run_attrs or {}),
        }
        if peft_type is not None:  # an explicit label wins over run_attrs' generic one
            attrs["peft_type"] = peft_type
        self.store = RunStore(self.save_dir / GRADIENT_DIR / STORE_NAME, attrs=attrs)

    # ------------------------------------------------------------------------ recording
    def should_log(self, step: int) -> bool:
        """True when optimizer step ``step`` (>= 1) is one to record."""
        return step >= 1 and step % self.log_frequency == 0

    @property
    def _tracked_detached(self) -> list[torch.Tensor]:
        # note: read at each use, never cached: DeepSpeed swaps p.data for views of its flat buffers
        return [p.detach() for p in self._params[: self._n_tracked]]

    def rebind(self, model: nn.Module | None = None) -> None:
        """Follow parameters an engine replaced after the tracker was made (FSDP2's ``fully_shard``
        registers new DTensor parameters); the tracked tensors and their cells must be the same."""
        model = self.model if model is None else model
        tracked = tracked_tensors(model, self.track_adapter_only)
        if [t.name for t in tracked] != [t.name for t in self.tracked]:
            raise RuntimeError(
                "The model's trainable tensors changed after the gradient tracker was made; "
                "build the tracker from the model the Trainer trains."
            )
        ids = {id(t.param) for t in tracked}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        self._params = [t.param for t in tracked] + others
        self.tracked = tracked

    def _norms_sq(self, tensors: list[torch.Tensor | None], whole: bool = False) -> torch.Tensor:
        """Squared L2 norms of the full tensors (NaN where None), one entry per tensor.

        Sharded tensors (FSDP2 DTensors, ZeRO-3 partitions) contribute their local pieces, summed
        over ranks in one all-reduce; a tensor every rank holds whole counts once. ``whole``: the
        tensors are full on every rank (DeepSpeed's gathered gradients); nothing is communicated.
        """
        acc, n = self._acc_dtype, len(tensors)
        idx, pieces, split = [], [], []
        for i, t in enumerate(tensors):
            if t is None:
                continue
            piece, sharded = (t, False) if whole else sharding.local_piece(t)
            idx.append(i)
            pieces.append(piece)
            split.append(sharded)
        out = torch.full((n,), float("nan"), dtype=acc, device=self.device)
        if not any(split) or not sharding.distributed():
            if pieces:
                out[torch.tensor(idx, device=self.device)] = (
                    self._stack(torch._foreach_norm(pieces, dtype=torch.float32)).to(acc).square()
                )
            return out
        both = torch.zeros((2, n), dtype=acc, device=self.device)
        if pieces:
            sq = self._stack(torch._foreach_norm(pieces, dtype=torch.float32)).to(acc).square()
            counted = torch.tensor([float(sh or sharding.rank() == 0) for sh in split], dtype=acc, device=self.device)
            where = torch.tensor(idx, device=self.device)
            both[0, where] = sq * counted
            both[1, where] = 1.0
        sharding.all_reduce_sum(both)
        return torch.where(both[1] > 0, both[0], out)

    def _local_copies(self) -> list[torch.Tensor]:
        # this rank's values of every tracked tensor (whole, or its shard), copied: steps update in place
        return [sharding.local_piece(p)[0].detach().clone() for p in self._params[: self._n_tracked]]

    @torch.no_grad()
    def capture_gradients(self) -> None:
        """Read the accumulated, pre-clip gradients now, for the next :meth:`log_step` (all ranks).

        For engines that clip and step inside backward (DeepSpeed): the engine hook of
        :class:`~perl.trackers.callbacks.GradientFlowCallback` calls this just before the engine's
        ``step()``. Full gradients come from ``deepspeed.utils.safe_get_full_grad`` (a collective per
        tensor under ZeRO; the adapter's size), weight norms and the copy for the update ratio from
        each rank's shard.
        """
        params = self._params
        if any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in params):
            from deepspeed.utils import safe_get_full_grad

            grads = [safe_get_full_grad(p) if p.requires_grad else None for p in params]
            grad_sq = self._norms_sq(grads, whole=True)
        else:
            grad_sq = self._norms_sq([p.grad for p in params])
        self._captured = {
            "grad_sq": grad_sq,
            "weight_sq": self._norms_sq(list(params[: self._n_tracked])),
            "before": self._local_copies(),
        }

    @torch.no_grad()
    def log_step(
        self, step: int, total_grad_norm: torch.Tensor | float | None = None, max_grad_norm: float | None = None
    ) -> None:
        """Record the gradients present now (accumulated, maybe clipped), before ``optimizer.step()``.

        The row is written by :meth:`log_update` (after the step, with update ratios) or, if that
        is not called, by the next :meth:`log_step` / :meth:`save` with ``update_ratio`` NaN.

        Args:
            step (int): the optimizer step these gradients are for (s >= 1, see module docs).
            total_grad_norm (Tensor | float, optional): the pre-clip total norm the clip returned.
                None: the gradients were not clipped; the total is measured now.
            max_grad_norm (float, optional): the ``max_norm`` the clip used; None, <= 0 or inf: no clip.
        """
        if self.store is None:
            raise RuntimeError("This tracker was loaded from a file and cannot record; build one from a model.")
        if self._pending is not None:
            self._write_pending()
        step = int(step)

        acc = self._acc_dtype
        captured, self._captured = self._captured, None
        sharded = sharding.distributed() and sharding.any_sharded(self._params)
        if captured is not None:  # read before the engine clipped (capture_gradients): already pre-clip
            grad_sq = captured["grad_sq"]
        elif sharded:
            grad_sq = self._norms_sq([p.grad for p in self._params])
        else:
            grad_sq = None
        if grad_sq is not None:
            norms = grad_sq.sqrt()
            # like the Trainer's total, tensors without a gradient do not count
            post_total = torch.nansum(grad_sq).sqrt()
        else:
            present = [i for i, p in enumerate(self._params) if p.grad is not None]
            norms = torch.full((len(self._params),), float("nan"), dtype=acc, device=self.device)
            post_total = torch.zeros((), dtype=acc, device=self.device)
            if present:
                found = self._stack(
                    torch._foreach_norm([self._params[i].grad for i in present], dtype=torch.float32)
                ).to(acc)
                norms[torch.tensor(present, device=self.device)] = found
                post_total = found.square().sum().sqrt()

        clipped = total_grad_norm is not None and max_grad_norm is not None and 0 < max_grad_norm < math.inf
        if total_grad_norm is None:
            total = post_total
        else:
            if sharding.is_dtensor(total_grad_norm):  # clip_grad_norm_ over FSDP2 gradients
                total_grad_norm = total_grad_norm.full_tensor()
            total = torch.as_tensor(total_grad_norm, device=self.device)
        if clipped:
            # torch.nn.utils.clip_grads_with_norm_'s formula, in the total's dtype, so dividing undoes it
            coef = torch.clamp(max_grad_norm / (total + 1e-6), max=1.0)
        else:
            coef = torch.ones((), dtype=total.dtype, device=self.device)
        coef = coef.to(acc)
        tracked_norms = norms[: self._n_tracked]
        if captured is not None:
            pre = tracked_norms
            # note: the engine zeroes its gradients inside its step: the post-clip total is the
            # pre-clip one times the uniform clip factor, not a measurement
            post_total = post_total * coef
        else:
            usable = torch.isfinite(coef) & (coef > 0)
            pre = torch.where(usable, tracked_norms / coef, torch.full_like(tracked_norms, float("nan")))

        if captured is not None:
            weight_sq, before = captured["weight_sq"], captured["before"]
        elif sharded:
            weight_sq, before = self._norms_sq(list(self._params[: self._n_tracked])), self._local_copies()
        else:
            weight_sq = self._stack(torch._foreach_norm(self._tracked_detached, dtype=torch.float32)).to(acc).square()
            # a copy, not an alias: optimizer.step() updates in place
            before = torch._foreach_mul(self._tracked_detached, 1.0)
        self._pending = {
            "step": step,
            "grad_sq": self._cells(pre.square()),
            "weight_sq": self._cells(weight_sq),
            "totals": torch.stack([total.to(acc), coef, post_total]),
            "before": before,
        }

    @torch.no_grad()
    def log_update(self) -> bool:
        """After ``optimizer.step()``: measure the update ratios of the pending step and write its row.

        Returns True when a row was written (its scalars are then in ``last_scalars``).
        """
        if self._pending is None:
            return False
        before = self._pending.pop("before")
        tracked = self._params[: self._n_tracked]
        if sharding.distributed() and sharding.any_sharded(tracked):
            # each rank's shard of p_after - p_before; squares summed over ranks
            deltas = [sharding.local_piece(p)[0].detach() - b for p, b in zip(tracked, before)]
            update_sq = self._norms_sq_of_pieces(deltas, [sharding.is_sharded(p) for p in tracked])
        else:
            deltas = torch._foreach_sub(self._tracked_detached, before)
            update_sq = self._stack(torch._foreach_norm(deltas, dtype=torch.float32)).to(self._acc_dtype).square()
        self._pending["update_sq"] = self._cells(update_sq)
        self._write_pending()
        return True

    def _norms_sq_of_pieces(self, pieces: list[torch.Tensor], split: list[bool]) -> torch.Tensor:
        acc = self._acc_dtype
        sq = self._stack(torch._foreach_norm(pieces, dtype=torch.float32)).to(acc).square()
        counted = torch.tensor([float(sh or sharding.rank() == 0) for sh in split], dtype=acc, device=self.device)
        return sharding.all_reduce_sum(sq * counted)

    def _stack(self, tensors) -> torch.Tensor:
        if self._single_device:
            return torch.stack(tensors)
        return torch.stack([t.to(self.device) for t in tensors])

    def _cells(self, per_tensor_sq: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(int(np.prod(self._shape)), dtype=self._acc_dtype, device=self.device)
        return out.index_add_(0, self._cell_index, per_tensor_sq)

    def _write_pending(self) -> None:
        pending, self._pending = self._pending, None
        if not self.writes:
            return
        n = pending["grad_sq"].numel()
        update_sq = pending.get("update_sq")
        if update_sq is None:
            update_sq = torch.full((n,), float("nan"), dtype=self._acc_dtype, device=self.device)
        # the one host transfer of the step
        row = (
            torch.cat([pending["grad_sq"], pending["weight_sq"], update_sq, pending["totals"]]).cpu().double().numpy()
        )
        grad, weight, upd = (np.sqrt(row[i * n : (i + 1) * n]).reshape(self._shape) for i in range(3))
        total, coef, post = row[3 * n :]
        for arr in (grad, weight, upd):
            arr[self._empty] = np.nan
        self.store.append(self._snapshot(pending["step"], grad, weight, upd, total, coef, post))
        self.last_scalars = self._log_scalars(pending["step"], grad, total, coef, post)
        if not math.isfinite(total):
            lost = (
                "; the clip destroyed the per-tensor values, stored as NaN"
                if not (math.isfinite(coef) and coef > 0)
                else ""
            )
            logger.warning("Gradient tracker: total gradient norm at step %d is %s%s.", pending["step"], total, lost)

    def _log_scalars(self, step, grad, total, coef, post) -> dict[str, float]:
        """The step's scalars for the Trainer's logs (see module docs); non-finite values left out."""
        out = {"gradient/step": float(step)}
        for key, value in (("total_pre_clip", total), ("clip_coef", coef), ("total_post_clip", post)):
            if math.isfinite(value):
                out[f"gradient/{key}"] = float(value)
        for c, component in enumerate(self.components):
            for m, module in enumerate(self.modules):
                tracked = ~self._empty[:, m, c]
                values = grad[:, m, c][tracked]
                if values.size and np.isfinite(values).all():
                    out[f"gradient/{component}/{module}"] = float(np.sqrt(np.square(values).sum()))
        return out

    def _snapshot(self, step, grad, weight, upd, total, coef, post) -> xr.Dataset:
        dims = ("step", "layer", "module", "component")
        with np.errstate(divide="ignore", invalid="ignore"):
            g2w, u2w = grad / weight, upd / weight
        data = {
            "grad_norm": (dims, grad[None]),
            "weight_norm": (dims, weight[None]),
            "grad_to_weight_ratio": (dims, g2w[None]),
            "update_ratio": (dims, u2w[None]),
            "numel": (dims[1:], self._numel),
            "total_grad_norm": (("step",), [total]),
            "clip_coef": (("step",), [coef]),
            "post_clip_grad_norm": (("step",), [post]),
        }
        ds = xr.Dataset(
            data,
            coords={
                "step": np.array([step], dtype=np.int64),
                "layer": np.array(self.layers, dtype=np.int64),
                "module": np.array(self.modules, dtype=object),
                "component": np.array(self.components, dtype=object),
            },
        )
        for name, attrs in _VARIABLE_ATTRS.items():
            ds[name].attrs.update(attrs)
        ds["step"].attrs.update({"long_name": "optimizer step", "description": STEP_CONVENTION})
        ds["layer"].attrs.update({"long_name": "transformer block", "description": LAYER_CONVENTION})
        ds["module"].attrs["long_name"] = "module type within the block"
        ds["component"].attrs["long_name"] = (
            "adapter component (A, B, magnitude, E, lambda_b, lambda_d, ia3, ln, miss, u, slice, weight, bias)"
        )
        return ds

    # ------------------------------------------------------------------------ saving
    def start_fresh(self) -> None:
        """A new run (step 0) in a folder an earlier run used: remove that run's gradient files."""
        self._pending = None
        if self.store is None:
            return
        if self.store.steps:
            logger.warning(
                "Replacing the gradient store %s of an earlier run (%d steps).", self.store.path, len(self.store.steps)
            )
        self.store.clear()
        folder = self.store.path.parent
        stale = [
            self.save_dir / FINAL_NAME,
            folder / SUMMARY_NAME,
            folder / "gradient_layer_comparison.png",
            *folder.glob("gradient_heatmap_*.png"),
        ]
        for path in stale:
            path.unlink(missing_ok=True)

    def resume_from(self, step: int) -> None:
        """Resuming from checkpoint-``step``: drop stored steps after it."""
        self._pending = None
        if self.store is not None:
            self.store.truncate_after(int(step))

    def save(self) -> Path | None:
        """Write any pending row and ``gradient_flow_summary.json``; return the store path (None if empty)."""
        if self.store is None:
            raise RuntimeError("This tracker was loaded from a file; there is nothing to save.")
        if self._pending is not None:
            self._write_pending()
        if not self.store.steps:
            return None
        summary = self.get_summary_stats()
        path = self.store.path.with_name(SUMMARY_NAME)
        atomic_write_text(path, json.dumps(summary, indent=2))
        return self.store.path

    def finalize(self) -> Path | None:
        """End of training: :meth:`save`, ``gradient_flow_final.nc`` at the top of ``save_dir``, heatmap PNGs.

        Returns the final file, or None (with a warning) when no step was recorded.
        """
        if self.save() is None:
            logger.warning(
                "Gradient tracker recorded no step (log_frequency=%d): %s was not written.",
                self.log_frequency,
                self.save_dir / FINAL_NAME,
            )
            return None
        final = self.store.finalize(self.save_dir / FINAL_NAME)
        self.save_plots()
        return final

    def save_plots(self, folder: str | os.PathLike | None = None) -> list[Path]:
        """Write gradient_heatmap_<component>.png for A, B and DoRA's magnitude (when present) and
        gradient_layer_comparison.png; return the paths written (see :func:`.heatmaps.save_gradient_pngs`)."""
        from .heatmaps import save_gradient_pngs

        return save_gradient_pngs(self.data, Path(folder) if folder is not None else self.save_dir / GRADIENT_DIR)


# ------------------------------------------------------------------------------------ helpers
def _peft_type_of(model: nn.Module, tracked: list[TrackedTensor]) -> str:
    config = peft_config_of(model)
    if not config:
        return "full"
    cfg = next(iter(config.values()))
    name = str(getattr(getattr(cfg, "peft_type", None), "value", getattr(cfg, "peft_type", "unknown"))).lower()
    if name == "lora" and any(t.component == "magnitude" for t in tracked):
        return "dora"
    return name


def _full_numel(p: torch.Tensor) -> int:
    # note: a ZeRO-3 parameter's own numel is its empty placeholder's
    return int(getattr(p, "ds_numel", p.numel()))
