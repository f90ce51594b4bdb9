"""`RunComparison`: the same metric for several runs side by side (see `perl.viz.explorers`)."""

from __future__ import annotations

import html
import warnings

import ipywidgets as widgets
import numpy as np
from bokeh.layouts import column, row

from perl.run import Runs, open_runs
from perl.viz.explorer_base import MEAN, SPECTRAL_HEATMAP_METRICS, _Explorer, _fmt, _quiet
from perl.viz.views import LinesView, category_colors


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
        self.step_w = widgets.SelectionSlider(
            description="step", options=[(str(v), v) for v in self.steps], layout=widgets.Layout(width="60%")
        )
        self.controls = widgets.VBox(
            [
                widgets.HBox([self.metric_w, self.module_w, self.refresh_button]),
                widgets.HBox([self.layer_w, self.step_w]),
                self.info,
            ]
        )
        self.over_steps = LinesView("over training", "optimizer step", "value", legend=True, width=520)
        self.over_depth = LinesView("over depth", "layer", "value", legend=True)
        self.reward = LinesView(
            "reward",
            "optimizer step",
            "reward",
            legend=True,
            x_range=self.over_steps.figure.x_range,
            width=520,
            height=220,
        )
        self.layout = column(row(self.over_steps.figure, self.over_depth.figure), self.reward.figure)
        for w, parts in ((self.module_w, {"steps", "depth"}), (self.layer_w, {"steps"}), (self.step_w, {"depth"})):
            self._observe(w, parts | {"markers", "info"})
        self.metric_w.observe(self._on_metric, names="value")
        with self._hold():
            self.select(
                metric=metric if metric in self.metric_names else self.metric_names[0],
                module=module if module is not None else self.modules[0],
                layer=layer,
                step=step if step is not None else self.steps[-1],
            )
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
            raise ValueError(
                "None of these runs has spectral or gradient data to compare; train with --enable_tracking."
            )
        first = spectral if spectral is not None else gradients
        self.labels = [str(v) for v in first["run"].values]
        # spectral steps start at 0 (initialisation), gradient steps at 1: each metric slides over its own
        self.steps_by_kind = {
            kind: [int(s) for s in ds["step"].values]
            for ds, kind in ((spectral, "spectral"), (gradients, "gradients"))
            if ds is not None
        }
        self.layers = sorted({int(v) for ds in (spectral, gradients) if ds is not None for v in ds["layer"].values})
        self.modules = list(
            dict.fromkeys(str(m) for ds in (spectral, gradients) if ds is not None for m in ds["module"].values)
        )
        preferred = [m for m in SPECTRAL_HEATMAP_METRICS if m in self.sources]
        self.metric_names = preferred + [m for m in self.sources if m not in preferred]
        self.steps = self.steps_by_kind[self.sources[self.metric_names[0]][3]]
        metrics = _quiet(lambda: self.runs.metrics)
        self.rewards = None
        if metrics is not None and "reward" in metrics:
            self.rewards = (
                metrics["step"].values.astype(float),
                {str(r): metrics["reward"].sel(run=r).values for r in metrics["run"].values},
            )

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

    def select(self, metric=None, module=None, layer="keep", step=None) -> RunComparison:
        """Set any of the controls; ``layer=None`` means the mean over layers."""
        layers = [MEAN, *self.layers]
        self._set(
            {
                self.metric_w: (self.metric_names, metric, "metric"),
                self.module_w: (self.modules, module, "module"),
                self.layer_w: (layers, MEAN if layer is None else None if layer == "keep" else layer, "layer"),
            }
        )
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
        return {
            "metric": self.metric_w.value,
            "module": self.modules[m],
            "layer": None if self.layer_w.index == 0 else self.layer_w.value,
            "step": self.steps[s],
            "values": {lab: float(v) for lab, v in zip(self.labels, at)},
        }

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
            self.over_depth.set_lines(
                [self.layers] * len(self.labels),
                [values[i, s, :, m] for i in range(len(self.labels))],
                colors=colors,
                labels=self.labels,
            )
            self.over_depth.figure.title.text = f"{metric}, {self.modules[m]} at step {self.steps[s]}"
            self.over_depth.figure.yaxis.axis_label = metric
        if "reward" in parts and self.rewards is not None:
            steps, by_run = self.rewards
            labs = [lab for lab in self.labels if lab in by_run]
            self.reward.set_lines(
                [steps] * len(labs),
                [by_run[lab] for lab in labs],
                colors=[colors[self.labels.index(lab)] for lab in labs],
                labels=labs,
            )
        if "markers" in parts:
            self.over_steps.set_marker(self.steps[s])
            self.reward.set_marker(self.steps[s])
            self.over_depth.set_marker(None if self.layer_w.index == 0 else self.layer_w.value)
        if "info" in parts:
            cur = self.current
            vals = "; ".join(f"{html.escape(k)} = {_fmt(v)}" for k, v in cur["values"].items())
            self.info.value = (
                f"<span class='perl-info'>{html.escape(metric)} | module <b>{html.escape(cur['module'])}</b> | "
                f"{where} | step <b>{cur['step']}</b> | {vals}</span>"
            )

    def refresh(self) -> RunComparison:
        """Re-read every run (runs still training)."""
        keep = dict(
            metric=self.metric_w.value, module=self.module_w.value, layer=self.layer_w.value, step=self.step_w.value
        )
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
            self.select(
                metric=metric,
                module=keep["module"] if keep["module"] in self.modules else self.modules[0],
                layer=keep["layer"] if keep["layer"] in self.layers else None,
                step=self.steps[-1] if at_end or keep["step"] not in self.steps else keep["step"],
            )
            self._pending |= {"steps", "depth", "reward", "markers", "info"}
        return self

    def __repr__(self) -> str:
        return f"<RunComparison of {len(self.labels)} runs: {', '.join(self.labels[:4])}{', ...' if len(self.labels) > 4 else ''}>"
