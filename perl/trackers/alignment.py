"""AlignmentTracker: where each adapter's update lives relative to its frozen base weight, per step x layer x module.

Once per run (at the first snapshot, lazily, so that a resumed run first restores its initial
factors) the tracker takes the SVD of every adapted base weight W0 and keeps its top-k and bottom-k
singular vectors (k = ``top_k``, default 2r). W0 is the layer's effective weight at initialisation,
``W_base + s B_0 A_0``: the base weight itself when B_0 A_0 = 0, and for PiSSA / MiLoRA the weight
before their residual split (``W_res + s B_0 A_0``). Singular values go into the store as static
variables, singular vectors into ``alignment_logs/base_svd.safetensors`` (float32; reused on resume
when the weights match), and are kept in CPU memory.

At every logged step it computes from the factored update since init ``dW = s (B_t A_t - B_0 A_0)``
(see :mod:`perl.trackers.alignment_math`; never the m x n product) the energy fractions of dW in
W0's top-k / bottom-k left / right subspaces, the principal angle cosines between dW's column
space and W0's top-k left space, and the LoRA paper's amplification factor. At a lower frequency
(``intruder_log_frequency`` and at the final step) it counts intruder dimensions, which needs the
top singular vectors of the dense m x n tuned weight ``W_base + s B_t A_t``.

Cost (measured by ``benchmarks/alignment_snapshot.py`` at Qwen2.5-1.5B shapes):
- base SVD, once: a full float64 SVD per weight, O(m n p) (p = min(m, n)); weights with
  ``p > full_svd_max_dim`` get ``torch.svd_lowrank`` for the top-k and no bottom-k / intruders
  (a randomized range finder only resolves the largest values; stated in the attrs).
- alignment snapshot: factored O((m + n) r (r + k)) per module, plus one dense ``W0 @ V_dW``
  (O(m n r)) for the amplification factor.
- intruder snapshot: the top-k left singular vectors of each dense tuned weight (eigendecomposition
  of its smaller Gram matrix, float64), O(m n p), against W0's full left basis, kept
  in memory up to ``intruder_cache_mb`` and recomputed (another SVD) for modules past the budget.

Methods: LoRA family, AdaLoRA, VeRA and MiSS (low-rank forms). DoRA: dW is the update of the LoRA
direction ``s B A``; its magnitude rescaling is not part of dW. Modules without a low-rank form
(MiSS ``bat``) and vector methods (IA3, LayerNorm tuning) are NaN (listed in the ``not_tracked`` attr).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .. import __version__
from . import alignment_math as am
from .alignment_base import _BaseSubspaces
from .alignment_schema import (
    _DW,
    ALIGNMENT_ATTRS,
    ALIGNMENT_DIR,
    BASE_SVD_NAME,
    EXTRA_DIM,
    FINAL_NAME,
    INTRUDER_VARS,
    STATIC,
    STORE_NAME,
)
from .callbacks import SpectralTrackingCallback
from .discovery import (
    FACTORED_KINDS,
    AdapterModule,
    _derive_peft_type,
    adapter_rank,
    discover_adapters,
    materialized,
    peft_config_of,
    target_modules_of,
    walk,
)
from .sharding import _is_rank_zero
from .snapshots import INIT_STATE_NAME, StoreLifecycle, load_init_tensors, log_snapshot, save_init_tensors
from .spectral_schema import STEP_CONVENTION, store_grid
from .store import RunStore

logger = logging.getLogger("perl")

__all__ = [
    "AlignmentTracker",
    "AlignmentTrackingCallback",
    "ALIGNMENT_DIR",
    "STORE_NAME",
    "FINAL_NAME",
    "BASE_SVD_NAME",
    "INIT_STATE_NAME",
    "ALIGNMENT_ATTRS",
]


@dataclass
class _Group:
    """Modules with equal factor shapes: their factored metrics are one batched call."""

    members: list[AdapterModule]
    cells: list[tuple[int, int]]
    init_zero: bool
    m: int
    n: int
    k: int
    n_angle: int
    randomized: bool
    U_top: torch.Tensor | None = None  # (G, m, k) float32, CPU
    V_top: torch.Tensor | None = None
    U_bottom: torch.Tensor | None = None
    V_bottom: torch.Tensor | None = None


class AlignmentTracker(StoreLifecycle, _BaseSubspaces):
    """Records how each adapter's update aligns with its base weight's singular subspaces.

    Usage:
        tracker = AlignmentTracker(peft_model, log_frequency=10, save_dir="runs/x", intruder_log_frequency=50)
        tracker.log_step(0)                  # base SVD (once) + step 0 (zero update: NaN fractions)
        ...                                  # train; log_step(s) every 10 steps, intruders every 50
        tracker.log_step(final_step, final=True)
        tracker.save()                       # runs/x/alignment_final.nc
        ds = tracker.data                    # dims step, layer, module (+ angle, intruder_sv, base_sv)
        ds.energy_fraction_top_left.sel(module="q_proj").plot()

    Args:
        model (nn.Module): a peft model (LoRA family, AdaLoRA, VeRA, MiSS; others are NaN).
        log_frequency (int, defaults to 100): alignment snapshot every N optimizer steps.
        save_dir (str | Path, defaults to "."): tracking folder; the store goes to
            ``<save_dir>/alignment_logs/alignment_history.nc``.
        top_k (int, optional): k of the top-k / bottom-k subspaces; default 2r per module (clipped to min(m, n)).
        intruder_log_frequency (int, optional): intruder snapshot every N steps (and at the final
            step); default 10 x ``log_frequency``; 0 = never.
        intruder_epsilon (float, defaults to 0.5): cosine threshold of an intruder dimension.
        full_svd_max_dim (int, defaults to 4096): weights with min(m, n) above it get a randomized
            top-k SVD only (no bottom-k, no intruders).
        randomized_niter (int, defaults to 6): power iterations of the randomized SVD.
        intruder_cache_mb (float, defaults to 4096): CPU memory for W0's full left bases (float32;
            3.9 GB for all of Qwen2.5-1.5B's 196 weights); modules past it recompute their basis (one
            more dense SVD each) at each intruder snapshot.
        save_base_svd (bool, defaults to True): write W0's top/bottom singular vectors to
            ``alignment_logs/base_svd.safetensors`` (about 300 MB float32 at 1.5B, r=16).
        peft_type (str, optional): method label for the attrs; default derived from the peft config.
        max_layers_to_track (int, optional): evenly spaced blocks incl. the first and the last.
        run_attrs (dict, optional): global attrs of the run (seed, config_yaml, ...).
        is_world_process_zero (bool, optional): whether this process writes; default global rank 0.
        adapter_name (str, optional): adapter to track; default the active one.
        rtol (float, defaults to 1e-6): numerical rank of dW, relative to its sigma_1.
    """

    _store_kind = "alignment"
    _init_state_name = INIT_STATE_NAME
    _without_init = (
        "the update since init (and, for PiSSA/MiLoRA, W0) is measured from the weights at tracker creation."
    )

    def __init__(
        self,
        model,
        log_frequency: int = 100,
        save_dir: str | os.PathLike = ".",
        top_k: int | None = None,
        intruder_log_frequency: int | None = None,
        intruder_epsilon: float = am.DEFAULT_EPSILON,
        full_svd_max_dim: int = 4096,
        randomized_niter: int = 6,
        intruder_cache_mb: float = 4096.0,
        save_base_svd: bool = True,
        peft_type: str | None = None,
        max_layers_to_track: int | None = None,
        run_attrs: dict | None = None,
        is_world_process_zero: bool | None = None,
        adapter_name: str | None = None,
        rtol: float = am.DEFAULT_RTOL,
    ):
        if int(log_frequency) < 1:
            raise ValueError(f"log_frequency must be a positive integer, got {log_frequency}.")
        if top_k is not None and int(top_k) < 1:
            raise ValueError(f"alignment top_k must be a positive integer or None (= 2r), got {top_k}.")
        if intruder_log_frequency is not None and int(intruder_log_frequency) < 0:
            raise ValueError(f"intruder_log_frequency must be >= 0 (0 = never), got {intruder_log_frequency}.")
        if not 0.0 < float(intruder_epsilon) <= 1.0:
            raise ValueError(f"intruder_epsilon is a cosine threshold in (0, 1], got {intruder_epsilon}.")
        self.model = getattr(model, "module", model)
        self.log_frequency = int(log_frequency)
        self.intruder_log_frequency = (
            10 * self.log_frequency if intruder_log_frequency is None else int(intruder_log_frequency)
        )
        self.save_dir = Path(save_dir)
        self.top_k = None if top_k is None else int(top_k)
        self.epsilon = float(intruder_epsilon)
        self.full_svd_max_dim = int(full_svd_max_dim)
        self.randomized_niter = int(randomized_niter)
        self.intruder_cache_bytes = float(intruder_cache_mb) * 2**20
        self.save_base_svd = bool(save_base_svd)
        self.rtol = float(rtol)
        self.is_world_process_zero = _is_rank_zero() if is_world_process_zero is None else bool(is_world_process_zero)
        self.last_scalars: dict[str, float] = {}
        self.base_svd_seconds: float | None = None

        self.adapters = discover_adapters(self.model, adapter_name, max_layers_to_track)
        self.adapter_name = self.adapters[0].adapter
        self.layers, self.modules, self._cell = store_grid(self.adapters)
        self._tracked = [a for a in self.adapters if a.kind in FACTORED_KINDS and a.has_factors]
        self.not_tracked = [a.name for a in self.adapters if a not in self._tracked]
        # note: sharded parameters (ZeRO-3, FSDP2) are gathered one module at a time at snapshots
        self.enabled = bool(self._tracked)
        if not self._tracked:
            logger.warning(
                "Alignment tracking needs low-rank adapter factors (LoRA family, AdaLoRA, VeRA, MiSS, "
                "HRA, SliceFine); "
                "this model has none (%s): nothing will be recorded.",
                self.adapters[0].kind,
            )
        with materialized(self._tracked):
            self._capture_init()
        self.peft_type = peft_type or _derive_peft_type(self.model, self.adapter_name)
        self.attrs = self._global_attrs(run_attrs or {}, max_layers_to_track)
        self.store = RunStore(self.save_dir / ALIGNMENT_DIR / STORE_NAME, attrs=self.attrs)

    @classmethod
    def from_config(
        cls, tracker_config, model, save_dir, peft_type: str | None = None, run_attrs: dict | None = None
    ) -> AlignmentTracker:
        """Build from ``config.tracker`` (knobs read with getattr defaults, see the class Args)."""
        tc = tracker_config

        def knob(name, default):
            value = getattr(tc, name, default)
            return default if value is None and default is not None else value

        return cls(
            model,
            log_frequency=knob("alignment_log_frequency", 100),
            save_dir=save_dir,
            top_k=knob("alignment_top_k", None),
            intruder_log_frequency=knob("intruder_log_frequency", None),
            intruder_epsilon=knob("intruder_epsilon", am.DEFAULT_EPSILON),
            full_svd_max_dim=knob("alignment_full_svd_max_dim", 4096),
            intruder_cache_mb=knob("intruder_cache_mb", 4096.0),
            save_base_svd=knob("alignment_save_base_svd", True),
            peft_type=peft_type,
            max_layers_to_track=getattr(tc, "max_layers_to_track", None),
            run_attrs=run_attrs,
        )

    # ---------------------------------------------------------------- initial state
    def _capture_init(self) -> None:
        """B_0, A_0 (CPU copies) of modules whose initial product is not zero, and each module's scale."""
        self._init: dict[str, dict[str, torch.Tensor]] = {}
        self._scale: dict[str, float] = {}
        self._shapes: dict[str, tuple] = {}
        with torch.no_grad():
            for a in self._tracked:
                b, a_, s = a.factors()
                self._scale[a.name] = float(s)
                self._shapes[a.name] = (tuple(b.shape), tuple(a_.shape))
                self._init[a.name] = (
                    {}
                    if not (b.any() and a_.any())
                    else {"B0": b.detach().cpu().clone(), "A0": a_.detach().cpu().clone()}
                )
        self._reset_base()

    def _reset_base(self) -> None:
        self._groups = self._make_groups()
        self._base_ready = False
        self._basis_cache: dict[str, torch.Tensor] = {}
        self._cache_used = 0
        self._static: dict[str, np.ndarray] = {}

    def _make_groups(self) -> list[_Group]:
        by_key: dict[tuple, list[AdapterModule]] = {}
        for a in self._tracked:
            (m, r), (_, n) = self._shapes[a.name]  # note: the live parameters may be partitioned by now
            k = min(self.top_k or 2 * int(a.rank or r), m, n)
            by_key.setdefault((m, r, n, k, not self._init[a.name]), []).append(a)
        groups = []
        for (m, r, n, k, zero), members in by_key.items():
            width = min(m, n, r if zero else 2 * r)
            groups.append(
                _Group(
                    members,
                    [self._cell[x.name] for x in members],
                    zero,
                    m,
                    n,
                    k,
                    min(k, width),
                    min(m, n) > self.full_svd_max_dim,
                )
            )
        return groups

    @property
    def _k_max(self) -> int:
        return max((g.k for g in self._groups), default=0)

    @property
    def _n_angle(self) -> int:
        return max((g.n_angle for g in self._groups), default=0)

    def save_init_state(self, directory: str | os.PathLike) -> Path | None:
        """Write the initial factors into ``directory`` (a checkpoint) as safetensors, for resume."""
        if not self.is_world_process_zero or not self.enabled:
            return None
        return save_init_tensors(self._init, Path(directory), "alignment")

    def load_init_state(self, directory: str | os.PathLike) -> bool:
        """Restore the initial factors saved by :meth:`save_init_state`; False if there is no file."""
        expected = {name: {"B0": b, "A0": a} for name, (b, a) in self._shapes.items()}
        restored = load_init_tensors(Path(directory), "alignment", expected)
        if restored is None:
            return False
        self._init = restored
        self._reset_base()
        return True

    def start_fresh(self) -> None:
        """Remove the store and base-SVD file an earlier run left in the same folder."""
        super().start_fresh()
        if self.is_world_process_zero:
            (self.store.path.parent / BASE_SVD_NAME).unlink(missing_ok=True)

    # ---------------------------------------------------------------- logging
    @property
    def _params(self) -> list:
        # note: read from the modules each time: an engine may have replaced them (FSDP2's DTensors)
        return [p for a in self._tracked for p in a.adapter_parameters() + a.base_parameters()]

    @property
    def steps(self) -> list[int]:
        """Steps stored so far."""
        return self.store.steps

    def should_log(self, step: int) -> bool:
        """True at step 0, every ``log_frequency`` steps and at intruder steps."""
        return step % self.log_frequency == 0 or self.should_log_intruders(step)

    def should_log_intruders(self, step: int, final: bool = False) -> bool:
        """True every ``intruder_log_frequency`` steps (step 0 included) and at the final step; never when 0."""
        return self.intruder_log_frequency > 0 and (final or step % self.intruder_log_frequency == 0)

    def log_step(self, step: int, final: bool = False) -> xr.Dataset | None:
        """Compute one snapshot labelled ``step`` and append it (intruders when due or ``final``).

        Returns the snapshot (None on processes that do not write, or if ``step`` is already stored).
        With sharded parameters (ZeRO-3, FSDP2) every rank must call it: each module is gathered in
        turn (its base weight too: W0's SVD once, W0 @ V and intruders per snapshot), global rank 0
        computes and writes.
        """
        return log_snapshot(self, step, lambda s: self.snapshot(s, intruders=self.should_log_intruders(s, final)))

    def _take_part(self) -> None:
        """A rank that does not write: the same gathers as :meth:`snapshot`, in the same order."""
        if not self._base_ready:
            for g in self._groups:
                for _ in walk(g.members, with_base=True, compute=False):
                    pass
            self._base_ready = True
        with materialized(self._tracked, keep=False):
            pass
        for g in self._groups:
            for _ in walk(g.members, with_base=True, compute=False):
                pass

    @torch.no_grad()
    def snapshot(self, step: int, intruders: bool = False) -> xr.Dataset:
        """The Dataset of one step (without storing it); the base SVD is computed first if needed."""
        self._ensure_base()
        with materialized(self._tracked):
            return self._snapshot(step, intruders)

    def _snapshot(self, step: int, intruders: bool) -> xr.Dataset:
        L, M = len(self.layers), len(self.modules)
        shapes = {"principal_angle_cosines": (self._n_angle,), "intruder_max_cosine": (self._k_max,)}
        names = [
            n
            for n in ALIGNMENT_ATTRS
            if n not in STATIC and (self.intruder_log_frequency > 0 or n not in INTRUDER_VARS)
        ]
        values = {n: np.full((L, M, *shapes.get(n, ())), np.nan) for n in names}
        for g in self._groups:
            self._group_values(g, values, intruders)
        return self._to_dataset(step, values)

    def _group_values(self, g: _Group, values: dict[str, np.ndarray], intruders: bool) -> None:
        facs = [a.factors() for a in g.members]
        B = torch.stack([f[0].cpu() for f in facs])
        A = torch.stack([f[1].cpu() for f in facs])
        s = torch.tensor([f[2] for f in facs], dtype=torch.float64)
        if g.init_zero:
            L_, R_ = am.update_factors(B, A)
        else:
            B0 = torch.stack([self._init[a.name]["B0"] for a in g.members])
            A0 = torch.stack([self._init[a.name]["A0"] for a in g.members])
            L_, R_ = am.update_factors(B, A, B0, A0)
        up = am.factored_update_svd(L_, R_, s, self.rtol)
        out = {
            "update_frobenius_norm": up.frobenius_norm,
            "update_rank": torch.where(up.finite, up.rank.double(), float("nan")),
            "energy_fraction_top_left": am.subspace_energy_fraction(g.U_top, up.U, up.S),
            "energy_fraction_top_right": am.subspace_energy_fraction(g.V_top, up.V, up.S),
            "principal_angle_cosines": am.principal_angle_cosines(g.U_top, up.U, up.rank),
        }
        if g.U_bottom is not None:
            out["energy_fraction_bottom_left"] = am.subspace_energy_fraction(g.U_bottom, up.U, up.S)
            out["energy_fraction_bottom_right"] = am.subspace_energy_fraction(g.V_bottom, up.V, up.S)
        out = {name: v.cpu().numpy() for name, v in out.items()}
        index = {a.name: j for j, a in enumerate(g.members)}
        for a in walk(g.members, with_base=True):  # W0 @ V and intruders need W0: one module at a time
            j, cell = index[a.name], self._cell[a.name]
            for name, v in out.items():
                if v.ndim == 2:
                    values[name][cell][: v.shape[1]] = v[j]
                else:
                    values[name][cell] = v[j]
            if int(up.rank[j]) > 0:
                W0V = self._w0_times(a, up.V[j])
                values["amplification_factor"][cell] = float(
                    am.amplification_factor(W0V, up.U[j], up.S[j], up.rank[j])
                )
            if intruders and not g.randomized:
                count, cos = self._intruders(
                    a, g, bool(up.finite[j]), float(up.S[j, 0]) if up.S.shape[-1] else 0.0, facs[j]
                )
                values["intruder_dimensions"][cell] = count
                values["intruder_max_cosine"][cell][: cos.size] = cos

    def _w0_times(self, a: AdapterModule, V: torch.Tensor) -> torch.Tensor:
        """W0 @ V (m x w, float64 on CPU); the dense product in float32 on the weight's device."""
        W = a.base_weight()
        out = (W.float() @ V.to(device=W.device, dtype=torch.float32)).double().cpu()
        init = self._init[a.name]
        if init:
            out = out + self._scale[a.name] * (init["B0"].double() @ (init["A0"].double() @ V.double()))
        return out

    def _intruders(
        self, a: AdapterModule, g: _Group, finite: bool, sigma1: float, factors
    ) -> tuple[float, np.ndarray]:
        if not finite:
            return math.nan, np.full(g.k, np.nan)
        if sigma1 == 0.0:  # the tuned weight is W0: each of its vectors matches itself
            return 0.0, np.ones(g.k)
        b, a_, s = factors
        W = a.base_weight()
        W_t = W.double() + s * (b.to(W.device).double() @ a_.to(W.device).double())
        count, cos = am.intruder_dimensions(W_t, self._basis(a).to(W.device), g.k, self.epsilon)
        return float(count), cos.cpu().numpy()

    def _to_dataset(self, step: int, values: dict[str, np.ndarray]) -> xr.Dataset:
        data_vars = {}
        for name, array in values.items():
            dims = ("step", "layer", "module") + ((EXTRA_DIM[name],) if name in EXTRA_DIM else ())
            data_vars[name] = (dims, array[None], self._var_attrs(name))
        for name, array in self._static.items():
            dims = ("layer", "module") + ((EXTRA_DIM[name],) if name in EXTRA_DIM else ())
            data_vars[name] = (dims, array, self._var_attrs(name))
        coords = {
            "step": [step],
            "layer": np.array(self.layers, dtype=np.int64),
            "module": np.array(self.modules, dtype=object),
            "angle": np.arange(self._n_angle, dtype=np.int64),
            "base_sv": np.arange(self._k_max, dtype=np.int64),
        }
        if self.intruder_log_frequency > 0:
            coords["intruder_sv"] = np.arange(self._k_max, dtype=np.int64)
        ds = xr.Dataset(data_vars, coords=coords, attrs=self.attrs)
        ds["step"].attrs.update(long_name="optimizer steps done", units="1", convention=STEP_CONVENTION)
        ds["layer"].attrs.update(long_name="transformer block index", units="1")
        ds["module"].attrs.update(long_name="module type within the block")
        ds["angle"].attrs.update(long_name="principal angle index (0 = smallest angle, largest cosine)", units="1")
        ds["base_sv"].attrs.update(
            long_name="index into W0's top-k (0 = largest) or bottom-k (0 = smallest) values", units="1"
        )
        if "intruder_sv" in ds.coords:
            ds["intruder_sv"].attrs.update(
                long_name="top singular vector of the tuned weight (0 = largest)", units="1"
            )
        return ds

    def _var_attrs(self, name: str) -> dict:
        attrs = dict(ALIGNMENT_ATTRS[name])
        if name in INTRUDER_VARS:
            attrs.update(epsilon=self.epsilon, intruder_log_frequency=self.intruder_log_frequency)
        if name in ("update_rank", "principal_angle_cosines", "amplification_factor"):
            attrs["rtol"] = self.rtol
        return attrs

    # ---------------------------------------------------------------- attrs, scalars, saving
    def _global_attrs(self, run_attrs: dict, max_layers: int | None) -> dict:
        config = peft_config_of(self.model).get(self.adapter_name)
        targets = target_modules_of(config)
        attrs = {
            "title": "PeRL alignment of adapter updates with the base weights",
            "Conventions": "CF-1.8",
            "peft_type": self.peft_type,
            "adapter_name": self.adapter_name,
            "r": adapter_rank(config),
            "lora_alpha": getattr(config, "lora_alpha", None),
            "target_modules": targets,
            "perl_version": __version__,
            "step_convention": STEP_CONVENTION,
            "base_weight": "W0 = W_base + s B_0 A_0, the layer's weight at initialisation (for PiSSA/MiLoRA the "
            "weight before the residual split); its SVD is taken once per run",
            "update": _DW + "; for DoRA the LoRA direction update (magnitude rescaling not included)",
            "base_svd_method": (
                f"full float64 SVD (torch.linalg.svd) where min(m, n) <= {self.full_svd_max_dim}; "
                f"else torch.svd_lowrank (top-k only, niter={self.randomized_niter}, "
                "oversample max(k, 8), seed 0)"
            ),
            "alignment_top_k": self.top_k if self.top_k is not None else "2r",
            "intruder_epsilon": self.epsilon,
            "intruder_log_frequency": self.intruder_log_frequency,
            "intruder_reference": "all min(m, n) left singular vectors of W0's thin SVD",
            "zero_update": "energy fractions, angles and amplification are NaN (0/0); intruder count 0",
            "max_layers_to_track": max_layers,
            "not_tracked": self.not_tracked or None,
            "missing_values": "NaN: module without a low-rank adapter, undefined (zero update), bottom-k/intruders "
            "of a randomized SVD, or intruders at a step without an intruder snapshot",
        }
        attrs.update(run_attrs)
        return {k: v for k, v in attrs.items() if v is not None}

    def _scalars(self, snapshot: xr.Dataset) -> dict[str, float]:
        """Means over modules for the Trainer's logs (``alignment/energy_fraction_top_left_mean``, ...)."""
        out = {"alignment/step": float(snapshot.step.values[0])}
        for name in (
            "energy_fraction_top_left",
            "energy_fraction_bottom_left",
            "energy_fraction_top_right",
            "amplification_factor",
            "intruder_dimensions",
        ):
            if name in snapshot:
                vals = np.asarray(snapshot[name].values, dtype=float)
                vals = vals[np.isfinite(vals)]
                if vals.size:
                    out[f"alignment/{name}_mean"] = float(vals.mean())
        return out

    def save(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write the consolidated final file (default ``<save_dir>/alignment_final.nc``)."""
        if not self.is_world_process_zero or not self.store.steps:
            return None
        return self.store.finalize(Path(path) if path else self.save_dir / FINAL_NAME)

    @property
    def data(self) -> xr.Dataset:
        """The whole history as an xarray Dataset (read from the store)."""
        return self.store.read()


# -------------------------------------------------------------------- the callback
class AlignmentTrackingCallback(SpectralTrackingCallback):
    """Alignment snapshots at step 0, every ``log_frequency`` steps, intruders at their frequency and at the end.

    The spectral callback's lifecycle (fresh store or resume at train begin, initial factors saved
    with checkpoints, scalars added to the logs), plus intruder snapshots. A snapshot
    at ``on_step_end`` describes the weights after ``state.global_step`` optimizer steps. The final
    step (``global_step == max_steps``) always gets an intruder snapshot; ``on_train_end`` logs it
    if the loop ended elsewhere. A new run replaces an earlier store in the folder; a resumed run
    truncates the store, restores B_0, A_0 from ``checkpoint-N/tracker_init.safetensors``
    and reuses ``base_svd.safetensors`` when the weights match. The base SVD happens at the first
    snapshot (train begin): a one-off cost. Only the global main process computes and writes; with
    sharded parameters (ZeRO-3, FSDP2) every rank takes part in the gathers.

    Usage:
        tracker = AlignmentTracker.from_config(config.tracker, peft_model, tracking_dir, run_attrs=attrs)
        trainer = GRPOTrainer(model=peft_model, ..., callbacks=[AlignmentTrackingCallback(tracker)])

    Args:
        tracker (AlignmentTracker): the tracker to drive.
        save_with_checkpoints (bool, defaults to True): save the initial factors into each checkpoint.
    """

    def on_step_end(self, args, state, control, **kwargs):
        step = int(state.global_step)
        final = bool(state.max_steps) and step >= state.max_steps
        if self.tracker.should_log(step) or final:
            self._log(step, final)

    def on_train_end(self, args, state, control, **kwargs):
        self._log(int(state.global_step), final=True)  # skipped when already stored
        self.tracker.save()

    def _log(self, step: int, final: bool = False) -> None:
        if self.tracker.log_step(step, final=final) is not None:
            self._pending = dict(self.tracker.last_scalars)
