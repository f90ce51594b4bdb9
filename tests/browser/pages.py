"""What the browser tests read from and do to a page: Bokeh figures, sliders, screenshots.

Figures are read from BokehJS's own documents in the page (``window.Bokeh.documents``): the
title, and for each glyph renderer its ColumnDataSource columns, i.e. exactly what is drawn.
Sliders are moved with the keyboard on their handle, as a user without a mouse would.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

# Every figure whose title matches, with its renderers' data. Typed arrays keep their shape
# (images are 2-D); everything else is returned as is.
_FIGURES_JS = """(pattern) => {
  if (!window.Bokeh || !window.Bokeh.documents) return [];
  const re = new RegExp(pattern);
  const plain = v => ArrayBuffer.isView(v) ? {shape: v.shape || [v.length], values: Array.from(v)}
                   : Array.isArray(v) ? v.map(plain) : v;
  const found = [];
  // note: embedded figures are in Bokeh.documents; a jupyter_bokeh widget's document only in the
  // views of Bokeh.index (a ViewManager, iterable, in Bokeh 3; a plain object before)
  const docs = new Set(window.Bokeh.documents);
  const index = window.Bokeh.index;
  if (index) {
    const views = typeof index[Symbol.iterator] === "function" ? [...index] : Object.values(index);
    for (const view of views) if (view && view.model && view.model.document) docs.add(view.model.document);
  }
  for (const doc of docs) {
    for (const model of doc.all_models) {
      if (model.type !== "Figure" || !model.title || !re.test(String(model.title.text))) continue;
      const renderers = [];
      for (const r of model.renderers) {
        if (!r.data_source || !r.glyph) continue;
        const data = {};
        for (const [key, value] of Object.entries(r.data_source.data)) data[key] = plain(value);
        renderers.push({glyph: r.glyph.type, data});
      }
      found.push({title: String(model.title.text), renderers});
    }
  }
  return found;
}"""


def _array(value):
    if isinstance(value, dict) and "values" in value:
        return np.array([np.nan if v is None else v for v in value["values"]], dtype=float).reshape(value["shape"])
    if isinstance(value, list):
        if value and all(isinstance(v, (int, float)) or v is None for v in value):
            return np.array([np.nan if v is None else v for v in value], dtype=float)
        return [_array(v) for v in value]
    return value


class Figure:
    """A Bokeh figure as drawn in the page: ``title`` and ``glyph(kind)`` -> {column: values}."""

    def __init__(self, raw: dict):
        self.title = raw["title"]
        self.renderers = [(r["glyph"], {k: _array(v) for k, v in r["data"].items()}) for r in raw["renderers"]]

    def glyph(self, kind: str) -> dict:
        found = [data for glyph, data in self.renderers if glyph == kind]
        assert len(found) == 1, (
            f"figure {self.title!r} has {len(found)} {kind} renderers; glyphs: {[g for g, _ in self.renderers]}"
        )
        return found[0]


def figure(page, pattern: str, timeout: float = 30.0) -> Figure:
    """The one figure whose title matches ``pattern`` (a JS regex), waiting until it is drawn."""
    deadline = time.monotonic() + timeout
    titles = []
    while True:
        found = page.evaluate(_FIGURES_JS, pattern)
        if len(found) == 1:
            return Figure(found[0])
        if time.monotonic() > deadline:
            titles = [f["title"] for f in page.evaluate(_FIGURES_JS, ".*")]
            # note: the text line is an ipywidget, the figures Panel's: which one lags tells which path lost it
            lines = [" ".join(t.split()) for t in page.locator(".perl-info").all_inner_texts()]
            raise AssertionError(
                f"expected one Bokeh figure titled /{pattern}/ within {timeout:.0f} s, found "
                f"{len(found)}; the page's figures: {titles}; the explorer's text line: {lines}"
            )
        time.sleep(0.2)


def press_to_index(handle, index: int, timeout: float = 15.0) -> None:
    """Move a slider (its focused handle) to position ``index`` with the keyboard: Home, then right,
    then, as a user watching it would, press again until the handle shows ``index`` (noUiSlider's
    ``aria-valuenow``): under load a key press was once lost between two fast ones."""
    handle.focus()
    handle.press("Home")
    for _ in range(index):
        handle.press("ArrowRight")
    deadline = time.monotonic() + timeout
    while True:
        now = handle.get_attribute("aria-valuenow")
        if now is None:
            return  # note: no position to read: the presses above are all there is
        current = round(float(now))
        if current == index:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the slider stays at position {current}, not {index}, after {timeout:.0f} s")
        handle.focus()
        handle.press("ArrowRight" if current < index else "ArrowLeft")
        time.sleep(0.2)


def widget(page, css_class: str, label: str):
    """The ipywidget of this class whose description is exactly ``label`` (e.g. the "step" slider)."""
    return page.locator(
        f".{css_class}", has=page.locator(".widget-label", has_text=re.compile(rf"^{re.escape(label)}$"))
    )


def small_png(src: Path, dst: Path, colors: int = 96) -> Path:
    """A palette PNG of a screenshot for docs/ (a tenth of the RGB size, same look for plots)."""
    from PIL import Image

    with Image.open(src) as image:
        small = image.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        dst.parent.mkdir(parents=True, exist_ok=True)
        small.save(dst, optimize=True)
    return dst


def assert_close(drawn, stored, what: str, rtol: float = 1e-5) -> None:
    """Drawn values (float32 in the browser) against the stored float64; NaN matches NaN."""
    drawn, stored = np.asarray(drawn, dtype=float), np.asarray(stored, dtype=float)
    assert drawn.shape == stored.shape, f"{what}: drew shape {drawn.shape}, the store has {stored.shape}"
    ok = np.allclose(drawn, stored, rtol=rtol, atol=1e-12, equal_nan=True)
    assert ok, (
        f"{what}: drew {np.array2string(drawn, precision=5)}, the store has {np.array2string(stored, precision=5)}"
    )
