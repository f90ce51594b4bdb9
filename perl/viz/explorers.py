"""Widgets to slide over a run's layers and steps: spectra, gradient flow, several runs side by side.

An explorer reads a run's stored Datasets once, keeps their arrays in memory, and on every slider
move slices those arrays into the Bokeh sources of a few `views` (see `perl.viz.views`) and pushes
the change to the browser. The controls are ipywidgets; the figures are one Bokeh layout shown
through Panel's notebook bridge (JupyterLab renders it with the pyviz extension; in papermill the
output keeps a static snapshot). A text line under the controls states the selection and the values
drawn, so what the figure shows can be read back (browser tests, screen readers, logs).

Usage:
    ex = SpectralExplorer(perl.open_run("runs/demo"))
    ex                                        # last expression of a cell: shows it
    ex.select(layer=3, step=100, module="v_proj")
    ex.current                                # the selection and the values drawn
"""

from __future__ import annotations

import contextlib
import html
import warnings

import ipywidgets as widgets
import numpy as np
from bokeh.layouts import column, row

from perl.run import MissingDataWarning, Run, Runs, metric_name, open_runs
from perl.viz.views import HeatmapView, LinesView, axis_label, category_colors, depth_colors, inline_notebook_resources

__all__ = ["SpectralExplorer", "GradientExplorer", "RunComparison", "PRODUCT", "UPDATE"]

PRODUCT = "product"
UPDATE = "update since init"
SPECTRAL_HEATMAP_METRICS = (
    "effective_rank", "entropy_effective_rank", "stable_rank", "condition_number", "spectral_gap",
    "nuclear_norm", "frobenius_norm", "top1_sv_ratio", "top5_sv_ratio", "top10_sv_ratio", "numerical_rank",
    "magnitude_norm", "direction_norm", "magnitude_direction_ratio", "rank_budget",
    "vector_norm", "vector_distance_from_init",
)
GRADIENT_VARIABLES = ("grad_norm", "grad_to_weight_ratio", "update_ratio")
MEAN = "mean"  # RunComparison's layer slider value for the mean over layers


def _fmt(value) -> str:
    value = float(value)
    return "nan" if not np.isfinite(value) else f"{value:.4g}"


def _index(options, value, what: str) -> int:
    """Position of ``value`` among ``options`` (exact), or a clear error naming what exists."""
    for i, option in enumerate(options):
        if option == value:
            return i
    shown = list(options)
    listing = f"{shown[0]} .. {shown[-1]} ({len(shown)} values)" if len(shown) > 12 else ", ".join(map(str, shown))
    raise ValueError(f"{what} {value!r} is not in this run; choose one of {listing}.")


def _training_series(metrics, key):
    """(steps, values) of a Trainer log key, or None when the run did not log it."""
    if metrics is None:
        return None
    name = metric_name(key)
    if name not in metrics:
        return None
    da = metrics[name]
    return np.asarray(da["step"].values, dtype=float), np.asarray(da.values, dtype=float)


def _quiet(getter):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingDataWarning)
        return getter()


class _Explorer:
    """Shared machinery: holding redraws while several widgets change, pushing, displaying."""

    def __init__(self):
        self._holding = 0
        self._pending: set[str] = set()
        self._pane = None
        self.info = widgets.HTML(layout=widgets.Layout(width="100%"))
        self.refresh_button = widgets.Button(description="refresh", icon="refresh", tooltip="re-read the run folder (a run still training)")
        self.refresh_button.on_click(lambda _: self.refresh())

    # ---- subclasses provide: self.controls (ipywidgets box), self.layout (Bokeh), _draw(parts)
    @property
    def pane(self):
        """The Panel pane holding the Bokeh figures (created on first use)."""
        if self._pane is None:
            import panel as pn

            self._pane = pn.pane.Bokeh(self.layout)
        return self._pane

    @contextlib.contextmanager
    def _hold(self):
        """Collect redraw requests while several controls change; draw and push once at the end."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            if not self._holding:
                parts, self._pending = self._pending, set()
                if parts:
                    self._redraw(parts)

    def _changed(self, parts: set[str]) -> None:
        if self._holding:
            self._pending |= parts
        else:
            self._redraw(parts)

    def _redraw(self, parts: set[str]) -> None:
        self._draw(parts)
        self._push()

    def _push(self) -> None:
        # only once shown in a notebook is there a browser to push to
        if self._pane is not None and self._pane._models:
            from panel.io.notebook import push_notebook

            push_notebook(self._pane)

    def display(self) -> None:
        """Show the controls, the value line and the figures in the notebook."""
        from IPython.display import display
        import panel as pn

        inline_notebook_resources()
        if not pn.extension._loaded:
            pn.extension()
        display(self.controls)
        display(self.pane)

    def _ipython_display_(self):
        # IPython calls this for the last expression of a cell: two outputs, controls and figures
        self.display()

    def _set(self, targets: dict) -> None:
        """Move several controls at once: ``{widget: (options, value or None, name)}``.

        Every value is checked before any control moves, so a bad value changes nothing.
        """
        moves = {w: _index(options, value, name) for w, (options, value, name) in targets.items() if value is not None}
        with self._hold():
            for widget, index in moves.items():
                widget.index = index

    def _observe(self, widget, parts: set[str]) -> None:
        widget.observe(lambda change: self._changed(parts), names="value")


# ====================================================================================== spectra
class SpectralExplorer(_Explorer):
    """Slide over a run's adapter spectra: layer, step, module, product vs update since init.

    Shows the spectrum of the selected (layer, module) at the selected step with earlier steps
    faint behind it, the singular-value trajectories of that (layer, module) over training, a
    layer x step heatmap of a spectrum metric for the module, and reward / completion length
    over steps, all with the selection marked.

    Usage:
        ex = SpectralExplorer(perl.open_run("runs/demo"))
        ex                                    # show (last expression of a cell)
        ex.select(layer=3, step=100, module="v_proj", kind="update since init", metric="stable_rank")
        ex.current["sigma"]                   # the singular values drawn

    Args:
        run (Run | str | Path): the run (or its folder).
        module (str, optional): initial module; default the first.
        layer (int, optional): initial layer; default the first.
        step (int, optional): initial step; default the last stored.
        metric (str, default "effective_rank"): initial heatmap metric.
        history (int, default 4): earlier steps drawn faint behind the spectrum.
    """

    def __init__(self, run, module=None, layer=None, step=None, metric="effective_rank", history=4):
        super().__init__()
        self.run = run if isinstance(run, Run) else Run(run)
        self.history = int(history)
        self._extract()
        self.module_w = widgets.Dropdown(description="module", options=self.modules)
        self.kind_w = widgets.ToggleButtons(options=self.kinds, description="spectrum")
        self.metric_w = widgets.Dropdown(description="metric", options=self.metric_names)
        self.layer_w = widgets.SelectionSlider(description="layer", options=self._layer_options())
        self.step_w = widgets.SelectionSlider(description="step", options=self._step_options(), layout=widgets.Layout(width="60%"))
        self.controls = widgets.VBox([
            widgets.HBox([self.module_w, self.metric_w, self.refresh_button]),
            self.kind_w,
            widgets.HBox([self.layer_w, self.step_w]),
            self.info,
        ])
        self.spectrum = LinesView("spectrum", "singular value index (0 = largest)", "singular value")
        self.heatmap = HeatmapView("metric", axis_label(self._attrs["step"], "step"), axis_label(self._attrs["layer"], "layer"))
        self.trajectories = LinesView("singular values over training", axis_label(self._attrs["step"], "step"),
                                      "singular value", x_range=self.heatmap.figure.x_range)
        self.reward = LinesView("reward", "optimizer step", "reward", legend=True, x_range=self.heatmap.figure.x_range, height=150)
        self.length = LinesView("completion length", "optimizer step", "tokens", x_range=self.heatmap.figure.x_range, height=150)
        self.layout = column(row(self.spectrum.figure, self.trajectories.figure),
                             row(self.heatmap.figure, column(self.reward.figure, self.length.figure)))
        for w, parts in ((self.module_w, {"spectrum", "trajectories", "heatmap"}), (self.layer_w, {"spectrum", "trajectories"}),
                         (self.step_w, {"spectrum"}), (self.kind_w, {"spectrum", "trajectories", "heatmap"}),
                         (self.metric_w, {"heatmap"})):
            self._observe(w, parts | {"markers", "info"})
        with self._hold():
            self.select(module=module if module is not None else self.modules[0],
                        layer=layer if layer is not None else self.layers[0],
                        step=step if step is not None else self.steps[-1],
                        metric=metric if metric in self.metric_names else self.metric_names[0])
            self._pending |= {"spectrum", "trajectories", "heatmap", "markers", "info", "training"}

    # ------------------------------------------------------------------ data
    def _extract(self) -> None:
        ds = self.run.spectral
        if ds is None:
            raise ValueError(f"Run {self.run.path} has no spectral data; train with --enable_spectral_tracking to explore spectra.")
        self.steps = [int(s) for s in ds["step"].values]
        self.layers = [int(v) for v in ds["layer"].values]
        self.modules = [str(m) for m in ds["module"].values]
        self._attrs = {"step": dict(ds["step"].attrs), "layer": dict(ds["layer"].attrs)}
        order = ("step", "layer", "module")
        # IA3 and LayerNorm tuning adapt vectors: no spectrum, only norms (the heatmap still works)
        self.sv = {kind: ds[name].transpose(*order, ...).values
                   for kind, name in ((PRODUCT, "singular_values"), (UPDATE, "update_singular_values")) if name in ds}
        self.kinds = list(self.sv) or [PRODUCT]
        self.arrays, self.labels = {}, {}
        for name, da in ds.data_vars.items():
            if set(da.dims) == set(order):
                self.arrays[name] = da.transpose(*order).values
                self.labels[name] = axis_label(da, name)
        self.metric_names = [m for m in SPECTRAL_HEATMAP_METRICS if m in self.arrays] or [
            n for n in self.arrays if not n.startswith("update_")]
        if not self.metric_names:
            raise ValueError(f"The spectral store of {self.run.path} has no (step, layer, module) variables; is it a spectral store?")
        metrics = _quiet(lambda: self.run.metrics)
        per_reward = [] if metrics is None else [
            str(metrics[k].attrs.get("long_name", k)) for k in metrics.data_vars if k.startswith("rewards.") and k.endswith(".mean")]
        self.training = {key: _training_series(metrics, key) for key in ("reward", *per_reward, "completions/mean_length")}

    def _layer_options(self):
        return [(str(v), v) for v in self.layers]

    def _step_options(self):
        return [(str(v), v) for v in self.steps]

    def _metric_var(self) -> str:
        metric = self.metric_w.value
        if self.kind_w.value == UPDATE and f"update_{metric}" in self.arrays:
            return f"update_{metric}"
        return metric

    # ------------------------------------------------------------------ selection
    def select(self, layer=None, step=None, module=None, kind=None, metric=None) -> "SpectralExplorer":
        """Set any of the controls (the figures redraw once). Values must exist in the run.

        Args:
            layer (int), step (int), module (str): the selection.
            kind (str): "product" (s·B·A) or "update since init" (s(B·A - B0·A0)).
            metric (str): heatmap metric, e.g. "effective_rank", "stable_rank", "condition_number".
        """
        self._set({self.module_w: (self.modules, module, "module"), self.layer_w: (self.layers, layer, "layer"),
                   self.step_w: (self.steps, step, "step"), self.kind_w: (self.kinds, kind, "spectrum kind"),
                   self.metric_w: (self.metric_names, metric, "metric")})
        return self

    @property
    def current(self) -> dict:
        """The selection and the values drawn for it."""
        s, l, m = self.step_w.index, self.layer_w.index, self.module_w.index
        var = self._metric_var()
        kind = self.kind_w.value
        return {
            "layer": self.layers[l], "step": self.steps[s], "module": self.modules[m], "kind": kind, "metric": var,
            "sigma": self.sv[kind][s, l, m].astype(float) if kind in self.sv else np.zeros(0),
            "metric_value": float(self.arrays[var][s, l, m]),
        }

    # ------------------------------------------------------------------ drawing
    def _draw(self, parts: set[str]) -> None:
        s, l, m = self.step_w.index, self.layer_w.index, self.module_w.index
        kind = self.kind_w.value
        sv = self.sv.get(kind)
        if sv is None:  # a vector adapter: nothing to draw in the spectrum views
            parts = parts - {"spectrum", "trajectories"}
        if "spectrum" in parts:
            earlier = np.unique(np.linspace(0, s, self.history + 1).astype(int)[:-1]) if s > 0 and self.history > 0 else []
            shown = [*earlier, s]
            x = np.arange(sv.shape[-1])
            self.spectrum.set_lines(
                [x] * len(shown), [sv[i, l, m] for i in shown],
                colors=["#999999"] * len(earlier) + ["black"],
                alphas=list(np.linspace(0.2, 0.6, len(earlier))) + [1.0],
                labels=[f"step {self.steps[i]}" for i in shown],
                widths=[1.0] * len(earlier) + [2.0],
            )
            self.spectrum.set_points(x, sv[s, l, m])
            self.spectrum.figure.title.text = f"{self.modules[m]}, layer {self.layers[l]}: {kind} at step {self.steps[s]}"
        if "trajectories" in parts:
            k = sv.shape[-1]
            ys = [sv[:, l, m, i] for i in range(k)]
            self.trajectories.set_lines([self.steps] * k, ys, colors=depth_colors(k), labels=[f"σ{i}" for i in range(k)])
            self.trajectories.figure.title.text = f"{self.modules[m]}, layer {self.layers[l]}: singular values ({kind})"
        if "heatmap" in parts:
            var = self._metric_var()
            self.heatmap.set_data(self.arrays[var][:, :, m].T, self.steps, self.layers, self.labels[var],
                                  title=f"{self.labels[var]}, {self.modules[m]}")
        if "training" in parts:
            self._draw_training()
        if "markers" in parts:
            step, layer = self.steps[s], self.layers[l]
            self.heatmap.set_marker(step, layer)
            for view in (self.trajectories, self.reward, self.length):
                view.set_marker(step)
        if "info" in parts:
            cur = self.current
            sigma = f"σ = [{', '.join(_fmt(v) for v in cur['sigma'])}]" if sv is not None else "no spectrum (vector adapter)"
            self.info.value = (
                f"<span class='perl-info'>layer <b>{cur['layer']}</b> | module <b>{html.escape(cur['module'])}</b> | "
                f"step <b>{cur['step']}</b> | {html.escape(cur['kind'])} | {sigma} | "
                f"{html.escape(cur['metric'])} = {_fmt(cur['metric_value'])}</span>"
            )

    def _draw_training(self) -> None:
        rewards = [(k, v) for k, v in self.training.items() if k != "completions/mean_length" and v is not None]
        if rewards:
            self.reward.set_lines([v[0] for _, v in rewards], [v[1] for _, v in rewards],
                                  colors=category_colors(len(rewards)), labels=[k for k, _ in rewards])
        length = self.training.get("completions/mean_length")
        if length is not None:
            self.length.set_lines([length[0]], [length[1]], colors="black", labels=["completions/mean_length"])

    # ------------------------------------------------------------------ refresh
    def refresh(self) -> "SpectralExplorer":
        """Re-read the run (one still training); the step slider follows the newest step if it was on the last."""
        at_end = self.step_w.index == len(self.steps) - 1
        keep = dict(layer=self.layer_w.value, step=self.step_w.value, module=self.module_w.value,
                    kind=self.kind_w.value, metric=self.metric_w.value)
        self.run.refresh()
        self._extract()
        with self._hold():
            self.module_w.options = self.modules
            self.kind_w.options = self.kinds
            self.metric_w.options = self.metric_names
            self.layer_w.options = self._layer_options()
            self.step_w.options = self._step_options()
            self.select(
                module=keep["module"] if keep["module"] in self.modules else self.modules[0],
                layer=keep["layer"] if keep["layer"] in self.layers else self.layers[0],
                step=self.steps[-1] if at_end or keep["step"] not in self.steps else keep["step"],
                kind=keep["kind"] if keep["kind"] in self.kinds else self.kinds[0],
                metric=keep["metric"] if keep["metric"] in self.metric_names else self.metric_names[0],
            )
            self._pending |= {"spectrum", "trajectories", "heatmap", "markers", "info", "training"}
        return self

    def __repr__(self) -> str:
        return f"<SpectralExplorer {self.run.label}: {len(self.steps)} steps x {len(self.layers)} layers x {len(self.modules)} modules>"


# ====================================================================================== gradients
class GradientExplorer(_Explorer):
    """Slide over a run's gradient flow: component, module, step, layer.

    Shows a layer x step heatmap of the chosen gradient variable for (component, module), its
    depth profile at the selected step for every component, its history at the selected layer
    with the A/B ratio, and the total gradient norm before and after clipping.

    Usage:
        ex = GradientExplorer(perl.open_run("runs/demo"))
        ex.select(component="B", module="q_proj", step=40, layer=2)
        ex.current["value"]

    Args:
        run (Run | str | Path): the run (or its folder).
        component (str, optional): initial component; default "A" if present.
        module (str, optional), layer (int, optional), step (int, optional): initial selection.
        variable (str, default "grad_norm"): "grad_norm", "grad_to_weight_ratio" or "update_ratio".
    """

    def __init__(self, run, component=None, module=None, layer=None, step=None, variable="grad_norm"):
        super().__init__()
        self.run = run if isinstance(run, Run) else Run(run)
        self._extract()
        self.variable_w = widgets.Dropdown(description="variable", options=self.variables)
        self.component_w = widgets.Dropdown(description="component", options=self.components)
        self.module_w = widgets.Dropdown(description="module", options=self.modules)
        self.layer_w = widgets.SelectionSlider(description="layer", options=[(str(v), v) for v in self.layers])
        self.step_w = widgets.SelectionSlider(description="step", options=[(str(v), v) for v in self.steps], layout=widgets.Layout(width="60%"))
        self.controls = widgets.VBox([
            widgets.HBox([self.variable_w, self.component_w, self.module_w, self.refresh_button]),
            widgets.HBox([self.layer_w, self.step_w]),
            self.info,
        ])
        step_label = axis_label(self._attrs["step"], "step")
        self.heatmap = HeatmapView("gradient", step_label, axis_label(self._attrs["layer"], "layer"), log=True)
        self.depth = LinesView("depth profile", axis_label(self._attrs["layer"], "layer"), "value", y_log=True, legend=True)
        self.history = LinesView("at the selected layer", step_label, "value", y_log=True, legend=True, x_range=self.heatmap.figure.x_range)
        self.ratio = LinesView("A/B gradient norm ratio", step_label, "‖∇A‖ / ‖∇B‖", x_range=self.heatmap.figure.x_range, height=200)
        self.totals = LinesView("total gradient norm", step_label, "norm", y_log=True, legend=True, x_range=self.heatmap.figure.x_range, height=200)
        self.layout = column(row(self.heatmap.figure, self.depth.figure), row(self.history.figure, column(self.ratio.figure, self.totals.figure)))
        for w, parts in ((self.variable_w, {"heatmap", "depth", "history", "labels"}), (self.component_w, {"heatmap"}),
                         (self.module_w, {"heatmap", "depth", "history", "ratio"}), (self.layer_w, {"history", "ratio"}),
                         (self.step_w, {"depth"})):
            self._observe(w, parts | {"markers", "info"})
        with self._hold():
            self.select(variable=variable if variable in self.variables else self.variables[0],
                        component=component if component is not None else ("A" if "A" in self.components else self.components[0]),
                        module=module if module is not None else self.modules[0],
                        layer=layer if layer is not None else self.layers[0],
                        step=step if step is not None else self.steps[-1])
            self._pending |= {"heatmap", "depth", "history", "ratio", "totals", "labels", "markers", "info"}

    def _extract(self) -> None:
        ds = self.run.gradients
        if ds is None:
            raise ValueError(f"Run {self.run.path} has no gradient data; train with --enable_gradient_tracking to explore gradients.")
        order = ("step", "layer", "module", "component")
        self.steps = [int(s) for s in ds["step"].values]
        self.layers = [int(v) for v in ds["layer"].values]
        self.modules = [str(m) for m in ds["module"].values]
        self.components = [str(c) for c in ds["component"].values]
        self._attrs = {"step": dict(ds["step"].attrs), "layer": dict(ds["layer"].attrs)}
        self.arrays = {n: ds[n].transpose(*order).values for n in GRADIENT_VARIABLES if n in ds and set(ds[n].dims) == set(order)}
        if not self.arrays:
            raise ValueError(f"The gradient store of {self.run.path} has none of {GRADIENT_VARIABLES}; is it a gradient store?")
        self.labels = {n: axis_label(ds[n], n) for n in self.arrays}
        self.variables = list(self.arrays)
        self.totals_data = {n: ds[n].values for n in ("total_grad_norm", "post_clip_grad_norm", "clip_coef") if n in ds}

    def select(self, component=None, module=None, layer=None, step=None, variable=None) -> "GradientExplorer":
        """Set any of the controls (the figures redraw once). Values must exist in the run."""
        self._set({self.variable_w: (self.variables, variable, "variable"),
                   self.component_w: (self.components, component, "component"),
                   self.module_w: (self.modules, module, "module"), self.layer_w: (self.layers, layer, "layer"),
                   self.step_w: (self.steps, step, "step")})
        return self

    def _ab(self, arr, s=slice(None), l=slice(None), m=0):
        if "A" not in self.components or "B" not in self.components:
            return None
        a, b = arr[s, l, m, self.components.index("A")], arr[s, l, m, self.components.index("B")]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(b > 0, a / b, np.nan)

    @property
    def current(self) -> dict:
        """The selection and the values drawn for it."""
        s, l, m, c = self.step_w.index, self.layer_w.index, self.module_w.index, self.component_w.index
        arr = self.arrays[self.variable_w.value]
        out = {"step": self.steps[s], "layer": self.layers[l], "module": self.modules[m], "component": self.components[c],
               "variable": self.variable_w.value, "value": float(arr[s, l, m, c]),
               "components": {name: float(arr[s, l, m, k]) for k, name in enumerate(self.components)}}
        ab = self._ab(self.arrays["grad_norm"], s, l, m) if "grad_norm" in self.arrays else None
        out["ab_ratio"] = float(ab) if ab is not None else None
        for n, v in self.totals_data.items():
            out[n] = float(v[s])
        return out

    def _draw(self, parts: set[str]) -> None:
        s, l, m, c = self.step_w.index, self.layer_w.index, self.module_w.index, self.component_w.index
        var = self.variable_w.value
        arr, label = self.arrays[var], self.labels[var]
        colors = category_colors(len(self.components))
        if "heatmap" in parts:
            self.heatmap.set_data(arr[:, :, m, c].T, self.steps, self.layers, label,
                                  title=f"{label}: {self.components[c]}, {self.modules[m]}")
        if "depth" in parts:
            self.depth.set_lines([self.layers] * len(self.components), [arr[s, :, m, k] for k in range(len(self.components))],
                                 colors=colors, labels=self.components)
            self.depth.figure.title.text = f"{self.modules[m]} at step {self.steps[s]}"
        if "history" in parts:
            self.history.set_lines([self.steps] * len(self.components), [arr[:, l, m, k] for k in range(len(self.components))],
                                   colors=colors, labels=self.components)
            self.history.figure.title.text = f"{self.modules[m]}, layer {self.layers[l]}"
        if "labels" in parts:
            self.depth.figure.yaxis.axis_label = label
            self.history.figure.yaxis.axis_label = label
        if "ratio" in parts and "grad_norm" in self.arrays:
            ab = self._ab(self.arrays["grad_norm"], slice(None), l, m)
            if ab is not None:
                self.ratio.set_lines([self.steps], [ab], colors="black", labels=["A/B"])
        if "totals" in parts and self.totals_data:
            names = [n for n in ("total_grad_norm", "post_clip_grad_norm") if n in self.totals_data]
            self.totals.set_lines([self.steps] * len(names), [self.totals_data[n] for n in names],
                                  colors=category_colors(len(names)), labels=names)
        if "markers" in parts:
            self.heatmap.set_marker(self.steps[s], self.layers[l])
            self.depth.set_marker(self.layers[l])
            for view in (self.history, self.ratio, self.totals):
                view.set_marker(self.steps[s])
        if "info" in parts:
            cur = self.current
            comps = ", ".join(f"{html.escape(k)}: {_fmt(v)}" for k, v in cur["components"].items())
            extra = "".join(f" | {n} = {_fmt(cur[n])}" for n in ("total_grad_norm", "clip_coef") if n in cur)
            ab = f" | A/B = {_fmt(cur['ab_ratio'])}" if cur["ab_ratio"] is not None else ""
            self.info.value = (
                f"<span class='perl-info'>step <b>{cur['step']}</b> | layer <b>{cur['layer']}</b> | module <b>{html.escape(cur['module'])}</b> | "
                f"component <b>{html.escape(cur['component'])}</b> | {html.escape(var)} = {_fmt(cur['value'])} | {comps}{ab}{extra}</span>"
            )

    def refresh(self) -> "GradientExplorer":
        """Re-read the run (one still training); the step slider follows the newest step if it was on the last."""
        at_end = self.step_w.index == len(self.steps) - 1
        keep = dict(component=self.component_w.value, module=self.module_w.value, layer=self.layer_w.value,
                    step=self.step_w.value, variable=self.variable_w.value)
        self.run.refresh()
        self._extract()
        with self._hold():
            self.variable_w.options = self.variables
            self.component_w.options = self.components
            self.module_w.options = self.modules
            self.layer_w.options = [(str(v), v) for v in self.layers]
            self.step_w.options = [(str(v), v) for v in self.steps]
            self.select(
                variable=keep["variable"] if keep["variable"] in self.variables else self.variables[0],
                component=keep["component"] if keep["component"] in self.components else self.components[0],
                module=keep["module"] if keep["module"] in self.modules else self.modules[0],
                layer=keep["layer"] if keep["layer"] in self.layers else self.layers[0],
                step=self.steps[-1] if at_end or keep["step"] not in self.steps else keep["step"],
            )
            self._pending |= {"heatmap", "depth", "history", "ratio", "totals", "labels", "markers", "info"}
        return self

    def __repr__(self) -> str:
        return f"<GradientExplorer {self.run.label}: {len(self.steps)} steps x {len(self.layers)} layers x {len(self.modules)} modules>"


# ====================================================================================== runs
class RunComparison(_Explorer):
    """The same metric for several runs side by side: over steps, over depth, and reward.

    Usage:
        cmp = RunComparison(perl.open_runs("runs/sweep/*"), metric="effective_rank", module="q_proj")
        cmp.select(layer=None, step=100)       # layer None = mean over layers
        cmp.current["values"]                  # {run label: value at the selection}

    Args:
        runs (Runs | list | str): an `open_runs` result, a list of runs/folders, or a glob.
        metric (str, default "effective_rank"): a spectral variable (step, layer, module), or a
            gradient variable as "grad_norm[A]" (variable[component]).
        module (str, optional): initial module; default the first.
        layer (int or None, default None): initial layer; None = mean over layers.
        step (int, optional): initial step; default the last.
    """

    def __init__(self, runs, metric="effective_rank", module=None, layer=None, step=None):
        super().__init__()
        self.runs = runs if isinstance(runs, Runs) else open_runs(runs)
        self._cache: dict[str, np.ndarray] = {}
        self._extract()
        self.metric_w = widgets.Dropdown(description="metric", options=self.metric_names)
        self.module_w = widgets.Dropdown(description="module", options=self.modules)
        self.layer_w = widgets.SelectionSlider(description="layer", options=self._layer_options())
        self.step_w = widgets.SelectionSlider(description="step", options=[(str(v), v) for v in self.steps], layout=widgets.Layout(width="60%"))
        self.controls = widgets.VBox([widgets.HBox([self.metric_w, self.module_w, self.refresh_button]),
                                      widgets.HBox([self.layer_w, self.step_w]), self.info])
        self.over_steps = LinesView("over training", "optimizer step", "value", legend=True, width=520)
        self.over_depth = LinesView("over depth", "layer", "value", legend=True)
        self.reward = LinesView("reward", "optimizer step", "reward", legend=True, x_range=self.over_steps.figure.x_range, width=520, height=220)
        self.layout = column(row(self.over_steps.figure, self.over_depth.figure), self.reward.figure)
        for w, parts in ((self.module_w, {"steps", "depth"}), (self.layer_w, {"steps"}), (self.step_w, {"depth"})):
            self._observe(w, parts | {"markers", "info"})
        self.metric_w.observe(self._on_metric, names="value")
        with self._hold():
            self.select(metric=metric if metric in self.metric_names else self.metric_names[0],
                        module=module if module is not None else self.modules[0], layer=layer,
                        step=step if step is not None else self.steps[-1])
            self._pending |= {"steps", "depth", "reward", "markers", "info"}

    def _extract(self) -> None:
        self._cache.clear()
        spectral, gradients = _quiet(lambda: self.runs.spectral), _quiet(lambda: self.runs.gradients)
        self.sources = {}
        for ds, kind in ((spectral, "spectral"), (gradients, "gradients")):
            if ds is None:
                continue
            for name, da in ds.data_vars.items():
                dims = set(da.dims)
                if dims == {"run", "step", "layer", "module"}:
                    self.sources[name] = (ds, name, None, kind)
                elif dims == {"run", "step", "layer", "module", "component"}:
                    for comp in ds["component"].values:
                        self.sources[f"{name}[{comp}]"] = (ds, name, str(comp), kind)
        if not self.sources:
            raise ValueError("None of these runs has spectral or gradient data to compare; train with --enable_tracking.")
        first = spectral if spectral is not None else gradients
        self.labels = [str(v) for v in first["run"].values]
        # spectral steps start at 0 (initialisation), gradient steps at 1: each metric slides over its own
        self.steps_by_kind = {kind: [int(s) for s in ds["step"].values]
                              for ds, kind in ((spectral, "spectral"), (gradients, "gradients")) if ds is not None}
        self.layers = sorted({int(v) for ds in (spectral, gradients) if ds is not None for v in ds["layer"].values})
        self.modules = list(dict.fromkeys(str(m) for ds in (spectral, gradients) if ds is not None for m in ds["module"].values))
        preferred = [m for m in SPECTRAL_HEATMAP_METRICS if m in self.sources]
        self.metric_names = preferred + [m for m in self.sources if m not in preferred]
        self.steps = self.steps_by_kind[self.sources[self.metric_names[0]][3]]
        metrics = _quiet(lambda: self.runs.metrics)
        self.rewards = None
        if metrics is not None and "reward" in metrics:
            self.rewards = (metrics["step"].values.astype(float), {str(r): metrics["reward"].sel(run=r).values for r in metrics["run"].values})

    def _on_metric(self, change) -> None:
        with self._hold():
            steps = self.steps_by_kind[self.sources[self.metric_w.value][3]]
            if steps != self.steps:
                old = self.step_w.value
                self.steps = steps
                self.step_w.options = [(str(v), v) for v in steps]
                self.step_w.index = int(np.argmin(np.abs(np.asarray(steps) - old)))
            self._changed({"steps", "depth", "markers", "info"})

    def _layer_options(self):
        return [("mean", MEAN)] + [(str(v), v) for v in self.layers]

    def _values(self, metric: str) -> np.ndarray:
        """metric as (run, step, layer, module) on the union grids, computed once per metric."""
        if metric not in self._cache:
            ds, name, comp, _ = self.sources[metric]
            da = ds[name] if comp is None else ds[name].sel(component=comp)
            da = da.reindex(step=self.steps, layer=self.layers, module=self.modules).reindex(run=self.labels)
            self._cache[metric] = np.asarray(da.transpose("run", "step", "layer", "module").values, dtype=float)
        return self._cache[metric]

    def select(self, metric=None, module=None, layer="keep", step=None) -> "RunComparison":
        """Set any of the controls; ``layer=None`` means the mean over layers."""
        layers = [MEAN, *self.layers]
        self._set({self.metric_w: (self.metric_names, metric, "metric"), self.module_w: (self.modules, module, "module"),
                   self.layer_w: (layers, MEAN if layer is None else None if layer == "keep" else layer, "layer")})
        # the step slider's options depend on the metric (spectral or gradient steps): set it after
        self._set({self.step_w: (self.steps, step, "step")})
        return self

    def _at_layer(self, values: np.ndarray, m: int) -> np.ndarray:
        """(run, step) at the selected layer, or the mean over layers (NaN-aware)."""
        if self.layer_w.index == 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN
                return np.nanmean(values[:, :, :, m], axis=2)
        return values[:, :, self.layer_w.index - 1, m]

    @property
    def current(self) -> dict:
        """The selection and, per run, the value drawn at (step, layer or mean, module)."""
        values = self._values(self.metric_w.value)
        m, s = self.module_w.index, self.step_w.index
        at = self._at_layer(values, m)[:, s]
        return {"metric": self.metric_w.value, "module": self.modules[m], "layer": None if self.layer_w.index == 0 else self.layer_w.value,
                "step": self.steps[s], "values": {lab: float(v) for lab, v in zip(self.labels, at)}}

    def _draw(self, parts: set[str]) -> None:
        values = self._values(self.metric_w.value)
        m, s = self.module_w.index, self.step_w.index
        colors = category_colors(len(self.labels))
        metric = self.metric_w.value
        where = "mean over layers" if self.layer_w.index == 0 else f"layer {self.layer_w.value}"
        if "steps" in parts:
            series = self._at_layer(values, m)
            self.over_steps.set_lines([self.steps] * len(self.labels), list(series), colors=colors, labels=self.labels)
            self.over_steps.figure.title.text = f"{metric}, {self.modules[m]}, {where}"
            self.over_steps.figure.yaxis.axis_label = metric
        if "depth" in parts:
            self.over_depth.set_lines([self.layers] * len(self.labels), [values[i, s, :, m] for i in range(len(self.labels))],
                                      colors=colors, labels=self.labels)
            self.over_depth.figure.title.text = f"{metric}, {self.modules[m]} at step {self.steps[s]}"
            self.over_depth.figure.yaxis.axis_label = metric
        if "reward" in parts and self.rewards is not None:
            steps, by_run = self.rewards
            labs = [lab for lab in self.labels if lab in by_run]
            self.reward.set_lines([steps] * len(labs), [by_run[lab] for lab in labs],
                                  colors=[colors[self.labels.index(lab)] for lab in labs], labels=labs)
        if "markers" in parts:
            self.over_steps.set_marker(self.steps[s])
            self.reward.set_marker(self.steps[s])
            self.over_depth.set_marker(None if self.layer_w.index == 0 else self.layer_w.value)
        if "info" in parts:
            cur = self.current
            vals = "; ".join(f"{html.escape(k)} = {_fmt(v)}" for k, v in cur["values"].items())
            self.info.value = (f"<span class='perl-info'>{html.escape(metric)} | module <b>{html.escape(cur['module'])}</b> | "
                               f"{where} | step <b>{cur['step']}</b> | {vals}</span>")

    def refresh(self) -> "RunComparison":
        """Re-read every run (runs still training)."""
        keep = dict(metric=self.metric_w.value, module=self.module_w.value, layer=self.layer_w.value, step=self.step_w.value)
        at_end = self.step_w.index == len(self.steps) - 1
        self.runs.refresh()
        self._extract()
        metric = keep["metric"] if keep["metric"] in self.metric_names else self.metric_names[0]
        self.steps = self.steps_by_kind[self.sources[metric][3]]
        with self._hold():
            self.metric_w.options = self.metric_names
            self.module_w.options = self.modules
            self.layer_w.options = self._layer_options()
            self.step_w.options = [(str(v), v) for v in self.steps]
            self.select(metric=metric,
                        module=keep["module"] if keep["module"] in self.modules else self.modules[0],
                        layer=keep["layer"] if keep["layer"] in self.layers else None,
                        step=self.steps[-1] if at_end or keep["step"] not in self.steps else keep["step"])
            self._pending |= {"steps", "depth", "reward", "markers", "info"}
        return self

    def __repr__(self) -> str:
        return f"<RunComparison of {len(self.labels)} runs: {', '.join(self.labels[:4])}{', ...' if len(self.labels) > 4 else ''}>"
