"""What every explorer shares: the selection constants, value formatting, and the widget plumbing.

`_Explorer` holds the ipywidgets controls, the Bokeh layout shown through Panel, the text line that
states the selection, and batching of redraws (see `perl.viz.explorers` for the explorers).

Threads: JupyterLab (4.4 and later, with ipykernel 7) sends each comm target's messages to its own
kernel subshell, so the controls' callbacks (target ``jupyter.widget``) and Panel's handler of what
BokehJS sends back (range changes, on Panel's own target) run in two threads at once, on one Bokeh
document. Panel's handler ends by releasing the document's hold, which hands every held change to
the document's callbacks instead of to the next push: a redraw caught between its changes and its
push was lost, and the figures stayed on the previous selection while the controls and the text
line moved on (seen as a browser test failing about once in 14 runs). Every redraw and Panel's
handler therefore take one lock per explorer.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings

import ipywidgets as widgets
import numpy as np

from perl.run import MissingDataWarning, metric_name
from perl.viz.views import inline_notebook_resources

PRODUCT = "product"
UPDATE = "update since init"
SPECTRAL_HEATMAP_METRICS = (
    "effective_rank",
    "entropy_effective_rank",
    "stable_rank",
    "condition_number",
    "spectral_gap",
    "spectral_gap_12",
    "nuclear_norm",
    "frobenius_norm",
    "top1_sv_ratio",
    "top5_sv_ratio",
    "top10_sv_ratio",
    "numerical_rank",
    "magnitude_norm",
    "direction_norm",
    "magnitude_direction_ratio",
    "rank_budget",
    "vector_norm",
    "vector_distance_from_init",
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


@functools.cache
def _serial_bokeh_pane():
    """A Panel Bokeh pane whose handler of messages from the page holds ``_perl_lock`` (an RLock).

    Built on first use, so importing this module does not import Panel. ``priority = False`` keeps
    it out of ``pn.panel``'s choice of a pane for a figure.
    """
    import panel as pn

    class SerialBokeh(pn.pane.Bokeh):
        priority = False

        def _on_msg(self, ref, manager, msg):
            with self._perl_lock:
                super()._on_msg(ref, manager, msg)

    return SerialBokeh


class _Explorer:
    """Shared machinery: holding redraws while several widgets change, pushing, displaying."""

    def __init__(self):
        self._lock = threading.RLock()  # note: redraws and Panel's comm handler; see the module docstring
        self._holding = 0
        self._pending: set[str] = set()
        self._pane = None
        self.info = widgets.HTML(layout=widgets.Layout(width="100%"))
        self.refresh_button = widgets.Button(
            description="refresh", icon="refresh", tooltip="re-read the run folder (a run still training)"
        )
        self.refresh_button.on_click(lambda _: self.refresh())

    # ---- subclasses provide: self.controls (ipywidgets box), self.layout (Bokeh), _draw(parts)
    @property
    def pane(self):
        """The Panel pane holding the Bokeh figures (created on first use)."""
        if self._pane is None:
            self._pane = _serial_bokeh_pane()(self.layout)
            self._pane._perl_lock = self._lock
        return self._pane

    @contextlib.contextmanager
    def _hold(self):
        """Collect redraw requests while several controls change; draw and push once at the end."""
        with self._lock:
            self._holding += 1
            try:
                yield
            finally:
                self._holding -= 1
                if not self._holding:
                    parts, self._pending = self._pending, set()
                    if parts:
                        self._redraw(parts)

    def _refresh(self, offered, parts: set[str]):
        """Re-read the run, re-offer every control and keep each choice that is still offered.

        ``offered()`` (called after re-reading) maps each control's name (its ``select`` keyword; the
        widget is ``self.<name>_w``) to (the widget's options, the values they stand for); a choice no
        longer offered becomes the first value. The step follows the newest step if it was on the last.
        """
        at_end = self.step_w.index == len(self.steps) - 1
        keep = {name: getattr(self, f"{name}_w").value for name in self._controls}
        self.run.refresh()
        self._extract()
        with self._hold():
            chosen = {}
            for name, (options, values) in offered().items():
                getattr(self, f"{name}_w").options = options
                chosen[name] = keep[name] if keep[name] in values else values[0]
            chosen["step"] = self.steps[-1] if at_end or keep["step"] not in self.steps else keep["step"]
            self.select(**chosen)
            self._pending |= parts
        return self

    def _changed(self, parts: set[str]) -> None:
        with self._lock:
            if self._holding:
                self._pending |= parts
            else:
                self._redraw(parts)

    def _redraw(self, parts: set[str]) -> None:
        with self._lock:  # note: the changes and their push, with no Panel handler in between
            self._draw(parts)
            self._push()

    def _push(self) -> None:
        # only once shown in a notebook is there a browser to push to
        if self._pane is not None and self._pane._models:
            from panel.io.notebook import push_notebook

            push_notebook(self._pane)

    def display(self) -> None:
        """Show the controls, the value line and the figures in the notebook."""
        import panel as pn
        from IPython.display import display

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
