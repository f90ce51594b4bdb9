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

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .. import __version__
from ..fileio import atomic_write_text
from . import spectral_math as sm
from .adalora_state import adalora_importance_scores, adalora_rank_budget
from .discovery import (
    FACTORED_KINDS,
    AdapterModule,
    _derive_peft_type,
    adapter_rank,
    discover_adapters,
    discover_full_weights,
    materialized,
    parameters_to_gather,
    peft_config_of,
    target_modules_of,
    walk,
)
from .sharding import _is_rank_zero, full_shape
from .snapshots import INIT_STATE_NAME, StoreLifecycle, load_init_tensors, log_snapshot, save_init_tensors
from .spectral_history import FINAL_NAME, SPECTRAL_DIR, STORE_NAME, SUMMARY_NAME, SpectralHistory, _jsonable
from .spectral_math import _column_major, _one_cpu_thread
from .spectral_schema import (
    EXTRA_ATTRS,
    FULL_SVD_FORMULA,
    FULL_SVD_NITER,
    FULL_SVD_SEED,
    SPECTRUM_ATTRS,
    STEP_CONVENTION,
    store_grid,
)
from .store import RunStore

logger = logging.getLogger("perl")

__all__ = ["SpectralTracker", "SPECTRAL_DIR", "STORE_NAME", "SUMMARY_NAME", "FINAL_NAME", "INIT_STATE_NAME"]


@dataclass
class _Group:
    """Modules whose factors have equal shapes: their spectra are one batched call."""

    members: list[AdapterModule]
    cells: list[tuple[int, int]]
    init_zero: bool  # B_0 A_0 = 0 for every member: the update is the product
    dtype: torch.dtype = torch.float64  # of the QRs: float32 for float32 (or narrower) factors
    init: tuple | None = None  # stacked B_0, A_0 and their QR bases (sm.init_bases), when init_zero is False


class SpectralTracker(StoreLifecycle, SpectralHistory):
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

    _store_kind = "spectral"
    _init_state_name = INIT_STATE_NAME
    _without_init = "the update since init is measured from the weights at tracker creation."

    def __init__(
        self,
        model,
        log_frequency: int = 100,
        save_dir: str | os.PathLike = ".",
        peft_type: str | None = None,
        compute_full_svd: bool = True,
        max_layers_to_track: int | None = None,
        top_k: int = 8,
        run_attrs: dict | None = None,
        is_world_process_zero: bool | None = None,
        adapter_name: str | None = None,
        rtol: float = sm.DEFAULT_RTOL,
        target_modules=None,
        full_top_k: int = 16,
    ):
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
        self._loaded: xr.Dataset | None = None

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
        self.layers, self.modules, self._cell = store_grid(self.adapters)

        tracked = self.adapters if self.enabled else []
        self._spectral = [a for a in tracked if a.kind in FACTORED_KINDS + ("full",)]
        self._full = [a for a in tracked if a.kind == "full"]
        self._dense = [a for a in self._spectral if not a.has_factors]  # full, MiSS "bat": read in a walk
        self._vectors = [a for a in tracked if a.kind in ("ia3", "ln_tuning")]
        self._dora = [a for a in tracked if a.is_dora]
        self._adalora = [a for a in tracked if a.kind == "adalora"]
        # note: a model sharded before the tracker exists (zero.Init, fully_shard) is read through gathered copies
        with materialized(self._spectral + self._vectors):
            self._capture_init()
            self._n_sv, self._n_update = self._spectrum_sizes()
            self.peft_type = peft_type or ("full" if self._full else _derive_peft_type(self.model, self.adapter_name))
            self.attrs = self._global_attrs(run_attrs or {}, max_layers_to_track)
        # note: spectra of float32 (or narrower) weights are stored as float32: the rest is rounding noise
        narrow = all(
            t.dtype.itemsize <= 4
            for a in tracked
            for ts in a.components.values()
            for t in ts
            if torch.is_tensor(t) and t.is_floating_point()
        )
        self.store = RunStore(self.save_dir / SPECTRAL_DIR / STORE_NAME, attrs=self.attrs, float32=narrow)

    # ---------------------------------------------------------------- initial state
    def _capture_init(self) -> None:
        """Copies of what the update since init needs: B_0, A_0 (factored), delta_0 (dense), v_0."""
        self._init: dict[str, dict[str, torch.Tensor]] = {}
        self._factor_meta: dict[str, tuple] = {}
        with torch.no_grad():
            for a in self._spectral:
                self._init[a.name] = {}
                if a.has_factors:
                    b, a_, _ = a.factors()
                    self._factor_meta[a.name] = (tuple(b.shape), tuple(a_.shape), b.dtype, str(b.device))
                    # B_0 A_0 = 0 (plain LoRA): nothing to keep, the update is the product
                    if b.any() and a_.any():
                        self._init[a.name] = {"B0": b.detach().clone(), "A0": a_.detach().clone()}
            # note: one module at a time when sharded; kept on the process that computes the spectra only
            for a in walk(self._dense, with_base=True, compute=self.is_world_process_zero):
                if a.kind == "full":  # the one copy of the targeted weights that full fine-tuning tracking costs
                    self._init[a.name] = {"W0": a.weight().clone()}
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
        groups = []
        for key, members in by_shape.items():
            # note: float32 QRs are ~10x faster on a CPU than float64 ones, within 1e-6 of sigma_1 (measured)
            g = _Group(
                members,
                [self._cell[m.name] for m in members],
                key[-1],
                torch.float32 if key[2].itemsize <= 4 else torch.float64,
            )
            if not g.init_zero:
                B0 = _column_major([self._init[m.name]["B0"] for m in members])
                A0 = torch.stack([self._init[m.name]["A0"] for m in members])
                for i, m in enumerate(members):  # views of the stacked copies: B_0, A_0 are held once
                    self._init[m.name].update(B0=B0[i], A0=A0[i])
                g.init = (B0, A0, sm.init_bases(B0, A0, g.dtype))
            groups.append(g)
        return groups

    def save_init_state(self, directory: str | os.PathLike) -> Path | None:
        """Write the initial factors into ``directory`` (a checkpoint) as safetensors, for resume."""
        if not self.is_world_process_zero:
            return None
        zero_init = json.dumps(sorted(n for n, d in self._init.items() if not d))
        return save_init_tensors(self._init, Path(directory), "spectral", zero_init=zero_init)

    def load_init_state(self, directory: str | os.PathLike) -> bool:
        """Restore the initial factors saved by :meth:`save_init_state`; False if there is no file.

        A file that does not match the model (other modules or shapes) is refused with a clear error.
        """
        expected = {name: {part: tuple(t.shape) for part, t in d.items()} for name, d in self._init.items()}
        restored = load_init_tensors(Path(directory), "spectral", expected)
        if restored is None:
            return False
        device_of = {a.name: next(iter(a.components.values()))[0].device for a in self.adapters}
        self._init = {name: {k: t.to(device_of[name]) for k, t in parts.items()} for name, parts in restored.items()}
        self._groups = self._make_groups()
        return True

    # ---------------------------------------------------------------- logging
    @property
    def _params(self) -> list:
        # note: read from the modules each time: an engine may have replaced them (FSDP2's DTensors)
        tracked = self._spectral + self._vectors
        return [p for a in tracked for p in parameters_to_gather(a)] + [
            p for a in self._dora for p in parameters_to_gather(a, with_base=True)
        ]

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
        return log_snapshot(self, step, self.snapshot)

    def _take_part(self) -> None:
        """A rank that does not write: the same gathers as :meth:`snapshot`, in the same order."""
        with materialized(self._spectral + self._vectors, keep=False):
            for _ in walk(self._dense, with_base=True, compute=False):
                pass
        for _ in walk(self._dora, with_base=True, compute=False):
            pass

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
            for a in walk(self._dense, with_base=True):  # one module at a time when sharded
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
        B = _column_major([f[0] for f in facs])
        A = torch.stack([f[1] for f in facs])
        s = torch.tensor([f[2] for f in facs], dtype=torch.float64, device=B.device)
        if g.init_zero:
            prod = sm.factored_singular_values(B, A, s, dtype=g.dtype)
            upd = torch.nn.functional.pad(prod, (0, min(B.shape[-2], A.shape[-1], 2 * B.shape[-1]) - prod.shape[-1]))
        else:
            B0, A0, bases = g.init
            prod, upd = sm.product_and_update_singular_values(B, A, B0, A0, s, bases=bases, dtype=g.dtype)
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
            raise RuntimeError(
                f"No initial weight of {a.name} on this process: build the SpectralTracker with "
                "is_world_process_zero=True on the process that logs."
            )
        delta = a.weight() - self._init[a.name]["W0"]
        values = sm.lowrank_singular_values(
            delta.reshape(delta.shape[0], -1), sv.shape[-1], niter=FULL_SVD_NITER, seed=FULL_SVD_SEED
        )
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
                shape = full_shape(a.peft_module.weight)
                k = min(self.full_top_k, shape[0], int(np.prod(shape[1:])))
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
        coords = {
            "step": [step],
            "layer": np.array(self.layers, dtype=np.int64),
            "module": np.array(self.modules, dtype=object),
        }
        if self._spectral:
            coords["sv"] = np.arange(self._n_sv, dtype=np.int64)
            coords["sv_update"] = np.arange(self._n_update, dtype=np.int64)
        ds = xr.Dataset(data_vars, coords=coords, attrs=self.attrs)
        ds["step"].attrs.update(long_name="optimizer steps done", units="1", convention=STEP_CONVENTION)
        ds["layer"].attrs.update(
            long_name="transformer block index",
            units="1",
            description="-1: adapted modules outside the numbered blocks (e.g. the final norm)",
        )
        ds["module"].attrs.update(long_name="module type within the block")
        if "sv" in ds.coords:
            ds["sv"].attrs.update(long_name="singular value index (0 = largest)", units="1")
        if "sv_update" in ds.coords:
            ds["sv_update"].attrs.update(
                long_name="singular value index of the update since init (0 = largest)", units="1"
            )
        return ds

    def _var_attrs(self, name: str) -> dict:
        if self._full and (name in SPECTRUM_ATTRS or name.startswith("update_") or name in sm.METRIC_ATTRS):
            return self._full_var_attrs(name)
        if name in SPECTRUM_ATTRS:
            attrs = dict(SPECTRUM_ATTRS[name])
        elif name in EXTRA_ATTRS:
            attrs = dict(EXTRA_ATTRS[name])
        else:
            base = name[len("update_") :] if name.startswith("update_") else name
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
            return {
                "long_name": what,
                "units": "weight units",
                "formula": FULL_SVD_FORMULA,
                "description": "W_t - W_0 is full rank: only the top values are kept; singular_values and "
                "update_singular_values are the same (the weight change is the update)",
            }
        base = name[len("update_") :] if name.startswith("update_") else name
        attrs = dict(sm.METRIC_ATTRS[base])
        attrs["long_name"] = f"{attrs['long_name']} of the update since init W_t - W_0"
        attrs["rtol"] = self.rtol
        attrs["note"] = f"computed from the {what} only"
        return attrs

    # ---------------------------------------------------------------- attrs, summaries
    def _global_attrs(self, run_attrs: dict, max_layers: int | None) -> dict:
        config = peft_config_of(self.model).get(self.adapter_name)
        targets = target_modules_of(config)
        scales = {round(float(m.factors()[2]), 12) for m in self._spectral if m.has_factors}
        base = getattr(self.model, "base_model", self.model)
        model_config = getattr(getattr(base, "model", base), "config", None)
        attrs = {
            "title": "PeRL spectral history",
            "Conventions": "CF-1.8",
            "peft_type": self.peft_type,
            "adapter_name": self.adapter_name,
            "r": adapter_rank(config),
            "lora_alpha": getattr(config, "lora_alpha", None),
            "scaling": scales.pop() if len(scales) == 1 else None,
            "target_modules": targets,
            "model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
            "seed": None,
            "config_yaml": None,
            "perl_version": __version__,
            "step_convention": STEP_CONVENTION,
            "compute_full_svd": int(self.compute_full_svd),
            "top_k": self.top_k if not self.compute_full_svd else None,
            "max_layers_to_track": max_layers,
            "numerical_rank_rtol": self.rtol,
            "missing_values": "NaN: module not adapted by this method, index past the module's rank, or quantity undefined",
        }
        if self._full:
            attrs.update(
                full_finetuning_top_k=self.full_top_k,
                full_finetuning_svd=FULL_SVD_FORMULA,
                full_finetuning_target_modules=sorted({a.module for a in self._full}),
            )
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
                out.update(
                    {
                        f"spectral/{metric}/mean": float(vals.mean()),
                        f"spectral/{metric}/min": float(vals.min()),
                        f"spectral/{metric}/max": float(vals.max()),
                    }
                )
            for module in self.modules:
                vals = finite(da.sel(module=module))
                if vals.size:
                    out[f"spectral/{metric}/{module}"] = float(vals.mean())
        for metric in (
            "update_frobenius_norm",
            "update_effective_rank",
            "magnitude_direction_ratio",
            "vector_distance_from_init",
            "rank_budget",
        ):
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
        atomic_write_text(summary_path, json.dumps(_jsonable(summary), indent=2))
        return self.store.finalize(Path(path) if path else self.save_dir / FINAL_NAME)
