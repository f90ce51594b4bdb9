"""Reading a stored spectral history: `SpectralHistory`, the read API `SpectralTracker` inherits.

`load()` opens a store (live or final) or a run folder, `data` is its Dataset, `get_*()` select from
it and `get_summary_stats()` summarises it. Nothing here computes a spectrum; the variables are
described in :mod:`.spectral`.
"""

from __future__ import annotations

import math
import os
import re
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from .history_base import StoredHistory, history_path
from .store import RunStore

if TYPE_CHECKING:  # the subclass that `load` returns
    from .spectral import SpectralTracker

SPECTRAL_DIR = "spectral_logs"
STORE_NAME = "spectral_history.nc"
SUMMARY_NAME = "spectral_history_summary.json"
FINAL_NAME = "spectral_history_final.nc"


class SpectralHistory(StoredHistory):
    """The read API of a spectral store; a `SpectralTracker` made by :meth:`load` has only this.

    Subclasses hold ``_loaded`` (a Dataset read by :meth:`load`) or ``store`` (the live `RunStore`).
    """

    @classmethod
    def load(cls, path: str | os.PathLike) -> SpectralTracker:
        """A read-only tracker over a stored history: a ``.nc`` file (final or live) or a run folder.

        The returned object has ``.data`` and the analysis methods; it cannot log. The names of the
        PeRL tracking docs (``spectral_history_final.pt``, ``spectral_logs/spectral_history.pt``)
        open the ``.nc`` store beside them.
        """
        path = history_path(
            path,
            [FINAL_NAME, f"{SPECTRAL_DIR}/{STORE_NAME}", STORE_NAME],
            f"No spectral history in {{path}}: expected {FINAL_NAME} or "
            f"{SPECTRAL_DIR}/{STORE_NAME}; was spectral tracking enabled for this run?",
        )
        obj = cls.__new__(cls)
        obj._loaded = RunStore.open(path)
        obj.model = None
        obj.modules = [str(m) for m in obj._loaded.module.values]
        obj.layers = [int(l) for l in obj._loaded.layer.values]
        obj.is_world_process_zero = False
        return obj

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
            raise KeyError(
                f"No tracked module {layer_name!r}: tracked layers are {[int(x) for x in ds.layer.values]} "
                f"and modules {modules}, e.g. 'model.layers.{int(ds.layer.values[-1])}.self_attn.{modules[0]}'."
            )
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
        summary.update(_original_summary_keys(ds, steps))
        if not steps:
            return summary
        for name, da in ds.data_vars.items():
            if "step" not in da.dims or {"sv", "sv_update"} & set(da.dims):
                continue
            entry = {}
            for label, idx in (("first", 0), ("last", -1)):
                vals = da.isel(step=idx).values
                finite = vals[np.isfinite(vals)]
                entry[label] = (
                    {
                        "step": steps[idx],
                        "mean": float(finite.mean()),
                        "min": float(finite.min()),
                        "max": float(finite.max()),
                    }
                    if finite.size
                    else {"step": steps[idx]}
                )
            last = da.isel(step=-1)
            entry["last_by_module"] = {str(m): _finite_mean(last.sel(module=m).values) for m in ds.module.values}
            summary["metrics"][name] = entry
        return summary


def _original_summary_keys(ds: xr.Dataset, steps: list[int]) -> dict:
    """The keys of the original PeRL's ``get_summary_stats()``: ``total_steps_logged``, ``step_range``,
    ``num_layers`` (adapted modules, i.e. (layer, module) cells with a spectrum) and
    ``<metric>_latest`` (mean, std, min, max over those modules at the last step). Its ``timing`` is
    not recorded here. Definitions differ where README.md, "Coming from PeRL", says so."""
    out: dict = {"total_steps_logged": len(steps), "step_range": [steps[0], steps[-1]] if steps else None}
    if "singular_values" in ds and steps:
        adapted = np.isfinite(ds["singular_values"].values).any(
            axis=tuple(i for i, d in enumerate(ds["singular_values"].dims) if d in ("step", "sv"))
        )
        out["num_layers"] = int(adapted.sum())
    for metric in ("effective_rank", "condition_number", "spectral_gap", "frobenius_norm"):
        if metric not in ds or not steps or "step" not in ds[metric].dims:
            continue
        vals = ds[metric].isel(step=-1).values
        finite = vals[np.isfinite(vals)]
        if finite.size:
            out[f"{metric}_latest"] = {
                "mean": float(finite.mean()),
                "std": float(finite.std()),
                "min": float(finite.min()),
                "max": float(finite.max()),
            }
    return out


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
