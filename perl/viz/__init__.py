"""Plots, explorers and reports of stored runs (reads Datasets only, never a live model).

Submodules load on first use, so ``import perl.viz`` does not import HoloViews or Bokeh:
`perl.viz.plots` (HoloViews builders), `perl.viz.static` (PNG), `perl.viz.explorers`
(ipywidgets), `perl.viz.report` (self-contained HTML). Runs of any size to try them on: `perl.synthetic`.
"""

_LAZY = {
    "SpectralExplorer": "perl.viz.explorers",
    "GradientExplorer": "perl.viz.explorers",
    "RunComparison": "perl.viz.explorers",
    "write_report": "perl.viz.report",
    "save_png": "perl.viz.static",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'perl.viz' has no attribute {name!r}")


__all__ = list(_LAZY)
