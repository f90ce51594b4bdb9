"""SpectralTracker: exact spectra of every adapter's weight change, per step x layer x module.

At each logged step (the Trainer's ``global_step`` = optimizer steps done; step 0 is before the
first update) the tracker computes, for every adapted module of the active adapter,

- ``singular_values``: of the scaled adapter product ``s B A`` (r values, factored, never m x n);
- ``update_singular_values``: of the update since initialisation ``s (B_t A_t - B_0 A_0)``
  (rank <= 2r; for PiSSA / MiLoRA this is what learning did; exactly zero at step 0);
- the spectrum metrics of both (``effective_rank``, ``update_effective_rank``, ...);
- method specifics: DoRA magnitude / direction and the top singular values of its effective weight
  change, AdaLoRA rank budget and importance scores, IA3 / LayerNorm-tuning vector norms and
  distance from init (these have no spectrum),

and appends them as one step to ``<save_dir>/spectral_logs/spectral_history.nc`` (a
:class:`~perl.trackers.store.RunStore`). Nothing is kept in memory between steps except the
initial factors B_0, A_0 (on the model's device), needed for the update since init.

Which quantities a Dataset holds depends on the methods present: variables are declared for what
the model has (spectra for LoRA-family / AdaLoRA / VeRA / MiSS / HRA / SliceFine, vector norms for
IA3 / LayerNorm tuning, DoRA and AdaLoRA extras when present) and are NaN where a module is not
adapted or a quantity is undefined. The global attribute ``tracked_variables`` lists them.

Full fine-tuning (a model without peft adapter) is tracked on the modules ``target_modules``
names: the tracker keeps one copy of their initial weights W_0 (on their device) and stores the top
``full_top_k`` singular values of the update since init ``W_t - W_0`` (full rank: randomized SVD,
:func:`~perl.trackers.spectral_math.lowrank_singular_values`) as both ``singular_values`` and
``update_singular_values``; the metrics are those of these top values (attrs say so).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from . import sharding
from . import spectral_math as sm
from .discovery import (FACTORED_KINDS, AdapterModule, adalora_importance_scores, adalora_rank_budget,
                        discover_adapters, discover_full_weights, materialized, peft_config_of, walk)
from .store import RunStore

logger = logging.getLogger("perl")

__all__ = ["SpectralTracker", "SPECTRAL_DIR", "STORE_NAME", "SUMMARY_NAME", "FINAL_NAME", "INIT_STATE_NAME"]

SPECTRAL_DIR = "spectral_logs"
STORE_NAME = "spectral_history.nc"
SUMMARY_NAME = "spectral_history_summary.json"
FINAL_NAME = "spectral_history_final.nc"
INIT_STATE_NAME = "spectral_tracker_init.safetensors"

MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "input_layernorm", "post_attention_layernorm", "norm")
FULL_SVD_NITER = 6
FULL_SVD_SEED = 0
FULL_SVD_FORMULA = (f"torch.svd_lowrank(W_t - W_0, q=k+max(k,8), niter={FULL_SVD_NITER}) in float32 on the "
                    f"weights' device, start block seeded ({FULL_SVD_SEED}); exact dense SVD when q >= min(m, n)")
STEP_CONVENTION = ("step = optimizer steps done (the Trainer's global_step); the snapshot at step s "
                   "describes the weights after s optimizer steps; step 0 is before the first update")

SPECTRUM_ATTRS = {
    "singular_values": {
        "long_name": "singular values of the scaled adapter product s*B*A", "units": "weight units",
        "formula": "svd(R_b R_a^T) * |s| with B = Q_b R_b, A^T = Q_a R_a (never the dense product)",
        "description": "descending; NaN past the module's rank (padding) or where the module is not adapted",
    },
    "update_singular_values": {
        "long_name": "singular values of the update since init s*(B_t A_t - B_0 A_0)", "units": "weight units",
        "formula": "factored as [B_t - B_0, B_0] @ [A_t; A_t - A_0], rank <= 2r",
        "description": "what learning changed; exactly 0 at step 0; for PiSSA/MiLoRA differs from the product",
    },
}
EXTRA_ATTRS = {
    "magnitude_norm": {"long_name": "DoRA magnitude norm ||m||", "units": "weight units", "formula": "||m||_2"},
    "direction_norm": {
        "long_name": "DoRA direction norm ||W0 + s B A||_F", "units": "weight units",
        "formula": "||V||_F, V = W0 + s*B*A (the normalised direction V/||V||_row has norm sqrt(out))",
    },
    "magnitude_direction_ratio": {
        "long_name": "DoRA magnitude / direction norm", "units": "1", "formula": "||m|| / ||W0 + s B A||_F (1 at init)",
    },
    "dora_update_singular_values": {
        "long_name": "top singular values of DoRA's effective weight change W' - W0", "units": "weight units",
        "formula": "W' = diag(m / ||W0 + sBA||_row) (W0 + sBA); dense, top-k by randomized subspace iteration",
        "description": "full rank once m moves: only the top len(sv) values are stored",
    },
    "rank_budget": {
        "long_name": "AdaLoRA rank budget", "units": "1",
        "formula": "triplets kept by peft's latest rank_pattern (r before the first masking)",
    },
    "importance_scores": {
        "long_name": "AdaLoRA triplet importance", "units": "1",
        "formula": "s(E_i) + mean_j s(A_ij) + mean_k s(B_ki), s = exp_avg_ipt * exp_avg_unc (peft RankAllocator)",
        "description": "NaN before the allocator has scored; index = triplet, not sorted",
    },
    "vector_norm": {"long_name": "adapter vector norm (IA3 / LayerNorm tuning)", "units": "1", "formula": "||v||_2"},
    "vector_distance_from_init": {
        "long_name": "adapter vector distance from init", "units": "1", "formula": "||v_t - v_0||_2",
    },
    "scale": {"long_name": "adapter scale s", "units": "1",
              "formula": "delta W = s*B*A; alpha/r (LoRA), alpha/sqrt(r) (rsLoRA), scaling/ranknum (AdaLoRA), "
                         "1 (VeRA, MiSS, HRA, SliceFine, full)"},
    "rank": {"long_name": "configured adapter rank r", "units": "1"},
}


@dataclass
class _Group:
    """Modules whose factors have equal shapes: their spectra are one batched call."""

    members: list[AdapterModule]
    cells: list[tuple[int, int]]
    init_zero: bool            # B_0 A_0 = 0 for every member: the update is the product


class SpectralTracker:
    """Records the spectra of every adapter's weight change into a growing netCDF store.

    Usage:
        tracker = SpectralTracker(peft_model, log_frequency=10, save_dir="runs/x")
        tracker.log_step(0)                    # before training; then every 10 optimizer steps
        ...
        tracker.save()                         # summary JSON + runs/x/spectral_history_final.nc
        ds = tracker.data                      # xarray Dataset (step, layer, module, sv)
        ds.effective_rank.sel(module="q_proj").plot()

        old = SpectralTracker.load("runs/x")   # the final file, or the live store while training runs
        old.get_layer_history("model.layers.0.self_attn.q_proj")

    Args:
        model (nn.Module): a peft model (LoRA family, AdaLoRA, VeRA, IA3, LN tuning, MiSS).
        log_frequency (int, defaults to 100): log every N optimizer steps (used by the callback).
        save_dir (str | Path, defaults to "."): tracking folder; the store goes to
            ``<save_dir>/spectral_logs/spectral_history.nc``.
        peft_type (str, optional): method label for the attrs (``milora``, ``lora_plus``...);
            default derived from the peft config.
        compute_full_svd (bool, defaults to True): all r (2r) values; False keeps the top ``top_k``.
        max_layers_to_track (int, optional): evenly spaced blocks incl. the first and the last.
        top_k (int, defaults to 8): values kept when ``compute_full_svd`` is False.
        run_attrs (dict, optional): global attrs of the run (seed, config_yaml, model_name_or_path...).
        is_world_process_zero (bool, optional): whether this process writes; default: global rank 0
            of ``torch.distributed`` (True when not distributed).
        adapter_name (str, optional): adapter to track; default the active one.
        rtol (float, defaults to 1e-6): numerical-rank tolerance relative to sigma_1.
        target_modules (list[str], optional): full fine-tuning only: the modules to track (default
            every ``nn.Linear`` but the output head).
        full_top_k (int, defaults to 16): full fine-tuning only: singular values of ``W_t - W_0``
            kept per module (``perl.train`` passes 2r).
    """

    def __init__(self, model, log_frequency: int = 100, save_dir: str | os.PathLike = ".", peft_type: str | None = None,
                 compute_full_svd: bool = True, max_layers_to_track: int | None = None, top_k: int = 8,
                 run_attrs: dict | None = None, is_world_process_zero: bool | None = None,
                 adapter_name: str | None = None, rtol: float = sm.DEFAULT_RTOL, target_modules=None,
                 full_top_k: int = 16):
        if int(log_frequency) < 1:
            raise ValueError(f"log_frequency must be a positive integer, got {log_frequency}.")
        if int(top_k) < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k}.")
        self.model = getattr(model, "module", model)
        self.log_frequency = int(log_frequency)
        self.save_dir = Path(save_dir)
        self.compute_full_svd = bool(compute_full_svd)
        self.top_k = int(top_k)
        self.rtol = float(rtol)
        self.is_world_process_zero = _is_rank_zero() if is_world_process_zero is None else bool(is_world_process_zero)
        self.last_scalars: dict[str, float] = {}
        self._data: xr.Dataset | None = None

        if int(full_top_k) < 1:
            raise ValueError(f"full_top_k must be a positive integer, got {full_top_k}.")
        self.full_top_k = int(full_top_k)
        if peft_config_of(self.model):
            self.adapters = discover_adapters(self.model, adapter_name, max_layers_to_track)
        else:
            # note: no adapter: full fine-tuning, tracked on the modules an adapter would adapt
            self.adapters = discover_full_weights(self.model, target_modules, max_layers_to_track)
        # note: sharded parameters (ZeRO-3, FSDP2) are gathered one module at a time at snapshots
        self.enabled = True
        self.adapter_name = self.adapters[0].adapter or None
        self.layers = sorted({a.layer for a in self.adapters})
        present = {a.module for a in self.adapters}
        self.modules = [m for m in MODULE_ORDER if m in present] + sorted(present - set(MODULE_ORDER))
        self._cell = {a.name: (self.layers.index(a.layer), self.modules.index(a.module)) for a in self.adapters}

        tracked = self.adapters if self.enabled else []
        self._spectral = [a for a in tracked if a.kind in FACTORED_KINDS + ("full",)]
        self._full = [a for a in tracked if a.kind == "full"]
        self._vectors = [a for a in tracked if a.kind in ("ia3", "ln_tuning")]
        self._dora = [a for a in tracked if a.is_dora]
        self._adalora = [a for a in tracked if a.kind == "adalora"]
        # note: a model sharded before the tracker exists (zero.Init, fully_shard) is read through gathered copies
        with materialized(self._spectral + self._vectors):
            self._capture_init()
            self._n_sv, self._n_update = self._spectrum_sizes()
            self.peft_type = peft_type or ("full" if self._full else _derive_peft_type(self.model, self.adapter_name))
            self.attrs = self._global_attrs(run_attrs or {}, max_layers_to_track)
        self.store = RunStore(self.save_dir / SPECTRAL_DIR / STORE_NAME, attrs=self.attrs)

    # ---------------------------------------------------------------- initial state
    def _capture_init(self) -> None:
        """Copies of what the update since init needs: B_0, A_0 (factored), delta_0 (dense), v_0."""
        self._init: dict[str, dict[str, torch.Tensor]] = {}
        self._factor_meta: dict[str, tuple] = {}
        with torch.no_grad():
            for a in self._spectral:
                if a.kind == "full":
                    # note: the one copy of the targeted weights that full fine-tuning tracking costs,
                    # on the process that computes the spectra only
                    weight = a.components["weight"][0]
                    self._init[a.name] = {"W0": weight.detach().clone()} if self.is_world_process_zero else {}
                elif a.has_factors:
                    b, a_, _ = a.factors()
                    self._factor_meta[a.name] = (tuple(b.shape), tuple(a_.shape), b.dtype, str(b.device))
                    zero = not (b.any() and a_.any())
                    # B_0 A_0 = 0 (plain LoRA): nothing to keep, the update is the product
                    self._init[a.name] = {} if zero else {"B0": b.detach().clone(), "A0": a_.detach().clone()}
                else:
                    d0 = a.dense_delta()
                    self._init[a.name] = {"delta0": d0.clone()} if d0.any() else {}
            for a in self._vectors:
                self._init[a.name] = {"v0": a.vector().clone()}
        self._groups = self._make_groups()

    def _make_groups(self) -> list[_Group]:
        by_shape: dict[tuple, list[AdapterModule]] = {}
        for a in self._spectral:
            if a.has_factors:
                # note: shapes recorded at creation; the live parameters may be partitioned by now (ZeRO-3)
                key = (*self._factor_meta[a.name], not self._init[a.name])
                by_shape.setdefault(key, []).append(a)
        return [_Group(members, [self._cell[m.name] for m in members], key[-1]) for key, members in by_shape.items()]

    def save_init_state(self, directory: str | os.PathLike) -> Path | None:
        """Write the initial factors into ``directory`` (a checkpoint) as safetensors, for resume."""
        if not self.is_world_process_zero:
            return None
        from safetensors.torch import save_file

        tensors = {f"{name}::{key}": t.detach().contiguous().cpu() for name, d in self._init.items() for key, t in d.items()}
        path = Path(directory) / INIT_STATE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"format": "perl-spectral-init-1",
                                                "zero_init": json.dumps(sorted(n for n, d in self._init.items() if not d))})
        return path

    def load_init_state(self, directory: str | os.PathLike) -> bool:
        """Restore the initial factors saved by :meth:`save_init_state`; False if there is no file.

        A file that does not match the model (other modules or shapes) is refused with a clear error.
        """
        path = Path(directory) / INIT_STATE_NAME
        if not path.is_file():
            return False
        from safetensors import safe_open

        restored: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self._init}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name, _, part = key.rpartition("::")
                if name not in restored:
                    raise ValueError(f"{path} holds initial factors for {name!r}, which this model does not have; "
                                     "resume with the model and adapter config of the original run.")
                restored[name][part] = f.get_tensor(key)
        for name, parts in restored.items():
            for part, tensor in parts.items():
                current = self._init[name].get(part)
                shape = current.shape if current is not None else None
                if shape is not None and tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"{path}: initial {part} of {name!r} has shape {tuple(tensor.shape)}, the model "
                                     f"has {tuple(shape)}; resume with the adapter config of the original run.")
        device_of = {a.name: next(iter(a.components.values()))[0].device for a in self.adapters}
        self._init = {name: {k: t.to(device_of[name]) for k, t in parts.items()} for name, parts in restored.items()}
        self._groups = self._make_groups()
        return True

    def resume(self, step: int, checkpoint_dir: str | os.PathLike | None = None) -> None:
        """Continue the store after resuming from checkpoint-``step``: drop steps > step, restore B_0, A_0."""
        if checkpoint_dir is not None and not self.load_init_state(checkpoint_dir):
            logger.warning("No %s in %s: the update since init is measured from the weights at tracker creation.",
                           INIT_STATE_NAME, checkpoint_dir)
        if self.is_world_process_zero:
            self.store.truncate_after(int(step))

    def start_fresh(self) -> None:
        """Remove a store left by an earlier run in the same folder (a new run starting at step 0)."""
        if self.is_world_process_zero and self.store.steps:
            logger.warning("Replacing the spectral store %s of an earlier run (%d steps).", self.store.path,
                           len(self.store.steps))
            self.store.clear()

    # ---------------------------------------------------------------- logging
    @property
    def _params(self) -> list:
        # note: read from the modules each time: an engine may have replaced them (FSDP2's DTensors)
        return [p for a in self._spectral + self._vectors + self._dora for p in a.adapter_parameters()]

    @property
    def steps(self) -> list[int]:
        """Steps stored so far."""
        return self.store.steps if hasattr(self, "store") else [int(s) for s in self.data.step.values]

    def should_log(self, step: int) -> bool:
        """True at step 0 and every ``log_frequency`` steps."""
        return step % self.log_frequency == 0

    def log_step(self, step: int) -> xr.Dataset | None:
        """Compute one snapshot of the current weights, labelled ``step``, and append it to the store.

        Returns the snapshot (None on processes that do not write, or if ``step`` is already stored).
        With sharded parameters (ZeRO-3, FSDP2) every rank must call it: each module's factors are
        gathered in turn, global rank 0 computes and writes.
        """
        if not self.enabled:
            return None
        step = int(step)
        if sharding.distributed() and sharding.any_sharded(self._params):
            # every rank takes the same branch: the gathers below are collectives
            if sharding.broadcast_flag(self.is_world_process_zero and step in self.store.steps):
                return None
            if not self.is_world_process_zero:
                with materialized(self._spectral + self._vectors, keep=False):
                    pass
                for _ in walk(self._dora, with_base=True, compute=False):
                    pass
                return None
        elif not self.is_world_process_zero or step in self.store.steps:
            return None
        snapshot = self.snapshot(step)
        self.store.append(snapshot)
        self.last_scalars = self._scalars(snapshot)
        return snapshot

    def snapshot(self, step: int) -> xr.Dataset:
        """The Dataset of one step (dims step=1, layer, module, sv, sv_update), without storing it."""
        with torch.no_grad(), _one_cpu_thread(), materialized(self._spectral + self._vectors):
            return self._snapshot(step)

    def _snapshot(self, step: int) -> xr.Dataset:
        L, M = len(self.layers), len(self.modules)
        nan = np.nan
        values: dict[str, np.ndarray] = {}

        def var(name, *extra):
            if name not in values:
                values[name] = np.full((L, M, *extra), nan)
            return values[name]

        if self._spectral:
            sv, up = var("singular_values", self._n_sv), var("update_singular_values", self._n_update)
            metrics = {n: var(n) for n in sm.METRIC_NAMES}
            up_metrics = {n: var(f"update_{n}") for n in sm.METRIC_NAMES}
            scale, rank = var("scale"), var("rank")
            for g in self._groups:
                self._group_spectra(g, sv, up, metrics, up_metrics, scale, rank)
            for a in self._spectral:
                if not a.has_factors:
                    self._dense_spectra(a, sv, up, metrics, up_metrics, scale, rank)
        for a in walk(self._dora, with_base=True):  # W0 one module at a time when sharded
            self._dora_values(a, var)
        for a in self._adalora:
            cell = self._cell[a.name]
            var("rank_budget")[cell] = adalora_rank_budget(self.model, a)
            scores = adalora_importance_scores(self.model, a)
            target = var("importance_scores", self._n_sv)
            if scores is not None:
                scores = scores.double().cpu().numpy()[: self._n_sv]
                target[cell][: scores.size] = scores
        for a in self._vectors:
            out = sm.vector_metrics(a.vector(), self._init[a.name]["v0"])
            for name, value in out.items():
                var(name)[self._cell[a.name]] = float(value)
        return self._to_dataset(step, values)

    def _group_spectra(self, g: _Group, sv, up, metrics, up_metrics, scale, rank) -> None:
        facs = [m.factors() for m in g.members]
        B = torch.stack([f[0] for f in facs])
        A = torch.stack([f[1] for f in facs])
        s = torch.tensor([f[2] for f in facs], dtype=torch.float64, device=B.device)
        prod = sm.factored_singular_values(B, A, s)
        if g.init_zero:
            upd = torch.nn.functional.pad(prod, (0, min(B.shape[-2], A.shape[-1], 2 * B.shape[-1]) - prod.shape[-1]))
        else:
            B0 = torch.stack([self._init[m.name]["B0"] for m in g.members])
            A0 = torch.stack([self._init[m.name]["A0"] for m in g.members])
            upd = sm.update_singular_values(B, A, B0, A0, s)
        if not self.compute_full_svd:
            prod, upd = prod[..., : self.top_k], upd[..., : self.top_k]
        pm = {k: v.cpu().numpy() for k, v in sm.spectrum_metrics(prod, self.rtol).items()}
        um = {k: v.cpu().numpy() for k, v in sm.spectrum_metrics(upd, self.rtol).items()}
        prod, upd = prod.cpu().numpy(), upd.cpu().numpy()
        for j, (cell, m) in enumerate(zip(g.cells, g.members)):
            sv[cell][: prod.shape[-1]] = prod[j]
            up[cell][: upd.shape[-1]] = upd[j]
            for name in sm.METRIC_NAMES:
                metrics[name][cell] = pm[name][j]
                up_metrics[name][cell] = um[name][j]
            scale[cell] = facs[j][2]
            rank[cell] = m.rank

    def _dense_spectra(self, a: AdapterModule, sv, up, metrics, up_metrics, scale, rank) -> None:
        # MiSS "bat": no low-rank form; the top values of the dense delta
        if a.kind == "full":
            return self._full_spectra(a, sv, up, metrics, up_metrics, scale)
        cell = self._cell[a.name]
        delta = a.dense_delta()
        d0 = self._init[a.name].get("delta0")
        upd = sm.top_singular_values(delta if d0 is None else delta - d0, up.shape[-1])
        prod = upd[: sv.shape[-1]] if d0 is None else sm.top_singular_values(delta, sv.shape[-1])
        for target, mtarget, values in ((sv, metrics, prod), (up, up_metrics, upd)):
            target[cell][: values.numel()] = values.cpu().numpy()
            for name, value in sm.spectrum_metrics(values, self.rtol).items():
                mtarget[name][cell] = float(value)
        scale[cell], rank[cell] = 1.0, a.rank

    def _full_spectra(self, a: AdapterModule, sv, up, metrics, up_metrics, scale) -> None:
        # full fine-tuning: the update since init is the weight change; top-k by randomized SVD on the device
        cell = self._cell[a.name]
        if "W0" not in self._init[a.name]:
            raise RuntimeError(f"No initial weight of {a.name} on this process: build the SpectralTracker with "
                               "is_world_process_zero=True on the process that logs.")
        delta = a.components["weight"][0].detach() - self._init[a.name]["W0"]
        values = sm.lowrank_singular_values(delta.reshape(delta.shape[0], -1), sv.shape[-1],
                                            niter=FULL_SVD_NITER, seed=FULL_SVD_SEED)
        numbers = values.cpu().numpy()
        for name, value in sm.spectrum_metrics(values, self.rtol).items():
            metrics[name][cell] = up_metrics[name][cell] = float(value)
        sv[cell][: numbers.size] = numbers
        up[cell][: numbers.size] = numbers
        scale[cell] = 1.0

    def _dora_values(self, a: AdapterModule, var) -> None:
        b, a_, s = a.factors()
        out = sm.dora_metrics(a.base_weight(), b, a_, s, a.magnitude(), k=self._n_sv)
        cell = self._cell[a.name]
        for name in ("magnitude_norm", "direction_norm", "magnitude_direction_ratio"):
            var(name)[cell] = float(out[name])
        target = var("dora_update_singular_values", self._n_sv)
        vals = out["effective_update_singular_values"].cpu().numpy()
        target[cell][: vals.shape[-1]] = vals

    def _spectrum_sizes(self) -> tuple[int, int]:
        n_sv = n_up = 0
        for a in self._spectral:
            if a.kind == "full":
                w = a.components["weight"][0]
                k = min(self.full_top_k, w.shape[0], w[0].numel())
                n_sv, n_up = max(n_sv, k), max(n_up, k)
            elif a.has_factors:
                b, a_, _ = a.factors()
                m, k, n = b.shape[0], b.shape[1], a_.shape[1]
                n_sv, n_up = max(n_sv, min(m, n, k)), max(n_up, min(m, n, 2 * k))
            else:
                n_sv, n_up = max(n_sv, a.rank), max(n_up, 2 * a.rank)
        if not self.compute_full_svd:
            n_sv, n_up = min(n_sv, self.top_k), min(n_up, self.top_k)
        return n_sv, n_up

    def _to_dataset(self, step: int, values: dict[str, np.ndarray]) -> xr.Dataset:
        data_vars = {}
        for name, array in values.items():
            if array.ndim == 3:
                extra = ("sv_update",) if name.startswith("update_") else ("sv",)
            else:
                extra = ()
            static = name in ("scale", "rank")
            if static:
                data_vars[name] = (("layer", "module", *extra), array, self._var_attrs(name))
            else:
                data_vars[name] = (("step", "layer", "module", *extra), array[None], self._var_attrs(name))
        coords = {"step": [step], "layer": np.array(self.layers, dtype=np.int64),
                  "module": np.array(self.modules, dtype=object)}
        if self._spectral:
            coords["sv"] = np.arange(self._n_sv, dtype=np.int64)
            coords["sv_update"] = np.arange(self._n_update, dtype=np.int64)
        ds = xr.Dataset(data_vars, coords=coords, attrs=self.attrs)
        ds["step"].attrs.update(long_name="optimizer steps done", units="1", convention=STEP_CONVENTION)
        ds["layer"].attrs.update(long_name="transformer block index", units="1",
                                 description="-1: adapted modules outside the numbered blocks (e.g. the final norm)")
        ds["module"].attrs.update(long_name="module type within the block")
        if "sv" in ds.coords:
            ds["sv"].attrs.update(long_name="singular value index (0 = largest)", units="1")
        if "sv_update" in ds.coords:
            ds["sv_update"].attrs.update(long_name="singular value index of the update since init (0 = largest)", units="1")
        return ds

    def _var_attrs(self, name: str) -> dict:
        if self._full and (name in SPECTRUM_ATTRS or name.startswith("update_") or name in sm.METRIC_ATTRS):
            return self._full_var_attrs(name)
        if name in SPECTRUM_ATTRS:
            attrs = dict(SPECTRUM_ATTRS[name])
        elif name in EXTRA_ATTRS:
            attrs = dict(EXTRA_ATTRS[name])
        else:
            base = name[len("update_"):] if name.startswith("update_") else name
            attrs = dict(sm.METRIC_ATTRS[base])
            which = "the update since init" if name.startswith("update_") else "the adapter product s*B*A"
            attrs["long_name"] = f"{attrs['long_name']} of {which}"
            attrs["rtol"] = self.rtol
            if not self.compute_full_svd:
                attrs["note"] = f"computed from the top {self.top_k} singular values only"
        return attrs

    def _full_var_attrs(self, name: str) -> dict:
        what = f"top {self.full_top_k} singular values of the full fine-tuning update since init W_t - W_0"
        if name in SPECTRUM_ATTRS:
            return {"long_name": what, "units": "weight units", "formula": FULL_SVD_FORMULA,
                    "description": "W_t - W_0 is full rank: only the top values are kept; singular_values and "
                                   "update_singular_values are the same (the weight change is the update)"}
        base = name[len("update_"):] if name.startswith("update_") else name
        attrs = dict(sm.METRIC_ATTRS[base])
        attrs["long_name"] = f"{attrs['long_name']} of the update since init W_t - W_0"
        attrs["rtol"] = self.rtol
        attrs["note"] = f"computed from the {what} only"
        return attrs

    # ---------------------------------------------------------------- attrs, summaries
    def _global_attrs(self, run_attrs: dict, max_layers: int | None) -> dict:
        config = peft_config_of(self.model).get(self.adapter_name)
        targets = getattr(config, "target_modules", None)
        if isinstance(targets, (set, frozenset, list, tuple)):
            targets = sorted(str(t) for t in targets)
        scales = {round(float(m.factors()[2]), 12) for m in self._spectral if m.has_factors}
        try:
            from importlib.metadata import version

            perl_version = version("perl")
        except Exception:  # noqa: BLE001 - not installed as a distribution
            perl_version = "unknown"
        base = getattr(self.model, "base_model", self.model)
        model_config = getattr(getattr(base, "model", base), "config", None)
        attrs = {
            "title": "PeRL spectral history",
            "Conventions": "CF-1.8",
            "peft_type": self.peft_type,
            "adapter_name": self.adapter_name,
            "r": getattr(config, "init_r", None) if self._adalora else getattr(config, "r", None),
            "lora_alpha": getattr(config, "lora_alpha", None),
            "scaling": scales.pop() if len(scales) == 1 else None,
            "target_modules": targets,
            "model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
            "seed": None,
            "config_yaml": None,
            "perl_version": perl_version,
            "step_convention": STEP_CONVENTION,
            "compute_full_svd": int(self.compute_full_svd),
            "top_k": self.top_k if not self.compute_full_svd else None,
            "max_layers_to_track": max_layers,
            "numerical_rank_rtol": self.rtol,
            "missing_values": "NaN: module not adapted by this method, index past the module's rank, or quantity undefined",
        }
        if self._full:
            attrs.update(full_finetuning_top_k=self.full_top_k, full_finetuning_svd=FULL_SVD_FORMULA,
                         full_finetuning_target_modules=sorted({a.module for a in self._full}))
        attrs.update(run_attrs)
        return {k: v for k, v in attrs.items() if v is not None}

    def _scalars(self, snapshot: xr.Dataset) -> dict[str, float]:
        """Scalars for the Trainer's logs: mean/min/max over all modules and the mean per module
        type of effective rank and condition number, and the mean of a few others."""
        out: dict[str, float] = {"spectral/step": float(snapshot.step.values[0])}

        def finite(da):
            vals = np.asarray(da.values, dtype=float)
            return vals[np.isfinite(vals)]

        for metric in ("effective_rank", "condition_number"):
            if metric not in snapshot:
                continue
            da = snapshot[metric].isel(step=0)
            vals = finite(da)
            if vals.size:
                out.update({f"spectral/{metric}/mean": float(vals.mean()), f"spectral/{metric}/min": float(vals.min()),
                            f"spectral/{metric}/max": float(vals.max())})
            for module in self.modules:
                vals = finite(da.sel(module=module))
                if vals.size:
                    out[f"spectral/{metric}/{module}"] = float(vals.mean())
        for metric in ("update_frobenius_norm", "update_effective_rank", "magnitude_direction_ratio",
                       "vector_distance_from_init", "rank_budget"):
            if metric in snapshot:
                vals = finite(snapshot[metric])
                if vals.size:
                    out[f"spectral/{metric}/mean"] = float(vals.mean())
        return out

    def save(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write ``spectral_history_summary.json`` and the consolidated final file.

        Args:
            path (str | Path, optional): final file; default ``<save_dir>/spectral_history_final.nc``.
        Returns the final path (None on non-writing processes or when nothing was logged).
        """
        if not self.is_world_process_zero or not self.store.steps:
            return None
        summary = self.get_summary_stats()
        summary_path = self.store.path.with_name(SUMMARY_NAME)
        tmp = summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_jsonable(summary), indent=2))
        os.replace(tmp, summary_path)
        return self.store.finalize(Path(path) if path else self.save_dir / FINAL_NAME)

    # ---------------------------------------------------------------- reading
    @classmethod
    def load(cls, path: str | os.PathLike) -> "SpectralTracker":
        """A read-only tracker over a stored history: a ``.nc`` file (final or live) or a run folder.

        The returned object has ``.data`` and the analysis methods; it cannot log.
        """
        path = Path(path)
        if path.is_dir():
            for candidate in (path / FINAL_NAME, path / SPECTRAL_DIR / STORE_NAME, path / STORE_NAME):
                if candidate.is_file():
                    path = candidate
                    break
            else:
                raise FileNotFoundError(f"No spectral history in {path}: expected {FINAL_NAME} or "
                                        f"{SPECTRAL_DIR}/{STORE_NAME}; was spectral tracking enabled for this run?")
        obj = cls.__new__(cls)
        obj._data = RunStore.open(path)
        obj.model = None
        obj.modules = [str(m) for m in obj._data.module.values]
        obj.layers = [int(l) for l in obj._data.layer.values]
        obj.is_world_process_zero = False
        return obj

    @property
    def data(self) -> xr.Dataset:
        """The whole history as an xarray Dataset (read from the store for a live tracker)."""
        if self._data is not None:
            return self._data
        return self.store.read()

    def get_layer_history(self, layer_name: str) -> xr.Dataset:
        """Every variable over steps for one module, e.g. ``"model.layers.0.self_attn.q_proj"``."""
        ds = self.data
        match = re.search(r"(?:^|\.)(\d+)\.(.+)$", layer_name)
        if match:
            layer, rest = int(match.group(1)), match.group(2)
        else:
            layer, rest = -1, layer_name.rsplit(".", 1)[-1]
        modules = [str(m) for m in ds.module.values]
        module = rest if rest in modules else rest.rsplit(".", 1)[-1]
        if layer not in ds.layer.values or module not in modules:
            raise KeyError(f"No tracked module {layer_name!r}: tracked layers are {[int(x) for x in ds.layer.values]} "
                           f"and modules {modules}, e.g. 'model.layers.{int(ds.layer.values[-1])}.self_attn.{modules[0]}'.")
        return ds.sel(layer=layer, module=module)

    def get_metric_across_layers(self, metric: str, step_idx: int = -1) -> xr.DataArray:
        """``metric`` over (layer, module) at the ``step_idx``-th stored step (default the last)."""
        ds = self.data
        if metric not in ds.data_vars:
            raise KeyError(f"Unknown metric {metric!r}; stored variables: {sorted(ds.data_vars)}.")
        if "step" not in ds[metric].dims:
            return ds[metric]
        return ds[metric].isel(step=step_idx)

    def get_summary_stats(self) -> dict:
        """JSON-ready summary: steps, run attrs, and per metric the first/last-step mean, min, max
        over all modules and the last-step mean per module type."""
        ds = self.data
        steps = [int(s) for s in ds.step.values]
        summary = {
            "peft_type": ds.attrs.get("peft_type"),
            "num_snapshots": len(steps),
            "steps": steps,
            "layers": [int(x) for x in ds.layer.values],
            "modules": [str(m) for m in ds.module.values],
            "attrs": {k: v for k, v in ds.attrs.items() if k != "config_yaml"},
            "metrics": {},
        }
        if not steps:
            return summary
        for name, da in ds.data_vars.items():
            if "step" not in da.dims or {"sv", "sv_update"} & set(da.dims):
                continue
            entry = {}
            for label, idx in (("first", 0), ("last", -1)):
                vals = da.isel(step=idx).values
                finite = vals[np.isfinite(vals)]
                entry[label] = ({"step": steps[idx], "mean": float(finite.mean()), "min": float(finite.min()),
                                 "max": float(finite.max())} if finite.size else {"step": steps[idx]})
            last = da.isel(step=-1)
            entry["last_by_module"] = {str(m): _finite_mean(last.sel(module=m).values) for m in ds.module.values}
            summary["metrics"][name] = entry
        return summary


# -------------------------------------------------------------------- helpers
def _finite_mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _jsonable(value):
    """Plain JSON types; NaN and Inf become null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


@contextlib.contextmanager
def _one_cpu_thread():
    """Run CPU linear algebra on one thread, then restore the setting.

    The snapshot is hundreds of small LAPACK calls (QR of n x r factors): intra-op threads gain
    little on them, and on a shared CPU OpenMP's spin-waiting made them up to 60x slower (measured
    with benchmarks/spectral_snapshot.py: 9.8 s with 2 threads vs 0.16 s with 1 on a loaded 2-core
    machine). GPU work is unaffected.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _is_rank_zero() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _derive_peft_type(model, adapter: str) -> str:
    config = peft_config_of(model).get(adapter)
    if config is None:
        return "unknown"
    kind = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    if kind == "lora":
        init = getattr(config, "init_lora_weights", True)
        if getattr(config, "use_dora", False):
            return "dora"
        if isinstance(init, str) and init.lower().startswith("pissa"):
            return "pissa"
        if getattr(config, "use_rslora", False):
            return "rslora"
    return kind
