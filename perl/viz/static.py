"""Static PNGs of the plots (matplotlib), for papers and for the gradient logs of a run.

The same builders as the notebooks (`perl.viz.plots`) draw the data; HoloViews' matplotlib backend
renders them, so a PNG shows exactly the slice the interactive plot shows.

Usage:
    from perl.viz import plots, static
    static.save_png(plots.metric_heatmap(run.spectral, "effective_rank", "q_proj"), "fig/erank_q.png")
    static.save_run_pngs(run, "fig/")          # one PNG of every plot kind the run supports
    static.save_gradient_pngs(run.gradients, "fig/")  # the gradient_logs/ PNGs, as training writes them
"""

from __future__ import annotations

import os
from pathlib import Path

import holoviews as hv

from perl.trackers.heatmaps import save_gradient_pngs  # noqa: F401  (the PNGs training writes: one function)
from perl.viz import plots

__all__ = ["save_png", "save_gradient_pngs", "save_run_pngs"]


def save_png(element, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Render a HoloViews element with matplotlib to a PNG file.

    Args:
        element: any element or layout from `perl.viz.plots`.
        path (str | Path): the PNG file (parent folders are created).
        dpi (int, default 150): resolution.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed (CI, papermill, a server)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    renderer = hv.renderer("matplotlib").instance(dpi=dpi, fig="png")
    renderer.save(element, str(path.with_suffix("")), fmt="png")
    import matplotlib.pyplot as plt

    plt.close("all")  # note: hv keeps figures open otherwise; a report of many PNGs would pile them up
    return path


def save_run_pngs(
    run,
    folder: str | os.PathLike,
    module: str | None = None,
    layer: int | None = None,
    step: int | None = None,
    dpi: int = 150,
) -> list[Path]:
    """One PNG of every plot kind a run supports, for a chosen (module, layer, step).

    Args:
        run (perl.run.Run): the run.
        folder (str | Path): output folder.
        module (str, optional), layer (int, optional), step (int, optional): default the first
            module, the first layer, the last step.
        dpi (int, default 150): resolution.
    """
    import warnings

    from perl.run import MissingDataWarning

    folder = Path(folder)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingDataWarning)
        sp, gr, me = run.spectral, run.gradients, run.metrics
    if sp is not None:
        module = module if module is not None else str(sp["module"].values[0])
        layer = layer if layer is not None else int(sp["layer"].values[0])
        out.append(save_png(plots.spectrum(sp, layer, module, step), folder / f"spectrum_{module}_L{layer}.png", dpi))
        out.append(
            save_png(plots.sv_trajectories(sp, layer, module), folder / f"sv_trajectories_{module}_L{layer}.png", dpi)
        )
        for metric in ("effective_rank", "entropy_effective_rank", "condition_number", "stable_rank"):
            for update in (False, True):
                name = f"update_{metric}" if update else metric
                if name in sp:
                    out.append(save_png(plots.metric_heatmap(sp, name, module), folder / f"{name}_{module}.png", dpi))
        if "magnitude_norm" in sp and "direction_norm" in sp:
            out.append(
                save_png(
                    plots.dora_magnitude_direction(sp, layer, module), folder / f"dora_{module}_L{layer}.png", dpi
                )
            )
        if "rank_budget" in sp:
            out.append(save_png(plots.rank_budget(sp), folder / "rank_budget.png", dpi))
    if gr is not None:
        gmodule = module if module is not None else str(gr["module"].values[0])
        for comp in gr["component"].values:
            out.append(
                save_png(
                    plots.gradient_heatmap(gr, str(comp), gmodule), folder / f"grad_norm_{comp}_{gmodule}.png", dpi
                )
            )
        if {"A", "B"} <= {str(c) for c in gr["component"].values}:
            out.append(save_png(plots.ab_ratio(gr, gmodule), folder / f"ab_ratio_{gmodule}.png", dpi))
    if me is not None:
        keys = [k for k in ("reward", "completions/mean_length") if k.replace("/", ".") in me]
        if keys:
            out.append(save_png(plots.training_curves(me, keys), folder / "training.png", dpi))
    return out
