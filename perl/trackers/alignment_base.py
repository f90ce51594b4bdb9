"""The base weights' singular subspaces the alignment tracker measures against (W0's SVD, once per run).

`_BaseSubspaces` is the part of `AlignmentTracker` that computes W0 = W_base + s B_0 A_0, its top-k /
bottom-k SVD, caches all of its left singular vectors for the intruder check within a memory budget,
and saves / reloads the SVD in ``alignment_logs/base_svd.safetensors`` (reused when the weights match).
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import torch

from ..fileio import atomic_write_bytes
from . import alignment_math as am
from .alignment_schema import BASE_SVD_FORMAT, BASE_SVD_NAME, EXTRA_DIM, STATIC
from .discovery import AdapterModule, walk

logger = logging.getLogger("perl")


class _BaseSubspaces:
    """W0's SVD per adapted module; mixed into `AlignmentTracker`, whose state (groups, cells, store) it uses."""

    # ---------------------------------------------------------------- the base weights
    def base_weight(self, a: AdapterModule) -> torch.Tensor:
        """W0 = W_base + s B_0 A_0 (float64, dense, on the weight's device): the weight at initialisation."""
        W = a.base_weight().double()
        init = self._init[a.name]
        if init:
            W = W + self._scale[a.name] * (init["B0"].to(W.device).double() @ init["A0"].to(W.device).double())
        return W

    def _ensure_base(self) -> None:
        """The once-per-run SVD of every W0 (or its reload from base_svd.safetensors)."""
        if self._base_ready:
            return
        start = time.perf_counter()
        L, M, K = len(self.layers), len(self.modules), self._k_max
        st = {name: np.full((L, M, K) if name in EXTRA_DIM else (L, M), np.nan) for name in STATIC}
        saved, computed, to_save = self._read_base_file(), 0, {}
        for g in self._groups:
            parts: dict[str, list[torch.Tensor]] = {"U_top": [], "V_top": [], "U_bottom": [], "V_bottom": []}
            for a in walk(g.members, with_base=True):  # W0 one module at a time when sharded
                cell = self._cell[a.name]
                W0 = self.base_weight(a)
                fp = _fingerprint(W0)
                hit = saved.get(a.name)
                if (
                    hit is not None
                    and hit["meta"] == {"k": g.k, "randomized": g.randomized, "shape": [g.m, g.n]}
                    and _same_fingerprint(hit["fp"], fp)
                ):
                    svd = hit["svd"]
                else:
                    svd = am.base_svd(
                        W0,
                        g.k,
                        randomized=g.randomized,
                        niter=self.randomized_niter,
                        keep_full_left=self.intruder_log_frequency > 0,
                    )
                    computed += 1
                    if svd.U_full is not None:
                        self._cache_basis(a.name, svd.U_full)
                to_save[a.name] = (svd, fp, {"k": g.k, "randomized": g.randomized, "shape": [g.m, g.n]})
                for key in parts:
                    value = getattr(svd, key)
                    if value is not None:
                        parts[key].append(value.float().cpu())
                st["base_singular_values_top"][cell][: g.k] = svd.S_top.cpu().numpy()
                if svd.S_bottom is not None:
                    st["base_singular_values_bottom"][cell][: g.k] = svd.S_bottom.cpu().numpy()
                st["alignment_k"][cell] = g.k
                st["base_svd_randomized"][cell] = float(g.randomized)
                st["chance_energy_fraction_left"][cell] = g.k / g.m
                st["chance_energy_fraction_right"][cell] = g.k / g.n
            for key, values in parts.items():
                setattr(g, key, torch.stack(values) if values else None)
        self._static = st
        self._base_ready = True
        self.base_svd_seconds = time.perf_counter() - start
        if computed and self.save_base_svd:
            self._write_base_file(to_save)
        logger.info(
            "Alignment tracker: base SVD of %d weights (%d computed, %d reloaded) in %.1f s.",
            len(to_save),
            computed,
            len(to_save) - computed,
            self.base_svd_seconds,
        )

    def _cache_basis(self, name: str, U_full: torch.Tensor) -> None:
        size = U_full.numel() * 4
        if self._cache_used + size <= self.intruder_cache_bytes:
            self._basis_cache[name] = U_full.float().cpu()
            self._cache_used += size

    def _basis(self, a: AdapterModule) -> torch.Tensor:
        """All of W0's left singular vectors (cached within the budget, else recomputed)."""
        cached = self._basis_cache.get(a.name)
        if cached is not None:
            return cached
        U = am.full_left_basis(self.base_weight(a))
        self._cache_basis(a.name, U)
        return U

    def _read_base_file(self) -> dict:
        path = self.store.path.parent / BASE_SVD_NAME
        if not path.is_file():
            return {}
        from safetensors import safe_open

        out = {}
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != BASE_SVD_FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}")
                modules = json.loads(meta["modules"])
                keys = set(f.keys())
                for name, info in modules.items():
                    get = {
                        p: (f.get_tensor(f"{name}::{p}").double() if f"{name}::{p}" in keys else None)
                        for p in ("U_top", "S_top", "V_top", "U_bottom", "S_bottom", "V_bottom")
                    }
                    svd = am.BaseSVD(
                        get["U_top"],
                        get["S_top"],
                        get["V_top"],
                        get["U_bottom"],
                        get["S_bottom"],
                        get["V_bottom"],
                        None,
                        bool(info["meta"]["randomized"]),
                    )
                    out[name] = {"svd": svd, "fp": info["fp"], "meta": info["meta"]}
        except Exception as err:  # noqa: BLE001 - a damaged or foreign cache is recomputed, never trusted
            logger.warning("Ignoring %s (%s): the base SVD is recomputed.", path, err)
            return {}
        return out

    def _write_base_file(self, entries: dict) -> None:
        if not self.is_world_process_zero:
            return
        from safetensors.torch import save

        tensors, modules = {}, {}
        for name, (svd, fp, meta) in entries.items():
            for part in ("U_top", "S_top", "V_top", "U_bottom", "S_bottom", "V_bottom"):
                value = getattr(svd, part)
                if value is not None:
                    dtype = torch.float64 if part.startswith("S") else torch.float32
                    tensors[f"{name}::{part}"] = value.to(dtype).cpu().contiguous()
            modules[name] = {"fp": fp, "meta": meta}
        path = self.store.path.parent / BASE_SVD_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            path,
            save(
                tensors,
                metadata={
                    "format": BASE_SVD_FORMAT,
                    "modules": json.dumps(modules),
                    "W0": "W_base + s B_0 A_0 (the weight at initialisation)",
                },
            ),
        )


def _fingerprint(W: torch.Tensor) -> list[float]:
    return [float(torch.linalg.matrix_norm(W)), float(W.sum()), float(W.abs().sum())]


def _same_fingerprint(a, b, rtol: float = 1e-9) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * max(abs(x), abs(y), 1e-30) for x, y in zip(a, b))
