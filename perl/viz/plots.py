"""HoloViews plots of a run's stored Datasets (Bokeh in notebooks, matplotlib for PNGs).

Each builder takes a Dataset and a selection and returns one HoloViews element whose data is the
slice it draws (``element.dimension_values(...)``, ``element.dframe()``), so a test can compare it
with ``ds[...].sel(...)``. Axis labels and units come from the variables' ``long_name`` / ``units``.
NaN stays NaN: a module a method does not adapt is drawn as missing, not as zero.

Usage:
    run = perl.open_run("runs/demo")
    spectrum(run.spectral, layer=3, module="q_proj", step=100)
    metric_heatmap(run.spectral, "effective_rank", "q_proj", update=True)
    with_training(gradient_heatmap(run.gradients, "B", "q_proj"), run.metrics)
"""

from __future__ import annotations

import warnings

import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401  (registers the Bokeh options used below)
import holoviews.plotting.mpl  # noqa: F401  (and the matplotlib ones, for static PNGs)
import numpy as np
import xarray as xr

from perl.run import metric_name
from perl.trackers.heatmaps import module_aggregate
from perl.viz.views import axis_label, inline_notebook_resources

__all__ = [
    "spectrum",
    "sv_trajectories",
    "metric_heatmap",
    "gradient_heatmap",
    "ab_ratio",
    "dora_magnitude_direction",
    "rank_budget",
    "training_curves",
    "with_training",
    "dimension",
]

inline_notebook_resources()  # before a notebook's hv.extension("bokeh"): no CDN, figures render offline

if hv.Store.current_backend not in hv.Store.renderers:
    hv.Store.set_current_backend("bokeh")


def _opts(element, bokeh=None, mpl=None):
    """Style for both backends at once, so a notebook plot and its PNG look alike."""
    if bokeh:
        element = element.opts(backend="bokeh", **bokeh)
    if mpl:
        element = element.opts(backend="matplotlib", **mpl)
    return element


def dimension(obj, name: str | None = None) -> hv.Dimension:
    """An hv.Dimension labelled from a variable's attrs (long_name, units)."""
    name = name or obj.name
    attrs = getattr(obj, "attrs", {}) or {}
    units = str(attrs.get("units") or "").strip()
    unit = units if units and units not in ("1", "-", "none") else None
    return hv.Dimension(name, label=str(attrs.get("long_name") or name), unit=unit)


def _need(ds: xr.Dataset | None, name: str, why: str) -> xr.DataArray:
    if ds is None:
        raise ValueError(f"No data to plot {name!r} from (the run has no such store); {why}.")
    if name not in ds:
        have = ", ".join(sorted(str(v) for v in ds.data_vars)[:20])
        raise ValueError(f"This Dataset has no {name!r}; {why}. It has: {have}.")
    return ds[name]


def _sel(da: xr.DataArray, **selection) -> xr.DataArray:
    """``da.sel(...)`` with an error that names the values that exist."""
    for dim, value in selection.items():
        if dim not in da.dims:
            raise ValueError(f"{da.name!r} has no {dim!r} dimension (dims: {', '.join(da.dims)}).")
        values = da[dim].values
        if not np.any(values == value):
            listing = (
                f"{values[0]} .. {values[-1]} ({len(values)} values)"
                if len(values) > 12
                else ", ".join(map(str, values))
            )
            raise ValueError(f"{dim} {value!r} is not in this run; choose one of {listing}.")
    return da.sel(selection)


def _metric_name(ds: xr.Dataset, metric: str, update: bool) -> str:
    if update and not metric.startswith("update_"):
        return f"update_{metric}"
    return metric


def _heatmap(da: xr.DataArray, title: str, logz: bool = False):
    """A (layer, step) DataArray as hv.Image (evenly spaced) or hv.QuadMesh (uneven); NaN kept."""
    da = da.transpose("layer", "step")
    vdim = dimension(da)
    kdims = [dimension(da["step"], "step"), dimension(da["layer"], "layer")]
    regular = all(
        da.sizes[d] > 1 and np.allclose(np.diff(da[d].values.astype(float)), np.diff(da[d].values.astype(float))[0])
        for d in ("step", "layer")
    )
    data = da.astype(float)
    element = (hv.Image if regular else hv.QuadMesh)(data, kdims=kdims, vdims=[vdim])
    return _opts(
        element.relabel(title),
        bokeh=dict(
            cmap="viridis",
            colorbar=True,
            tools=["hover"],
            logz=logz,
            width=520,
            height=300,
            clipping_colors={"NaN": "transparent"},
            title=title,
        ),
        mpl=dict(cmap="viridis", colorbar=True, logz=logz, aspect=2.2, fig_inches=7, title=title),
    )


# ------------------------------------------------------------------------------ spectra
def spectrum(ds: xr.Dataset, layer: int, module: str, step: int | None = None, update: bool = False, history: int = 4):
    """The singular values of one (layer, module) at one step, with earlier steps faint behind.

    Args:
        ds (xr.Dataset): a spectral Dataset.
        layer (int), module (str): which adapter.
        step (int, optional): the step; default the last stored.
        update (bool, default False): the update since init (``update_singular_values``) instead
            of the adapter product.
        history (int, default 4): earlier stored steps drawn faint (evenly spaced before ``step``).

    Returns:
        hv.Overlay: the faint curves first, then the current step's Curve and Scatter (last).
    """
    name = "update_singular_values" if update else "singular_values"
    da = _sel(_need(ds, name, "the spectral store of a tracked run has it"), layer=layer, module=module)
    steps = da["step"].values
    step = int(steps[-1]) if step is None else step
    i = int(np.flatnonzero(steps == _sel(da, step=step)["step"].values)[0])
    svdim = da.dims[-1]
    xdim, ydim = dimension(da[svdim], svdim), dimension(da, name)
    earlier = np.unique(np.linspace(0, i, history + 1).astype(int)[:-1]) if i > 0 and history > 0 else []
    x = da[svdim].values
    faint = [
        _opts(
            hv.Curve((x, da.isel(step=j).values), xdim, ydim, label=f"step {int(steps[j])}"),
            bokeh=dict(color="gray", alpha=a, line_width=1),
            mpl=dict(color="gray", alpha=a, linewidth=1),
        )
        for j, a in zip(earlier, np.linspace(0.2, 0.6, len(earlier)))
    ]
    y = da.isel(step=i).values
    title = f"{module}, layer {layer}: {'update since init' if update else 's·B·A'} at step {step}"
    current = [
        _opts(
            hv.Curve((x, y), xdim, ydim, label=f"step {step}"),
            bokeh=dict(color="black", line_width=2),
            mpl=dict(color="black", linewidth=2),
        ),
        _opts(
            hv.Scatter((x, y), xdim, ydim, label=f"step {step}"),
            bokeh=dict(color="black", size=6),
            mpl=dict(color="black", s=20),
        ),
    ]
    return _opts(
        hv.Overlay([*faint, *current]),
        bokeh=dict(title=title, width=420, height=300, show_legend=False),
        mpl=dict(title=title, show_legend=False),
    )


def sv_trajectories(ds: xr.Dataset, layer: int, module: str, update: bool = False, svs=None):
    """Each singular value of one (layer, module) over steps.

    Args:
        ds (xr.Dataset): a spectral Dataset.
        layer (int), module (str): which adapter.
        update (bool, default False): trajectories of the update since init.
        svs (list of int, optional): which indices (default all).

    Returns:
        hv.NdOverlay keyed by the singular-value index, of Curves (step, value).
    """
    name = "update_singular_values" if update else "singular_values"
    da = _sel(_need(ds, name, "the spectral store of a tracked run has it"), layer=layer, module=module)
    svdim = da.dims[-1]
    indices = da[svdim].values if svs is None else list(svs)
    xdim, ydim = dimension(da["step"], "step"), dimension(da, name)
    curves = {int(k): hv.Curve((da["step"].values, _sel(da, **{svdim: k}).values), xdim, ydim) for k in indices}
    title = f"{module}, layer {layer}: singular values over training"
    return _opts(
        hv.NdOverlay(curves, kdims=[dimension(da[svdim], svdim)]),
        bokeh=dict(title=title, width=520, height=300, legend_position="right"),
        mpl=dict(title=title),
    )


def metric_heatmap(ds: xr.Dataset, metric: str, module: str, update: bool = False):
    """A spectrum metric as a layer x step heatmap for one module.

    Args:
        ds (xr.Dataset): a spectral Dataset.
        metric (str): e.g. "effective_rank", "entropy_effective_rank", "condition_number",
            "stable_rank", or any (step, layer, module) variable ("magnitude_direction_ratio",
            "rank_budget", ...).
        module (str): which module.
        update (bool, default False): the metric of the update since init (``update_<metric>``).

    Returns:
        hv.Image (evenly spaced steps and layers) or hv.QuadMesh, kdims (step, layer).
    """
    name = _metric_name(ds, metric, update)
    da = _sel(_need(ds, name, "metric names are those of the spectral Dataset"), module=module)
    return _heatmap(da, f"{axis_label(da, name)}, {module}")


# ------------------------------------------------------------------------------ gradients
def gradient_heatmap(
    gds: xr.Dataset, component: str, module: str | None = None, variable: str = "grad_norm", logz: bool = True
):
    """A gradient variable as a layer x step heatmap for one component and module.

    Args:
        gds (xr.Dataset): a gradient Dataset.
        component (str): "A", "B", "magnitude", "E", ...
        module (str, optional): which module; None = all modules combined: norms (``grad_norm``,
            ``weight_norm``) as √(Σ over modules of norm²), the norm over the whole layer, as the
            run's gradient PNGs draw them; ratios as their mean over modules (NaN ignored).
        variable (str, default "grad_norm"): or "grad_to_weight_ratio", "update_ratio", "weight_norm".
        logz (bool, default True): logarithmic colour scale.
    """
    da = _sel(_need(gds, variable, "the gradient store of a tracked run has it"), component=component)
    if module is None:
        if variable.endswith("_norm"):
            da = module_aggregate(da)
            da.attrs["long_name"] = f"{da.attrs.get('long_name', variable)}, modules combined (L2)"
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                da = da.mean("module", skipna=True, keep_attrs=True)
            da.attrs["long_name"] = f"{da.attrs.get('long_name', variable)}, mean over modules"
        where = "all modules"
    else:
        da = _sel(da, module=module)
        where = module
    return _heatmap(da, f"{axis_label(da, variable)}: {component}, {where}", logz=logz)


def ab_ratio(gds: xr.Dataset, module: str | None = None):
    """The ratio of A and B gradient norms, ‖∇A‖ / ‖∇B‖, as a layer x step heatmap.

    NaN where ‖∇B‖ is zero or missing. At LoRA's initialisation (B = 0) the ratio is 0: A gets no
    gradient until B has moved.

    Args:
        gds (xr.Dataset): a gradient Dataset with components A and B.
        module (str, optional): which module; None = ratio of the layer norms (modules combined by L2).
    """
    grad = _need(gds, "grad_norm", "the gradient store of a tracked run has it")
    a, b = _sel(grad, component="A"), _sel(grad, component="B")
    if module is None:
        a, b = module_aggregate(a), module_aggregate(b)
    else:
        a, b = _sel(a, module=module), _sel(b, module=module)
    ratio = (a / b.where(b > 0)).drop_vars("component", errors="ignore")
    ratio.name = "ab_ratio"
    ratio.attrs = {"long_name": "‖∇A‖ / ‖∇B‖", "units": "1"}
    return _heatmap(ratio, f"A/B gradient norm ratio, {module or 'modules combined (L2)'}")


# ------------------------------------------------------------------------------ method-specific
def dora_magnitude_direction(ds: xr.Dataset, layer: int, module: str):
    """DoRA: the magnitude norm against the direction norm of one (layer, module), coloured by step.

    Returns:
        hv.Scatter with kdims direction_norm, vdims (magnitude_norm, step).
    """
    why = "DoRA runs store it (peft type dora)"
    mag = _sel(_need(ds, "magnitude_norm", why), layer=layer, module=module)
    direction = _sel(_need(ds, "direction_norm", why), layer=layer, module=module)
    table = {
        "direction_norm": direction.values.astype(float),
        "magnitude_norm": mag.values.astype(float),
        "step": mag["step"].values,
    }
    title = f"DoRA magnitude vs direction, {module}, layer {layer}"
    return _opts(
        hv.Scatter(
            table,
            dimension(direction, "direction_norm"),
            [dimension(mag, "magnitude_norm"), dimension(mag["step"], "step")],
        ),
        bokeh=dict(
            color="step", cmap="viridis", colorbar=True, size=6, tools=["hover"], title=title, width=420, height=300
        ),
        mpl=dict(color="step", cmap="viridis", colorbar=True, title=title),
    )


def rank_budget(ds: xr.Dataset, module: str | None = None):
    """AdaLoRA: the rank budget over steps, summed over layers, one curve per module.

    Args:
        ds (xr.Dataset): a spectral Dataset of an AdaLoRA run (``rank_budget``).
        module (str, optional): one module only, one curve per layer.

    Returns:
        hv.NdOverlay of Curves (step, rank budget) keyed by module (or by layer).
    """
    da = _need(ds, "rank_budget", "AdaLoRA runs store it (peft type adalora)")
    xdim, ydim = dimension(da["step"], "step"), dimension(da, "rank_budget")
    if module is None:
        total = da.sum("layer", skipna=True, min_count=1)
        curves = {
            str(m): hv.Curve((da["step"].values, total.sel(module=m).values), xdim, ydim) for m in da["module"].values
        }
        key = hv.Dimension("module")
    else:
        one = _sel(da, module=module)
        curves = {
            int(v): hv.Curve((da["step"].values, one.sel(layer=v).values), xdim, ydim) for v in da["layer"].values
        }
        key = dimension(da["layer"], "layer")
    title = f"AdaLoRA rank budget{'' if module is None else ', ' + module}"
    return _opts(
        hv.NdOverlay(curves, kdims=[key]),
        bokeh=dict(title=title, width=520, height=300, legend_position="right"),
        mpl=dict(title=title),
    )


# ------------------------------------------------------------------------------ training
def training_curves(metrics: xr.Dataset, keys=("reward", "completions/mean_length")):
    """Trainer logs over steps, one Curve per key (TRL names such as "rewards/format_reward/mean").

    Returns:
        hv.Layout of Curves (step, value).
    """
    if metrics is None:
        raise ValueError("This run has no training metrics (metrics.jsonl); they are written by perl.train.")
    curves = []
    for key in keys:
        name = metric_name(key)
        da = _need(metrics, name, "keys are the Trainer's log keys, as in metrics.jsonl")
        curve = hv.Curve(
            (da["step"].values, da.values.astype(float)), dimension(da["step"], "step"), dimension(da, name)
        )
        curves.append(_opts(curve, bokeh=dict(width=360, height=300, title=str(key)), mpl=dict(title=str(key))))
    return hv.Layout(curves).cols(len(curves))


def with_training(plot, metrics: xr.Dataset | None, keys=("reward", "completions/mean_length")):
    """Any plot over steps with reward and completion length beside it (steps axes linked).

    Returns the plot unchanged when the run has no metrics.
    """
    if metrics is None:
        return plot
    present = [k for k in keys if metric_name(k) in metrics]
    if not present:
        return plot
    return hv.Layout([plot, *training_curves(metrics, present)]).cols(1 + len(present))
