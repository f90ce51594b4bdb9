"""Reading a stored gradient flow run: `GradientFlowHistory`, the read API `GradientFlowTracker` inherits.

`load()` opens a store (live or final), `data` is its Dataset, `get_*()` select from it,
`get_summary_stats()` summarises it and `create_*()` draw it (with :mod:`.heatmaps`). Nothing here
computes a gradient; the variables are described in :mod:`.gradient`.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from .history_base import StoredHistory, history_path
from .store import RunStore

if TYPE_CHECKING:  # the subclass that `load` returns
    from .gradient import GradientFlowTracker

GRADIENT_DIR = "gradient_logs"
STORE_NAME = "gradient_flow.nc"
SUMMARY_NAME = "gradient_flow_summary.json"
FINAL_NAME = "gradient_flow_final.nc"

STEP_CONVENTION = (
    "step s >= 1 is the s-th optimizer step, labelled as the Trainer logs it (global_step after the "
    "update): the gradient that moved the weights from spectral snapshot s-1 to snapshot s"
)


class GradientFlowHistory(StoredHistory):
    """The read API of a gradient flow store; a `GradientFlowTracker` made by :meth:`load` has only this.

    Subclasses hold ``_loaded`` (a Dataset read by :meth:`load`) or ``store`` (the live `RunStore`),
    and ``log_frequency``.
    """

    @classmethod
    def load(cls, path: str | os.PathLike) -> GradientFlowTracker:
        """A read-only tracker over a stored gradient Dataset.

        Args:
            path (str | Path): ``gradient_flow_final.nc``, a live ``gradient_logs/gradient_flow.nc``,
                or a run folder holding one of them; the PeRL tracking docs' names
                (``gradient_flow_final.pt``, ``gradient_logs/gradient_flow.pt``) open the ``.nc`` beside them.
        """
        path = history_path(
            path,
            [FINAL_NAME, f"{GRADIENT_DIR}/{STORE_NAME}"],
            f"No gradient data in {{path}}: expected {FINAL_NAME} or {GRADIENT_DIR}/{STORE_NAME}; "
            "was the run trained with gradient tracking enabled?",
        )
        ds = RunStore.open(path)
        missing = [v for v in ("grad_norm", "total_grad_norm") if v not in ds]
        if missing:
            raise ValueError(
                f"{path} is not a gradient flow store (missing {missing}); "
                "expected a file written by GradientFlowTracker."
            )
        tracker = cls(
            None,
            log_frequency=int(ds.attrs.get("log_frequency", 1)),
            save_dir=path.parent,
            peft_type=ds.attrs.get("peft_type"),
        )
        tracker._loaded = ds
        return tracker

    # ------------------------------------------------------------------------ reading
    def get_summary_stats(self) -> dict:
        """A JSON-ready summary: steps, totals, clipping, per component and per layer means (NaN -> null)."""
        from .heatmaps import module_aggregate

        ds = self.data
        if "step" not in ds.dims or ds.sizes["step"] == 0:
            return {"num_steps": 0, "steps": [], "total_steps_logged": 0}
        steps = [int(s) for s in ds["step"].values]
        total = ds["total_grad_norm"].values
        coef = ds["clip_coef"].values
        summary = {
            "num_steps": len(steps),
            "first_step": steps[0],
            "last_step": steps[-1],
            "log_frequency": int(ds.attrs.get("log_frequency", self.log_frequency)),
            "peft_type": ds.attrs.get("peft_type"),
            "step_convention": STEP_CONVENTION,
            "total_grad_norm": {**_stats(total), "last": _num(total[-1])},
            "post_clip_grad_norm": _stats(ds["post_clip_grad_norm"].values),
            "clipped_fraction": _num(np.mean(coef < 1.0)) if len(coef) else None,
            "nonfinite_steps": [s for s, t in zip(steps, total) if not np.isfinite(t)],
            "components": {},
            "layers": {},
        }
        for component in ds["component"].values:
            sel = ds.sel(component=component)
            tracked = sel["numel"].values > 0  # (layer, module): cells this component exists in
            summary["components"][str(component)] = {
                name: _stats(sel[name].transpose("step", "layer", "module").values[:, tracked])
                for name in ("grad_norm", "grad_to_weight_ratio", "update_ratio")
            }
            per_layer = module_aggregate(ds["grad_norm"].sel(component=component)).mean("step", skipna=True)
            summary["layers"][str(component)] = {
                str(int(l)): _num(v) for l, v in zip(per_layer["layer"].values, per_layer.values)
            }
        summary.update(_original_summary_keys(ds, steps))
        return summary

    def get_gradient_matrix(self, component: str = "B", module_type: str | None = None) -> xr.DataArray:
        """``grad_norm`` of one component as a (layer, step) DataArray.

        Args:
            component (str, defaults to "B"): ``A``, ``B``, ``magnitude``, ``E``, ``ia3``, ...
            module_type (str, optional): one module (``q_proj``); default: all modules combined as
                sqrt(sum of squares), the norm of the component's gradient over the whole layer.
        """
        from .heatmaps import gradient_matrix

        return gradient_matrix(self.data, component, module_type)

    def get_layer_history(self, layer_idx: int) -> xr.Dataset:
        """Everything recorded for one layer over steps (with the per-step totals).

        Args:
            layer_idx (int): transformer block index (-1: tensors outside the blocks).
        """
        ds = self.data
        layers = [int(v) for v in ds["layer"].values]
        if layer_idx not in layers:
            raise ValueError(f"Layer {layer_idx} was not tracked; tracked layers are {layers}.")
        return ds.sel(layer=layer_idx)

    def create_heatmap(
        self, component: str = "B", save_path: str | os.PathLike | None = None, module_type: str | None = None
    ):
        """A layers x steps heatmap of ``grad_norm`` (log colour scale, NaN blank); returns the Figure.

        Args:
            component (str, defaults to "B"): the component to draw.
            save_path (str | Path, optional): also write a PNG there.
            module_type (str, optional): one module instead of all modules combined.
        """
        from .heatmaps import heatmap_figure, save_figure

        fig = heatmap_figure(self.data, component, module_type)
        if save_path is not None:
            save_figure(fig, save_path)
        return fig

    def create_layer_comparison_plot(
        self, layers: list[int] | None = None, component: str = "B", save_path: str | os.PathLike | None = None
    ):
        """``grad_norm`` of one component over steps for a few layers; returns the Figure.

        Args:
            layers (list[int], optional): block indices; default the first, middle and last block.
            component (str, defaults to "B"): the component to draw (modules combined per layer).
            save_path (str | Path, optional): also write a PNG there.
        """
        from .heatmaps import layer_comparison_figure, save_figure

        fig = layer_comparison_figure(self.data, component, layers)
        if save_path is not None:
            save_figure(fig, save_path)
        return fig


def _num(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _stats(values: np.ndarray) -> dict:
    """mean / min / max over the finite values (null when there are none) and how many were not finite."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": None, "min": None, "max": None, "nonfinite": int(values.size)}
    return {
        "mean": _num(finite.mean()),
        "min": _num(finite.min()),
        "max": _num(finite.max()),
        "nonfinite": int(values.size - finite.size),
    }


def _original_summary_keys(ds: xr.Dataset, steps: list[int]) -> dict:
    """The keys of the original PeRL's ``get_summary_stats()``: ``total_steps_logged``, ``step_range``,
    ``num_layers``, ``layer_range``, ``components_tracked``, ``overall_stats`` (every tracked
    parameter's gradient norm at every step) and ``component_stats_final`` (mean and max over
    layers at the last step of each layer's gradient norm). Here a layer's norm of a component is
    the L2 norm over its modules (the original takes the max over modules; see README.md,
    "Coming from PeRL"), and the norms are of the accumulated pre-clip gradient. Its ``timing`` is
    not recorded here."""
    from .heatmaps import MODULE_AGGREGATION, module_aggregate

    tracked = ds["numel"].transpose("layer", "module", "component").values > 0  # the cells that exist
    layers = sorted({int(ds["layer"].values[i]) for i in np.argwhere(tracked)[:, 0]}) if tracked.any() else []
    components = [str(c) for k, c in enumerate(ds["component"].values) if tracked[..., k].any()]
    grads = ds["grad_norm"].transpose("step", "layer", "module", "component").values[:, tracked]
    finite = grads[np.isfinite(grads)]
    overall = (
        {
            "mean": float(finite.mean()),
            "std": float(finite.std()),
            "min": float(finite.min()),
            "max": float(finite.max()),
        }
        if finite.size
        else {"mean": None, "std": None, "min": None, "max": None}
    )
    final = {}
    for component in components:
        per_layer = module_aggregate(ds["grad_norm"].sel(component=component)).isel(step=-1).values
        per_layer = per_layer[np.isfinite(per_layer)]
        if per_layer.size:
            final[component] = {"mean": float(per_layer.mean()), "max": float(per_layer.max())}
    return {
        "total_steps_logged": len(steps),
        "step_range": [steps[0], steps[-1]],
        "num_layers": len(layers),
        "layer_range": [layers[0], layers[-1]] if layers else None,
        "components_tracked": components,
        "overall_stats": overall,
        "component_stats_final": final,
        "layer_aggregation": MODULE_AGGREGATION,
    }
