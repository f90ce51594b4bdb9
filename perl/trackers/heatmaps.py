"""Static matplotlib figures of gradient flow: layers x steps heatmaps and a layer comparison.

Pure functions of stored DataArrays (never a live model). Figures are built with
``matplotlib.figure.Figure`` directly, not pyplot: no GUI backend, no global figure registry,
safe in a training process; in Jupyter a returned Figure displays as usual.

Missing data is blank, never a colour: NaN cells are masked and drawn transparent over a white
axes. Exact zeros (LoRA's A gradient at step 1, while B = 0) cannot sit on a log scale; they get
the colour map's "under" colour (grey) and +inf its "over" colour (red), both named in the
footnote, so neither is confused with a small value or with missing data.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import xarray as xr

from ..fileio import atomic_write_bytes

__all__ = [
    "module_aggregate",
    "gradient_matrix",
    "gradient_heatmap",
    "layer_comparison",
    "heatmap_figure",
    "layer_comparison_figure",
    "save_gradient_pngs",
    "save_figure",
]

MODULE_AGGREGATION = (
    "sqrt(sum over modules of grad_norm^2): the L2 norm of the component's gradient over the whole layer"
)
_COMBINED = "modules combined per layer: √(Σ ‖g_module‖²)"

ZERO_COLOR = "0.55"
INF_COLOR = "red"
FOOTNOTE = "blank: not recorded (NaN)   grey: exactly 0   red: infinite"


def module_aggregate(da: xr.DataArray) -> xr.DataArray:
    """Combine the ``module`` dimension as sqrt(sum of squares), the norm over the whole layer.

    Modules that are NaN (not adapted) are left out; a layer with no recorded module stays NaN.

    Args:
        da (xr.DataArray): a norm with a ``module`` dimension.
    """
    combined = np.sqrt((da**2).sum("module", skipna=True, min_count=1))
    combined.attrs = dict(da.attrs)
    return combined


def gradient_matrix(
    gds: xr.Dataset, component: str = "B", module: str | None = None, variable: str = "grad_norm"
) -> xr.DataArray:
    """``variable`` of one component as a (layer, step) DataArray.

    Args:
        gds (xr.Dataset): a gradient Dataset (a store, a final file, ``open_run(...).gradients``).
        component (str, defaults to "B"): ``A``, ``B``, ``magnitude``, ``E``, ``ia3``, ...
        module (str, optional): one module (``q_proj``); default: all modules combined with
            :func:`module_aggregate`, the norm of the component's gradient over the whole layer.
        variable (str, defaults to "grad_norm"): any (step, layer, module, component) variable.
    """
    if "component" not in gds.coords:
        raise ValueError("No gradient step has been recorded yet.")
    comps = [str(c) for c in gds["component"].values]
    if component not in comps:
        raise ValueError(f"Component {component!r} was not recorded; recorded components are {comps}.")
    da = gds[variable].sel(component=component)
    if module is not None:
        modules = [str(m) for m in gds["module"].values]
        if module not in modules:
            raise ValueError(f"Module {module!r} was not recorded; recorded modules are {modules}.")
        da = da.sel(module=module)
    else:
        da = module_aggregate(da)
        da.attrs["module_aggregation"] = MODULE_AGGREGATION
    return da.transpose("layer", "step")


def heatmap_figure(gds: xr.Dataset, component: str = "B", module: str | None = None):
    """The layers x steps heatmap of ``grad_norm`` of one component (the PNG training writes)."""
    where = f"module {module}" if module else _COMBINED
    return gradient_heatmap(
        gradient_matrix(gds, component, module),
        title=f"Pre-clip gradient norm of {component}\n{where}",
        peft_type=gds.attrs.get("peft_type"),
    )


def layer_comparison_figure(gds: xr.Dataset, component: str = "B", layers: list[int] | None = None):
    """``grad_norm`` of one component over steps for a few layers (default first, middle, last block)."""
    matrix = gradient_matrix(gds, component)
    available = [int(v) for v in matrix["layer"].values]
    blocks = [l for l in available if l >= 0] or available
    if layers is None:
        layers = list(dict.fromkeys([blocks[0], blocks[len(blocks) // 2], blocks[-1]]))
    unknown = [l for l in layers if l not in available]
    if unknown:
        raise ValueError(f"Layers {unknown} were not tracked; tracked layers are {available}.")
    return layer_comparison(
        matrix.sel(layer=layers), title=f"Pre-clip gradient norm of {component} by layer\n{_COMBINED}"
    )


def save_gradient_pngs(gds: xr.Dataset, folder: str | os.PathLike) -> list[Path]:
    """Write ``gradient_heatmap_<C>.png`` for A, B and DoRA's magnitude (those present) and
    ``gradient_layer_comparison.png`` (of B, or the first component) into ``folder``.

    The one function behind the PNGs of a run's ``gradient_logs/``: the tracker calls it at the
    end of training and ``perl.viz.static`` exports it, so both give the same pictures.
    """
    folder = Path(folder)
    comps = [str(c) for c in gds["component"].values]
    written = []
    for component in ("A", "B", "magnitude"):
        if component in comps:
            written.append(save_figure(heatmap_figure(gds, component), folder / f"gradient_heatmap_{component}.png"))
    main = "B" if "B" in comps else comps[0]
    written.append(save_figure(layer_comparison_figure(gds, main), folder / "gradient_layer_comparison.png"))
    return written


def _layer_label(layer: int) -> str:
    return "other" if layer < 0 else str(layer)


def _tick_positions(n: int, max_ticks: int = 12) -> np.ndarray:
    if n <= max_ticks:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_ticks).round().astype(int))


def gradient_heatmap(
    matrix: xr.DataArray, title: str, peft_type: str | None = None, value_label: str = "pre-clip gradient norm"
):
    """Layers x steps heatmap on a log colour scale; returns a ``matplotlib.figure.Figure``.

    Args:
        matrix (xr.DataArray): dims ``layer`` and ``step`` (e.g. ``tracker.get_gradient_matrix("B")``).
        title (str): the figure title; state the module aggregation in it.
        peft_type (str, optional): added to the title.
        value_label (str, defaults to "pre-clip gradient norm"): the colour bar's label.
    """
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    matrix = matrix.transpose("layer", "step")
    values = np.asarray(matrix.values, dtype=float)
    steps = [int(s) for s in matrix["step"].values]
    layers = [int(l) for l in matrix["layer"].values]

    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size:
        vmin, vmax = float(positive.min()), float(positive.max())
        if vmin == vmax:
            vmin, vmax = vmin / 2, vmax * 2
    else:
        vmin, vmax = 0.1, 10.0
    shown = values.copy()
    shown[shown == 0] = vmin / 10  # -> "under" colour
    shown[np.isposinf(shown)] = vmax * 10  # -> "over" colour
    masked = np.ma.masked_where(np.isnan(shown), shown)

    cmap = colormaps["viridis"].with_extremes(bad=(0.0, 0.0, 0.0, 0.0), under=ZERO_COLOR, over=INF_COLOR)

    width = min(16.0, max(6.0, 3.0 + 0.12 * len(steps)))
    height = min(12.0, max(3.5, 1.8 + 0.28 * len(layers)))
    fig = _figure((width, height))
    ax = fig.add_subplot()
    ax.set_facecolor("white")
    mesh = ax.pcolormesh(
        np.arange(len(steps) + 1),
        np.arange(len(layers) + 1),
        masked,
        norm=LogNorm(vmin=vmin, vmax=vmax),
        cmap=cmap,
        shading="flat",
    )
    xt = _tick_positions(len(steps))
    ax.set_xticks(xt + 0.5, [str(steps[i]) for i in xt])
    yt = _tick_positions(len(layers), max_ticks=30)
    ax.set_yticks(yt + 0.5, [_layer_label(layers[i]) for i in yt])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer (transformer block)")
    ax.set_title(f"{title}{f' [{peft_type}]' if peft_type else ''}", fontsize=10)
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}[
        (bool((values == 0).any()), bool(np.isposinf(values).any()))
    ]
    cbar = fig.colorbar(mesh, ax=ax, extend=extend)
    cbar.set_label(f"{value_label} (log scale)")
    fig.text(0.01, 0.01, FOOTNOTE, fontsize=7, color="0.3")
    return fig


def layer_comparison(matrix: xr.DataArray, title: str, value_label: str = "pre-clip gradient norm"):
    """One line per layer of a (layer, step) DataArray over steps, log y scale; returns a Figure.

    Args:
        matrix (xr.DataArray): dims ``layer`` and ``step``, already restricted to the layers to draw.
        title (str): the figure title; state the module aggregation in it.
        value_label (str, defaults to "pre-clip gradient norm"): the y axis label.
    """
    from matplotlib.ticker import MaxNLocator

    matrix = matrix.transpose("layer", "step")
    steps = matrix["step"].values
    fig = _figure((8, 4.5))
    ax = fig.add_subplot()
    marker = "o" if len(steps) <= 50 else None
    for layer in matrix["layer"].values:
        ax.plot(
            steps,
            matrix.sel(layer=layer).values,
            marker=marker,
            markersize=3,
            label=f"layer {_layer_label(int(layer))}",
        )
    values = np.asarray(matrix.values, dtype=float)
    if (np.isfinite(values) & (values > 0)).any():
        ax.set_yscale("log", nonpositive="mask")
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(value_label)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.text(0.01, 0.01, "gaps: not recorded (NaN) or exactly 0", fontsize=7, color="0.3")
    return fig


def _figure(size):
    from matplotlib.figure import Figure
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    # constrained layout keeps long titles and colour bar labels inside; the bottom strip holds the footnote
    return Figure(figsize=size, dpi=100, layout=ConstrainedLayoutEngine(rect=(0, 0.04, 1, 0.96)))


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG to ``path`` (folder created; written to a temporary file, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=fig.dpi)
    return atomic_write_bytes(path, png.getvalue())
