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

import html

import ipywidgets as widgets
import numpy as np
from bokeh.layouts import column, row

from perl.run import Run
from perl.viz.comparison import RunComparison
from perl.viz.explorer_base import (
    GRADIENT_VARIABLES,
    PRODUCT,
    SPECTRAL_HEATMAP_METRICS,
    UPDATE,
    _Explorer,
    _fmt,
    _quiet,
    _training_series,
)
from perl.viz.views import HeatmapView, LinesView, axis_label, category_colors, depth_colors

__all__ = ["SpectralExplorer", "GradientExplorer", "RunComparison", "PRODUCT", "UPDATE"]


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
        self.step_w = widgets.SelectionSlider(
            description="step", options=self._step_options(), layout=widgets.Layout(width="60%")
        )
        self.controls = widgets.VBox(
            [
                widgets.HBox([self.module_w, self.metric_w, self.refresh_button]),
                self.kind_w,
                widgets.HBox([self.layer_w, self.step_w]),
                self.info,
            ]
        )
        self.spectrum = LinesView("spectrum", "singular value index (0 = largest)", "singular value")
        self.heatmap = HeatmapView(
            "metric", axis_label(self._attrs["step"], "step"), axis_label(self._attrs["layer"], "layer")
        )
        self.trajectories = LinesView(
            "singular values over training",
            axis_label(self._attrs["step"], "step"),
            "singular value",
            x_range=self.heatmap.figure.x_range,
        )
        self.reward = LinesView(
            "reward", "optimizer step", "reward", legend=True, x_range=self.heatmap.figure.x_range, height=150
        )
        self.length = LinesView(
            "completion length", "optimizer step", "tokens", x_range=self.heatmap.figure.x_range, height=150
        )
        self.layout = column(
            row(self.spectrum.figure, self.trajectories.figure),
            row(self.heatmap.figure, column(self.reward.figure, self.length.figure)),
        )
        for w, parts in (
            (self.module_w, {"spectrum", "trajectories", "heatmap"}),
            (self.layer_w, {"spectrum", "trajectories"}),
            (self.step_w, {"spectrum"}),
            (self.kind_w, {"spectrum", "trajectories", "heatmap"}),
            (self.metric_w, {"heatmap"}),
        ):
            self._observe(w, parts | {"markers", "info"})
        with self._hold():
            self.select(
                module=module if module is not None else self.modules[0],
                layer=layer if layer is not None else self.layers[0],
                step=step if step is not None else self.steps[-1],
                metric=metric if metric in self.metric_names else self.metric_names[0],
            )
            self._pending |= {"spectrum", "trajectories", "heatmap", "markers", "info", "training"}

    # ------------------------------------------------------------------ data
    def _extract(self) -> None:
        ds = self.run.spectral
        if ds is None:
            raise ValueError(
                f"Run {self.run.path} has no spectral data; train with --enable_spectral_tracking to explore spectra."
            )
        self.steps = [int(s) for s in ds["step"].values]
        self.layers = [int(v) for v in ds["layer"].values]
        self.modules = [str(m) for m in ds["module"].values]
        self._attrs = {"step": dict(ds["step"].attrs), "layer": dict(ds["layer"].attrs)}
        order = ("step", "layer", "module")
        # IA3 and LayerNorm tuning adapt vectors: no spectrum, only norms (the heatmap still works)
        self.sv = {
            kind: ds[name].transpose(*order, ...).values
            for kind, name in ((PRODUCT, "singular_values"), (UPDATE, "update_singular_values"))
            if name in ds
        }
        self.kinds = list(self.sv) or [PRODUCT]
        self.arrays, self.labels = {}, {}
        for name, da in ds.data_vars.items():
            if set(da.dims) == set(order):
                self.arrays[name] = da.transpose(*order).values
                self.labels[name] = axis_label(da, name)
        self.metric_names = [m for m in SPECTRAL_HEATMAP_METRICS if m in self.arrays] or [
            n for n in self.arrays if not n.startswith("update_")
        ]
        if not self.metric_names:
            raise ValueError(
                f"The spectral store of {self.run.path} has no (step, layer, module) variables; is it a spectral store?"
            )
        metrics = _quiet(lambda: self.run.metrics)
        per_reward = (
            []
            if metrics is None
            else [
                str(metrics[k].attrs.get("long_name", k))
                for k in metrics.data_vars
                if k.startswith("rewards.") and k.endswith(".mean")
            ]
        )
        self.training = {
            key: _training_series(metrics, key) for key in ("reward", *per_reward, "completions/mean_length")
        }

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
    def select(self, layer=None, step=None, module=None, kind=None, metric=None) -> SpectralExplorer:
        """Set any of the controls (the figures redraw once). Values must exist in the run.

        Args:
            layer (int), step (int), module (str): the selection.
            kind (str): "product" (s·B·A) or "update since init" (s(B·A - B0·A0)).
            metric (str): heatmap metric, e.g. "effective_rank", "stable_rank", "condition_number".
        """
        self._set(
            {
                self.module_w: (self.modules, module, "module"),
                self.layer_w: (self.layers, layer, "layer"),
                self.step_w: (self.steps, step, "step"),
                self.kind_w: (self.kinds, kind, "spectrum kind"),
                self.metric_w: (self.metric_names, metric, "metric"),
            }
        )
        return self

    @property
    def current(self) -> dict:
        """The selection and the values drawn for it."""
        s, l, m = self.step_w.index, self.layer_w.index, self.module_w.index
        var = self._metric_var()
        kind = self.kind_w.value
        return {
            "layer": self.layers[l],
            "step": self.steps[s],
            "module": self.modules[m],
            "kind": kind,
            "metric": var,
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
            earlier = (
                np.unique(np.linspace(0, s, self.history + 1).astype(int)[:-1]) if s > 0 and self.history > 0 else []
            )
            shown = [*earlier, s]
            x = np.arange(sv.shape[-1])
            self.spectrum.set_lines(
                [x] * len(shown),
                [sv[i, l, m] for i in shown],
                colors=["#999999"] * len(earlier) + ["black"],
                alphas=list(np.linspace(0.2, 0.6, len(earlier))) + [1.0],
                labels=[f"step {self.steps[i]}" for i in shown],
                widths=[1.0] * len(earlier) + [2.0],
            )
            self.spectrum.set_points(x, sv[s, l, m])
            self.spectrum.figure.title.text = (
                f"{self.modules[m]}, layer {self.layers[l]}: {kind} at step {self.steps[s]}"
            )
        if "trajectories" in parts:
            k = sv.shape[-1]
            ys = [sv[:, l, m, i] for i in range(k)]
            self.trajectories.set_lines(
                [self.steps] * k, ys, colors=depth_colors(k), labels=[f"σ{i}" for i in range(k)]
            )
            self.trajectories.figure.title.text = (
                f"{self.modules[m]}, layer {self.layers[l]}: singular values ({kind})"
            )
        if "heatmap" in parts:
            var = self._metric_var()
            self.heatmap.set_data(
                self.arrays[var][:, :, m].T,
                self.steps,
                self.layers,
                self.labels[var],
                title=f"{self.labels[var]}, {self.modules[m]}",
            )
        if "training" in parts:
            self._draw_training()
        if "markers" in parts:
            step, layer = self.steps[s], self.layers[l]
            self.heatmap.set_marker(step, layer)
            for view in (self.trajectories, self.reward, self.length):
                view.set_marker(step)
        if "info" in parts:
            cur = self.current
            sigma = (
                f"σ = [{', '.join(_fmt(v) for v in cur['sigma'])}]"
                if sv is not None
                else "no spectrum (vector adapter)"
            )
            self.info.value = (
                f"<span class='perl-info'>layer <b>{cur['layer']}</b> | module <b>{html.escape(cur['module'])}</b> | "
                f"step <b>{cur['step']}</b> | {html.escape(cur['kind'])} | {sigma} | "
                f"{html.escape(cur['metric'])} = {_fmt(cur['metric_value'])}</span>"
            )

    def _draw_training(self) -> None:
        rewards = [(k, v) for k, v in self.training.items() if k != "completions/mean_length" and v is not None]
        if rewards:
            self.reward.set_lines(
                [v[0] for _, v in rewards],
                [v[1] for _, v in rewards],
                colors=category_colors(len(rewards)),
                labels=[k for k, _ in rewards],
            )
        length = self.training.get("completions/mean_length")
        if length is not None:
            self.length.set_lines([length[0]], [length[1]], colors="black", labels=["completions/mean_length"])

    # ------------------------------------------------------------------ refresh
    _controls = ("module", "kind", "metric", "layer", "step")

    def refresh(self) -> SpectralExplorer:
        """Re-read the run (one still training); the step slider follows the newest step if it was on the last."""
        return self._refresh(
            lambda: {
                "module": (self.modules, self.modules),
                "kind": (self.kinds, self.kinds),
                "metric": (self.metric_names, self.metric_names),
                "layer": (self._layer_options(), self.layers),
                "step": (self._step_options(), self.steps),
            },
            {"spectrum", "trajectories", "heatmap", "markers", "info", "training"},
        )

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
        self.step_w = widgets.SelectionSlider(
            description="step", options=[(str(v), v) for v in self.steps], layout=widgets.Layout(width="60%")
        )
        self.controls = widgets.VBox(
            [
                widgets.HBox([self.variable_w, self.component_w, self.module_w, self.refresh_button]),
                widgets.HBox([self.layer_w, self.step_w]),
                self.info,
            ]
        )
        step_label = axis_label(self._attrs["step"], "step")
        self.heatmap = HeatmapView("gradient", step_label, axis_label(self._attrs["layer"], "layer"), log=True)
        self.depth = LinesView(
            "depth profile", axis_label(self._attrs["layer"], "layer"), "value", y_log=True, legend=True
        )
        self.history = LinesView(
            "at the selected layer", step_label, "value", y_log=True, legend=True, x_range=self.heatmap.figure.x_range
        )
        self.ratio = LinesView(
            "A/B gradient norm ratio", step_label, "‖∇A‖ / ‖∇B‖", x_range=self.heatmap.figure.x_range, height=200
        )
        self.totals = LinesView(
            "total gradient norm",
            step_label,
            "norm",
            y_log=True,
            legend=True,
            x_range=self.heatmap.figure.x_range,
            height=200,
        )
        self.layout = column(
            row(self.heatmap.figure, self.depth.figure),
            row(self.history.figure, column(self.ratio.figure, self.totals.figure)),
        )
        for w, parts in (
            (self.variable_w, {"heatmap", "depth", "history", "labels"}),
            (self.component_w, {"heatmap"}),
            (self.module_w, {"heatmap", "depth", "history", "ratio"}),
            (self.layer_w, {"history", "ratio"}),
            (self.step_w, {"depth"}),
        ):
            self._observe(w, parts | {"markers", "info"})
        with self._hold():
            self.select(
                variable=variable if variable in self.variables else self.variables[0],
                component=component
                if component is not None
                else ("A" if "A" in self.components else self.components[0]),
                module=module if module is not None else self.modules[0],
                layer=layer if layer is not None else self.layers[0],
                step=step if step is not None else self.steps[-1],
            )
            self._pending |= {"heatmap", "depth", "history", "ratio", "totals", "labels", "markers", "info"}

    def _extract(self) -> None:
        ds = self.run.gradients
        if ds is None:
            raise ValueError(
                f"Run {self.run.path} has no gradient data; train with --enable_gradient_tracking to explore gradients."
            )
        order = ("step", "layer", "module", "component")
        self.steps = [int(s) for s in ds["step"].values]
        self.layers = [int(v) for v in ds["layer"].values]
        self.modules = [str(m) for m in ds["module"].values]
        self.components = [str(c) for c in ds["component"].values]
        self._attrs = {"step": dict(ds["step"].attrs), "layer": dict(ds["layer"].attrs)}
        self.arrays = {
            n: ds[n].transpose(*order).values for n in GRADIENT_VARIABLES if n in ds and set(ds[n].dims) == set(order)
        }
        if not self.arrays:
            raise ValueError(
                f"The gradient store of {self.run.path} has none of {GRADIENT_VARIABLES}; is it a gradient store?"
            )
        self.labels = {n: axis_label(ds[n], n) for n in self.arrays}
        self.variables = list(self.arrays)
        self.totals_data = {
            n: ds[n].values for n in ("total_grad_norm", "post_clip_grad_norm", "clip_coef") if n in ds
        }

    def select(self, component=None, module=None, layer=None, step=None, variable=None) -> GradientExplorer:
        """Set any of the controls (the figures redraw once). Values must exist in the run."""
        self._set(
            {
                self.variable_w: (self.variables, variable, "variable"),
                self.component_w: (self.components, component, "component"),
                self.module_w: (self.modules, module, "module"),
                self.layer_w: (self.layers, layer, "layer"),
                self.step_w: (self.steps, step, "step"),
            }
        )
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
        out = {
            "step": self.steps[s],
            "layer": self.layers[l],
            "module": self.modules[m],
            "component": self.components[c],
            "variable": self.variable_w.value,
            "value": float(arr[s, l, m, c]),
            "components": {name: float(arr[s, l, m, k]) for k, name in enumerate(self.components)},
        }
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
            self.heatmap.set_data(
                arr[:, :, m, c].T,
                self.steps,
                self.layers,
                label,
                title=f"{label}: {self.components[c]}, {self.modules[m]}",
            )
        if "depth" in parts:
            self.depth.set_lines(
                [self.layers] * len(self.components),
                [arr[s, :, m, k] for k in range(len(self.components))],
                colors=colors,
                labels=self.components,
            )
            self.depth.figure.title.text = f"{self.modules[m]} at step {self.steps[s]}"
        if "history" in parts:
            self.history.set_lines(
                [self.steps] * len(self.components),
                [arr[:, l, m, k] for k in range(len(self.components))],
                colors=colors,
                labels=self.components,
            )
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
            self.totals.set_lines(
                [self.steps] * len(names),
                [self.totals_data[n] for n in names],
                colors=category_colors(len(names)),
                labels=names,
            )
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

    _controls = ("variable", "component", "module", "layer", "step")

    def refresh(self) -> GradientExplorer:
        """Re-read the run (one still training); the step slider follows the newest step if it was on the last."""
        return self._refresh(
            lambda: {
                "variable": (self.variables, self.variables),
                "component": (self.components, self.components),
                "module": (self.modules, self.modules),
                "layer": ([(str(v), v) for v in self.layers], self.layers),
                "step": ([(str(v), v) for v in self.steps], self.steps),
            },
            {"heatmap", "depth", "history", "ratio", "totals", "labels", "markers", "info"},
        )

    def __repr__(self) -> str:
        return f"<GradientExplorer {self.run.label}: {len(self.steps)} steps x {len(self.layers)} layers x {len(self.modules)} modules>"
