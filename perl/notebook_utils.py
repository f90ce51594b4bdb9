"""Small helpers the notebooks share: a live reward plot for training, finding the runs of a sweep,
and a one-row-per-run summary table.

The notebooks in ``notebooks/`` stay a few lines per cell by calling these; everything else they
use is the library's own API (`perl.train`, `perl.open_run`, `perl.viz`).

Usage:
    from perl.notebook_utils import LiveRewardPlot, find_run_dirs, run_summary
    result = train(cfg, extra_callbacks=[LiveRewardPlot()])   # a reward curve that grows while training
    runs = perl.open_runs(find_run_dirs("sweeps/lora_vs_dora"))
    run_summary(runs)                                         # pandas DataFrame, one row per run
"""

from __future__ import annotations

import glob as _glob
import html
import math
import os
import re
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from perl.run import (
    CONFIG_FILE,
    GRADIENT_FINAL,
    GRADIENT_LIVE,
    METRICS_FILE,
    SPECTRAL_FINAL,
    SPECTRAL_LIVE,
    MissingDataWarning,
    RunError,
    Runs,
    final_reward,
    metric_name,
)

__all__ = ["LiveRewardPlot", "find_run_dirs", "is_run_dir", "run_summary"]


# ====================================================================================== live reward
# seconds between showing the text line and showing the plot (see LiveRewardPlot.display)
PLOT_DELAY_S = 2.0


class LiveRewardPlot:
    """A reward curve that grows while training runs: mean reward and each reward function's mean.

    A Trainer callback: shows itself (a text line with the newest values, and a Bokeh plot) when
    training begins, and redraws at every Trainer log. Only the main process draws. In JupyterLab
    the plot updates in place; in papermill or a terminal the text line and ``.history`` still say
    what happened.

    Usage:
        result = train(cfg, extra_callbacks=[LiveRewardPlot()])
        live = LiveRewardPlot(); train(cfg, extra_callbacks=[live]); live.history["reward"]

    Args:
        keys (tuple of str, optional): Trainer log keys to draw; default ``"reward"`` and every
            ``"rewards/<function>/mean"`` the Trainer logs.
        display (bool, default True): show the plot when training begins (False: only record).
    """

    def __init__(self, keys: Iterable[str] | None = None, display: bool = True):
        import ipywidgets as widgets

        self.keys = list(keys) if keys is not None else None
        self.show = bool(display)
        self.history: dict[str, list[float]] = {"step": []}
        self.total_steps: int | None = None
        self.info = widgets.HTML(value="<span class='perl-live'>waiting for the first logged step</span>")
        self._view = None
        self._pane = None  # the plot widget, once displayed
        self._box = None  # what is shown: the text line, then also the plot (see display)
        self._displayed_at = 0.0  # time.monotonic() when the text line was shown

    # ---- Trainer events
    def __getattr__(self, name):
        # note: the Trainer calls every ``on_<event>`` of a callback; the ones not defined here do
        # nothing. Not subclassing TrainerCallback keeps this module free of transformers' import
        # (torch: seconds), which the analysis notebooks that use the helpers below never need.
        if name.startswith("on_"):
            return _ignore
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.total_steps = int(state.max_steps) if state.max_steps else None
        if self.show:
            self.display()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        keys = self.keys
        if keys is None:  # the mean reward first, then each reward function's
            keys = ["reward", *(k for k in logs if k.startswith("rewards/") and k.endswith("/mean"))]
        if not any(k in logs for k in keys):
            return  # e.g. the final summary log (train_runtime, ...): nothing to draw
        self.record(int(state.global_step), {k: logs[k] for k in keys if k in logs})

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.history["step"]:
            self._update_text(done=True)
            if self._box is not None and self._pane is None:
                self._show_plot()  # note: a run shorter than PLOT_DELAY_S

    # ---- recording and drawing (usable without a Trainer)
    def record(self, step: int, values: dict) -> None:
        """Add one logged step (``{"reward": 0.4, ...}``) and redraw. Keys not seen before start now."""
        n = len(self.history["step"])
        self.history["step"].append(int(step))
        for key in values:
            if key not in self.history:
                self.history[key] = [math.nan] * n  # a key first logged later is missing before
        for key, column in self.history.items():
            if key != "step":
                value = values.get(key, math.nan)
                column.append(
                    float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
                )
        self._update_text()
        self._draw()
        if self._box is not None and self._pane is None and time.monotonic() - self._displayed_at >= PLOT_DELAY_S:
            self._show_plot()

    @property
    def text(self) -> str:
        """The text line shown above the plot, without markup."""
        return html.unescape(re.sub(r"<[^>]+>", "", self.info.value))

    def _series(self):
        return [k for k in self.history if k != "step"]

    def _update_text(self, done: bool = False) -> None:
        step = self.history["step"][-1]
        of = f" of {self.total_steps}" if self.total_steps else ""
        values = " | ".join(f"{html.escape(_short_key(k))} <b>{_fmt(self.history[k][-1])}</b>" for k in self._series())
        state = "finished: " if done else ""
        self.info.value = f"<span class='perl-live'>{state}step <b>{step}</b>{of} | {values}</span>"

    def _draw(self) -> None:
        if self._view is None:
            return
        from perl.viz.views import category_colors

        keys = self._series()
        steps = self.history["step"]
        self._view.set_lines(
            [steps] * len(keys),
            [self.history[k] for k in keys],
            colors=category_colors(len(keys)),
            labels=[_short_key(k) for k in keys],
            widths=[2.5 if k == "reward" else 1.5 for k in keys],
        )
        if self.total_steps:
            self._view.figure.x_range.end = self.total_steps

    def display(self) -> None:
        """Show the text line and the plot (called when training begins).

        The plot is a `jupyter_bokeh.BokehModel` ipywidget, not a Panel/Bokeh pane: a pane's page
        side opens its comm to the kernel, which a kernel busy with the training cell answers only
        when the cell ends ("Exception opening new comm" in the browser console, then every point
        at once), while a widget's comm is opened by the kernel and its updates flow during the cell.
        The widget draws with the page's BokehJS, which Panel's loader puts there asynchronously
        (100 ms after its output is shown, then from blob: URLs), and a widget view built before
        BokehJS exists fails for good ("Could not create a view"). So the plot joins the text line at
        the first logged step at least ``PLOT_DELAY_S`` after it, or when training ends. One training
        step was not enough: a CI run training at 5 steps/s lost its plot that way (the loader
        finished within a second of starting).
        """
        import ipywidgets as widgets
        import panel as pn
        from bokeh.models import Range1d
        from IPython.display import display

        from perl.viz.views import LinesView, inline_notebook_resources

        if self._view is None:
            self._view = LinesView(
                "reward during training",
                "optimizer step",
                "reward",
                legend=True,
                width=620,
                height=260,
                x_range=Range1d(0, max(1, self.total_steps or 1)),
            )
            self._view.figure.legend.location = "center_right"  # note: the lines start at the left
        inline_notebook_resources()
        if not pn.extension._loaded:
            pn.extension()  # note: puts BokehJS into the page (inline, offline), which the widget draws with
        self._draw()
        self._box = widgets.VBox([self.info])
        display(self._box)
        self._displayed_at = time.monotonic()
        if self.history["step"]:
            self._show_plot()

    def _show_plot(self) -> None:
        from jupyter_bokeh import BokehModel

        # note: built from the figure as it is now; changes made before a view exists would be lost
        self._pane = BokehModel(self._view.figure)
        self._box.children = (self.info, self._pane)

    def _ipython_display_(self):
        self.display()


def _ignore(*args, **kwargs):
    return None


def _short_key(key: str) -> str:
    """``rewards/format_reward/mean`` -> ``format_reward``; other keys unchanged."""
    parts = key.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "rewards" and parts[2] == "mean" else key


def _fmt(value) -> str:
    return "nan" if value is None or not np.isfinite(value) else f"{value:.3f}"


# ====================================================================================== finding runs
def is_run_dir(path: str | os.PathLike) -> bool:
    """True for a folder that holds a run: ``config.yaml``, ``metrics.jsonl`` or a tracker store."""
    p = Path(path)
    markers = (CONFIG_FILE, METRICS_FILE, SPECTRAL_FINAL, GRADIENT_FINAL, SPECTRAL_LIVE, GRADIENT_LIVE)
    return p.is_dir() and any((p / m).exists() for m in markers)


def _runs_below(folder: Path) -> list[Path]:
    """Run folders at or below ``folder``, not descending into a run (its checkpoints are not runs)."""
    if is_run_dir(folder):
        return [folder]
    found = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found += _runs_below(child)
    return found


def find_run_dirs(run_dirs) -> list[Path]:
    """The run folders named by a glob, a folder, a sweep folder, or a list of any of these.

    A folder that is not itself a run (a sweep's folder) stands for every run folder below it.
    Folders a glob matches that hold no run are skipped. Order: as given, globs and sweeps sorted.

    Usage:
        find_run_dirs("runs/*")                       # a glob
        find_run_dirs("sweeps/lora_vs_dora")          # every run below a sweep folder
        find_run_dirs(["runs/lora", "runs/dora"])     # a list

    Args:
        run_dirs (str | Path | list): what to look for.

    Raises:
        RunError: a named folder does not exist, or nothing names a run.
    """
    items = [run_dirs] if isinstance(run_dirs, (str, os.PathLike)) else list(run_dirs)
    if not items:
        raise RunError("No run folders given; pass a glob, a sweep folder or a list of run folders.")
    found: list[Path] = []
    for item in items:
        text = os.path.expanduser(str(item))
        if _glob.has_magic(text):
            for match in sorted(_glob.glob(text)):
                if Path(match).is_dir():
                    found += _runs_below(Path(match))
            continue
        path = Path(text)
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "does not exist"
            raise RunError(f"Run folder {path} {what}; pass run folders, a sweep folder or a glob of them.")
        found += _runs_below(path)
    found = list(dict.fromkeys(found))
    if not found:
        raise RunError(
            f"No run folders found in {run_dirs!r}; a run folder holds config.yaml or metrics.jsonl "
            "(the output_dir of a training run)."
        )
    return found


# ====================================================================================== summary
def run_summary(runs: Runs, last: int = 10):
    """One row per run: what it is, how much reward it earned, and how much its adapter moved.

    Columns: ``method``, ``r``, ``seed``, ``steps`` (last logged step), ``final_reward`` (mean of
    the last ``last`` logged rewards, `perl.run.final_reward`), ``best_reward``, and at the last spectral step
    the mean over layers and modules of ``effective_rank``, ``update_effective_rank`` and
    ``update_frobenius_norm`` (how far the adapter moved from its initialisation). Missing data
    (a run without metrics or spectra, a method without these variables) is NaN.

    Args:
        runs (Runs): an `perl.open_runs` result.
        last (int, default 10): logged steps the final reward is averaged over.

    Returns:
        pandas.DataFrame indexed by the run label.
    """
    import pandas as pd

    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN slice is NaN, as meant
        for label, run in zip(runs.labels, runs.runs):
            row = {"run": label, "method": run.method, "r": run.r, "seed": run.seed}
            me = run.metrics
            reward = me[metric_name("reward")] if me is not None and metric_name("reward") in me else None
            row["steps"] = int(me["step"].values[-1]) if me is not None and me.sizes.get("step") else np.nan
            if reward is not None:
                row["final_reward"] = final_reward(me, last)
                row["best_reward"] = float(np.nanmax(reward.values.astype(float)))
            sp = run.spectral
            for name in ("effective_rank", "update_effective_rank", "update_frobenius_norm"):
                if sp is not None and name in sp and "step" in sp[name].dims:
                    row[f"{name}_mean"] = float(np.nanmean(sp[name].isel(step=-1).values))
            rows.append(row)
    return pd.DataFrame(rows).set_index("run")
