"""Plots with the seed-to-seed uncertainty drawn: error bars per configuration, bands over steps.

Both read what `perl.sweep_summary` computes (the sweep summary, `band_over_seeds`); the interval
method is in the data's attrs and in the plot title.

Usage:
    errorbar_plot(summary, "final_equation_reward")          # mean and 95% t interval per configuration
    band_plot(band_over_seeds(runs.metrics.reward, configs, smooth=10))
"""

from __future__ import annotations

import numpy as np
import xarray as xr

__all__ = ["band_plot", "errorbar_plot"]


def _hv():
    import holoviews as hv
    import holoviews.plotting.bokeh  # noqa: F401 - registers the bokeh backend

    if hv.Store.current_backend not in hv.Store.renderers:
        hv.Store.set_current_backend("bokeh")
    return hv


def _palette(n: int) -> list[str]:
    from bokeh.palettes import Category10_10, Category20_20

    palette = Category10_10 if n <= 10 else Category20_20
    return [palette[i % len(palette)] for i in range(n)]


def errorbar_plot(summary: xr.Dataset, quantity: str, configs=None, width: int = 640, height: int = 320):
    """Mean over seeds (points) and its confidence interval (bars) of one quantity, one point per configuration.

    Configurations with a single seed get a point without a bar.

    Args:
        summary (xr.Dataset): the sweep summary (`perl.sweep_summary.summarize_runs` / ``summary.nc``).
        quantity (str): a key of `perl.sweep_summary.QUANTITIES`.
        configs (list of str, optional): which configurations, in order (default: all, sorted by mean).
    """
    hv = _hv()
    mean = summary[f"{quantity}_mean"]
    labels = [str(c) for c in summary["config"].values]
    if configs is None:
        order = np.argsort(-np.nan_to_num(mean.values, nan=-np.inf), kind="stable")
        configs = [labels[i] for i in order]
    sel = summary.sel(config=list(configs))
    m = sel[f"{quantity}_mean"].values
    low, high = sel[f"{quantity}_ci_low"].values, sel[f"{quantity}_ci_high"].values
    name = summary[f"{quantity}_mean"].attrs.get("long_name", quantity).split(":")[0]
    level = float(summary.attrs.get("ci_level", 0.95))
    points = hv.Scatter((list(configs), m), "configuration", name).opts(size=8, color="black", tools=["hover"])
    has_bar = np.isfinite(low) & np.isfinite(high)
    bars = hv.ErrorBars(
        ([c for c, b in zip(configs, has_bar) if b], m[has_bar], (m - low)[has_bar], (high - m)[has_bar]),
        "configuration",
        [name, "neg", "pos"],
    )
    title = f"{name}: mean over seeds, {level:.0%} {summary.attrs.get('ci_method', 't')} interval"
    return (bars * points).opts(width=width, height=height, xrotation=45, title=title, show_grid=True)


def band_plot(bands: xr.Dataset, ylabel: str | None = None, width: int = 640, height: int = 320):
    """Mean over seeds (line) and its confidence band (shaded) per configuration over steps.

    Args:
        bands (xr.Dataset): `perl.sweep_summary.band_over_seeds` (config, step): mean, low, high.
        ylabel (str, optional): the y axis label (default: the band's quantity).
    """
    hv = _hv()
    ylabel = ylabel or bands.attrs.get("quantity", "value")
    colors = _palette(bands.sizes["config"])
    layers = []
    steps = bands["step"].values
    for color, c in zip(colors, bands["config"].values):
        sel = bands.sel(config=c)
        label = str(c)
        if np.isfinite(sel["low"].values).any():
            layers.append(
                hv.Area((steps, sel["low"].values, sel["high"].values), "step", ["low", "high"], label=label).opts(
                    color=color, alpha=0.2, line_alpha=0
                )
            )
        layers.append(
            hv.Curve((steps, sel["mean"].values), "step", ylabel, label=label).opts(color=color, line_width=2)
        )
    smooth = int(bands.attrs.get("smooth", 1))
    title = f"{ylabel}: mean over seeds, 95% t band" + (f" (rolling mean over {smooth} steps)" if smooth > 1 else "")
    return hv.Overlay(layers).opts(width=width, height=height, title=title, legend_position="right", show_grid=True)
