"""Bokeh building blocks that redraw fast: a layer x step heatmap and a set of lines.

The explorers (ipywidgets) and the HTML report (Panel embed) both draw with these. Each view owns
its ColumnDataSources and is fed plain numpy arrays, so a slider move is an array slice plus a
``source.data`` update; no plotting library runs between the slider and the browser.

Also here: axis labels from a variable's attrs, shared by every plotting module.
"""

from __future__ import annotations

import numpy as np
from bokeh.models import (
    ColorBar,
    ColumnDataSource,
    HoverTool,
    LinearColorMapper,
    LogColorMapper,
    Range1d,
    Span,
)
from bokeh.palettes import Category10_10, Viridis256
from bokeh.plotting import figure

__all__ = [
    "HeatmapView",
    "LinesView",
    "axis_label",
    "depth_colors",
    "regular_grid",
    "inline_notebook_resources",
    "MAX_GRID",
]

MAX_GRID = 2000  # columns of a re-gridded heatmap; more than a screen shows
NAN_COLOR = (0, 0, 0, 0)  # missing stays missing: transparent, never a colour of the scale


_INLINE = False


def inline_notebook_resources() -> None:
    """Make notebook figures self-contained: BokehJS, Panel's JavaScript and its stylesheets travel
    in the cell outputs instead of being fetched from cdn.bokeh.org / cdn.holoviz.org.

    HoloViews and Panel load them from a CDN by default, which leaves every figure blank on a
    machine without network. Called on import of `perl.viz.plots` (so a notebook's later
    ``hv.extension("bokeh")`` loads inline) and by the explorers before they display. Idempotent.
    """
    global _INLINE
    if _INLINE:
        return
    import holoviews as hv
    import panel as pn
    from bokeh.models import UIElement
    from panel.io.notebook import patch_inline_stylesheets
    from panel.viewable import Viewable

    hv.extension.inline = True  # the default of every later hv.extension(...) call
    pn.config.inline = True

    def inline_stylesheets(viewable, root):
        # note: HoloViews renders through Panel but skips Panel's inlining step, so Panel's layout
        # stylesheets would still point at the CDN; inline them the way Panel does for its own output
        if pn.config.inline:
            for model in root.select({"type": UIElement}):
                patch_inline_stylesheets(model)

    Viewable._preprocessing_hooks.append(inline_stylesheets)
    _INLINE = True


def axis_label(attrs_or_da, name: str | None = None) -> str:
    """``"long_name [units]"`` from a variable's attrs (units "1" is dimensionless and left out)."""
    attrs = getattr(attrs_or_da, "attrs", attrs_or_da) or {}
    name = name or getattr(attrs_or_da, "name", None) or ""
    label = str(attrs.get("long_name") or name)
    units = str(attrs.get("units") or "").strip()
    return f"{label} [{units}]" if units and units not in ("1", "-", "none") else label


def depth_colors(n: int) -> list[str]:
    """n colours from dark (first layer) to bright (last layer)."""
    if n <= 1:
        return [Viridis256[0]] * n
    return [Viridis256[int(round(i * 230 / (n - 1)))] for i in range(n)]


def category_colors(n: int) -> list[str]:
    return [Category10_10[i % 10] for i in range(n)]


def regular_grid(coords: np.ndarray, max_size: int = MAX_GRID) -> tuple[np.ndarray, float, float]:
    """Map sorted coordinates onto a regular pixel grid for an image glyph.

    Returns ``(index, start, width)``: ``index[j]`` is the position in ``coords`` drawn in pixel
    column j, and the image spans ``[start, start + width]``. Evenly spaced coordinates map one to
    one; uneven ones (e.g. a last step off the logging grid) are drawn on the finest spacing, each
    pixel showing the stored coordinate at or before it.
    """
    c = np.asarray(coords, dtype=float)
    if c.size == 0:
        return np.zeros(0, dtype=int), 0.0, 1.0
    if c.size == 1:
        return np.zeros(1, dtype=int), c[0] - 0.5, 1.0
    d = np.diff(c)
    if np.allclose(d, d[0], rtol=1e-6, atol=0):
        return np.arange(c.size), c[0] - d[0] / 2, d[0] * c.size
    step = max(d.min(), (c[-1] - c[0]) / (max_size - 1))
    n = int(np.ceil((c[-1] - c[0]) / step - 1e-9)) + 1  # the last pixel reaches the last coordinate
    centers = c[0] + step * np.arange(n)
    index = np.clip(np.searchsorted(c, centers + 1e-9 * step, side="right") - 1, 0, c.size - 1)
    return index, c[0] - step / 2, step * n


def _figure(title: str, width: int, height: int, x_label: str, y_label: str, **kwargs):
    """A bokeh figure with the views' tools (pan, zoom, reset, save)."""
    return figure(
        title=title,
        width=width,
        height=height,
        x_axis_label=x_label,
        y_axis_label=y_label,
        tools="pan,wheel_zoom,box_zoom,reset,save",
        **kwargs,
    )


class HeatmapView:
    """A layer x step image (or any y x x grid) with a cross-hair at the selected (step, layer).

    Usage:
        view = HeatmapView("effective rank, q_proj", "optimizer step", "layer")
        view.set_data(z, steps, layers, "effective rank")   # z[layer, step]
        view.set_marker(step=100, layer=3)

    Args:
        title (str): figure title.
        x_label, y_label (str): axis labels.
        log (bool, default False): logarithmic colour scale (gradient norms).
        width, height (int): size in pixels.
        x_name, y_name (str, default "step", "layer"): names in the hover tooltip.
    """

    def __init__(
        self,
        title: str,
        x_label: str,
        y_label: str,
        log: bool = False,
        width: int = 520,
        height: int = 300,
        x_name: str = "step",
        y_name: str = "layer",
    ):
        self.log = log
        self.x_name, self.y_name = x_name, y_name
        self.source = ColumnDataSource(dict(image=[np.full((1, 1), np.nan)], x=[0.0], y=[0.0], dw=[1.0], dh=[1.0]))
        mapper_cls = LogColorMapper if log else LinearColorMapper
        self.mapper = mapper_cls(palette=Viridis256, nan_color=NAN_COLOR)
        self.figure = _figure(title, width, height, x_label, y_label, x_range=Range1d(0, 1), y_range=Range1d(0, 1))
        renderer = self.figure.image(
            image="image", x="x", y="y", dw="dw", dh="dh", source=self.source, color_mapper=self.mapper
        )
        self.hover = HoverTool(
            renderers=[renderer], tooltips=[(x_name, "$x{0}"), (y_name, "$y{0}"), ("value", "@image")]
        )
        self.figure.add_tools(self.hover)
        self.colorbar = ColorBar(color_mapper=self.mapper, width=10)
        self.figure.add_layout(self.colorbar, "right")
        self.vspan = Span(location=0, dimension="height", line_color="red", line_alpha=0.7, line_width=1)
        self.hspan = Span(location=0, dimension="width", line_color="red", line_alpha=0.7, line_width=1)
        self.figure.add_layout(self.vspan)
        self.figure.add_layout(self.hspan)
        self.figure.grid.visible = False
        self.steps = np.zeros(0)
        self.layers = np.zeros(0)

    def set_data(
        self,
        z: np.ndarray,
        steps: np.ndarray,
        layers: np.ndarray,
        value_label: str = "value",
        title: str | None = None,
    ) -> None:
        """Draw ``z[layer, step]`` (NaN drawn transparent)."""
        z = np.asarray(z, dtype=float)
        xi, x0, dw = regular_grid(steps)
        yi, y0, dh = regular_grid(layers)
        image = z[np.ix_(yi, xi)] if z.size else np.full((1, 1), np.nan)
        if self.log:
            image = np.where(image > 0, image, np.nan)  # log scale: zero and negative are not drawable
        finite = image[np.isfinite(image)]
        if finite.size:
            low, high = float(finite.min()), float(finite.max())
            if high <= low:
                high = low * 1.01 + (1e-12 if low == 0 else 0)
            self.mapper.update(low=low, high=high)
        self.source.data = dict(image=[image.astype(np.float32)], x=[x0], y=[y0], dw=[dw], dh=[dh])
        self.figure.x_range.update(start=x0, end=x0 + dw)
        self.figure.y_range.update(start=y0, end=y0 + dh)
        self.hover.tooltips = [(self.x_name, "$x{0}"), (self.y_name, "$y{0}"), (value_label, "@image")]
        if title is not None:
            self.figure.title.text = title
        self.steps, self.layers = np.asarray(steps), np.asarray(layers)

    def set_marker(self, step=None, layer=None) -> None:
        """Move the cross-hair (None leaves a line where it is)."""
        if step is not None:
            self.vspan.location = float(step)
        if layer is not None:
            self.hspan.location = float(layer)


def _same(old: list, new: list) -> bool:
    """Column equality for lists of arrays or scalars (NaN equal to NaN)."""
    if len(old) != len(new):
        return False
    for a, b in zip(old, new):
        if isinstance(b, np.ndarray) or isinstance(a, np.ndarray):
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape or not np.array_equal(a, b, equal_nan=a.dtype.kind == "f" and b.dtype.kind == "f"):
                return False
        elif a != b:
            return False
    return True


class LinesView:
    """Several lines, highlighted points, and an optional vertical marker (e.g. the current step).

    Usage:
        view = LinesView("spectrum", "index", "singular value")
        view.set_lines([x, x], [y0, y1], colors=["gray", "black"], alphas=[0.3, 1.0], labels=["step 0", "step 5"])
        view.set_points(x, y1, "black")
        view.set_marker(5)

    Args:
        title (str): figure title.
        x_label, y_label (str): axis labels.
        y_log (bool, default False): logarithmic y axis (values <= 0 are not drawn).
        legend (bool, default False): a legend from the line labels (for a few lines).
        x_range: a Bokeh range to share with another figure (linked zoom).
        width, height (int): size in pixels.
    """

    def __init__(
        self,
        title: str,
        x_label: str,
        y_label: str,
        y_log: bool = False,
        legend: bool = False,
        x_range=None,
        width: int = 420,
        height: int = 300,
    ):
        self.y_log = y_log
        self.lines = ColumnDataSource(dict(xs=[], ys=[], color=[], alpha=[], label=[], width=[]))
        self.points = ColumnDataSource(dict(x=[], y=[], color=[]))
        extra = {} if x_range is None else {"x_range": x_range}
        self.figure = _figure(
            title, width, height, x_label, y_label, y_axis_type="log" if y_log else "linear", **extra
        )
        glyph_kwargs = dict(legend_field="label") if legend else {}
        line_renderer = self.figure.multi_line(
            "xs", "ys", color="color", alpha="alpha", line_width="width", source=self.lines, **glyph_kwargs
        )
        self.figure.scatter("x", "y", color="color", size=6, source=self.points)
        self.figure.add_tools(
            HoverTool(renderers=[line_renderer], tooltips=[("", "@label"), ("x", "$x{0.[00]}"), ("y", "$y{0.000e}")])
        )
        if legend:
            self.figure.legend.location = "top_right"
            self.figure.legend.label_text_font_size = "8pt"
            self.figure.legend.background_fill_alpha = 0.6
        self.marker = Span(location=None, dimension="height", line_color="red", line_alpha=0.7, line_width=1)
        self.figure.add_layout(self.marker)

    def _clean(self, y):
        # float32 halves what a redraw pushes to the browser; plots need no more precision
        y = np.asarray(y, dtype=np.float32)
        return np.where(y > 0, y, np.float32(np.nan)) if self.y_log else y

    def set_lines(self, xs, ys, colors, alphas=None, labels=None, widths=None) -> None:
        """Replace the lines. Only the columns that changed are sent (usually just the y values)."""
        n = len(ys)
        new = dict(
            xs=[np.asarray(x, dtype=float) for x in xs],
            ys=[self._clean(y) for y in ys],
            color=list(colors) if not isinstance(colors, str) else [colors] * n,
            alpha=list(alphas) if alphas is not None else [1.0] * n,
            label=list(labels) if labels is not None else [""] * n,
            width=list(widths) if widths is not None else [1.5] * n,
        )
        old = self.lines.data
        if n and len(old.get("ys", [])) == n:
            changed = {k: v for k, v in new.items() if not _same(old[k], v)}
            if changed:
                self.lines.data.update(changed)
        else:
            self.lines.data = new

    def set_points(self, x, y, color="black") -> None:
        """Replace the highlighted points."""
        x = np.asarray(x, dtype=float)
        self.points.data = dict(
            x=x, y=self._clean(y), color=[color] * len(x) if isinstance(color, str) else list(color)
        )

    def set_marker(self, x) -> None:
        """Move the vertical marker (None hides it)."""
        self.marker.location = float(x) if x is not None else None
