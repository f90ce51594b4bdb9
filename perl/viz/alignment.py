"""Where each run's adapter update lives relative to its base weights, across the runs of a sweep.

Reads the alignment stores the `AlignmentTracker` writes
(``<tracking_dir>/alignment_logs/alignment_history.nc`` while training,
``<tracking_dir>/alignment_final.nc`` at the end; the newer one is read) and turns them into the
tables and plots of ``notebooks/05_spectral_alignment.ipynb``. Only stored files are read.

The words used here, for the update since initialisation dW = s (B_t A_t - B_0 A_0) of each
adapted weight W0 (see the store's attrs for the exact formulas):

- ``principal_left``: energy fraction of dW in W0's top-k left singular subspace,
  ||U_k^T dW||_F^2 / ||dW||_F^2 (k = 2r by default); ``minor_left`` the same for the bottom-k,
  ``principal_right`` / ``minor_right`` for the right singular vectors. A random update scores
  k/m (``chance``); 1 means the update lives entirely there.
- ``amplification``: ||dW||_F / ||U_dW^T W0 V_dW||_F (Hu et al., LoRA, sec. 7.3): large when dW
  amplifies directions W0 hardly uses.
- ``intruders``: top-k singular vectors of the tuned weight far (cosine < epsilon) from every
  singular vector of W0 (Shuttleworth et al. 2024), per module.

Each number of a run is the mean over its tracked (layer, module) cells, NaN skipped: every
adapted module weighs the same. A run's "final" value is at its last step where the quantity is
finite (an update of zero, at step 0, has no direction: NaN).

Usage:
    runs = perl.open_runs(find_run_dirs("sweeps/methods_nano"))
    align = open_alignment(runs)                          # Dataset (run, step, layer, module)
    table = alignment_table(runs, align)                  # one row per run, with final reward
    fraction_over_training(align, "principal_left")       # step x run
    reward_relation(table)                                # rank correlations across runs
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from perl.run import MissingDataWarning, Run, RunError, Runs, concat_runs, final_reward, read_store

__all__ = [
    "ALIGNMENT_FINAL",
    "ALIGNMENT_LIVE",
    "FRACTIONS",
    "alignment_curves",
    "alignment_source",
    "alignment_table",
    "final_values",
    "fraction_by_layer",
    "fraction_by_module",
    "fraction_over_training",
    "intruders_over_training",
    "open_alignment",
    "read_alignment",
    "reward_relation",
    "reward_scatter",
]

ALIGNMENT_LIVE = Path("alignment_logs") / "alignment_history.nc"
ALIGNMENT_FINAL = Path("alignment_final.nc")
# the short names of the notebook -> the store's variables
FRACTIONS = {
    "principal_left": "energy_fraction_top_left",
    "minor_left": "energy_fraction_bottom_left",
    "principal_right": "energy_fraction_top_right",
    "minor_right": "energy_fraction_bottom_right",
}
OTHER = {
    "amplification": "amplification_factor",
    "intruders": "intruder_dimensions",
    "update_norm": "update_frobenius_norm",
}
VARIABLES = {**FRACTIONS, **OTHER}
# methods whose adapter is a vector (or the whole weight): no low-rank update to align
_NO_LOW_RANK = {
    "ia3": "vector method: no low-rank update",
    "layernorm": "vector method: no low-rank update",
    "full": "full fine-tuning: not tracked",
}


# ====================================================================================== reading
def alignment_source(run: Run) -> Path | None:
    """The alignment store of ``run`` (the newer of live and final), or None."""
    return run.store_path(ALIGNMENT_LIVE, ALIGNMENT_FINAL)


def read_alignment(run: Run | str | os.PathLike) -> xr.Dataset | None:
    """One run's alignment Dataset (step, layer, module, ...), or None with a `MissingDataWarning`."""
    run = run if isinstance(run, Run) else Run(run)
    src = alignment_source(run)
    if src is None:
        warnings.warn(
            f"Run {run.path} has no alignment data (no {ALIGNMENT_LIVE} or {ALIGNMENT_FINAL}; train with "
            "--enable_alignment_tracking to record it).",
            MissingDataWarning,
            stacklevel=2,
        )
        return None
    return read_store(src)


def open_alignment(runs: Runs) -> xr.Dataset:
    """Every run's alignment store along a ``run`` dimension (labels and coordinates as `Runs`).

    Layers, modules and steps are outer-joined in first-seen order: what a run lacks is NaN. Runs
    without a store (alignment tracking off, or a vector method such as IA3) are left out; see
    `alignment_table` for a row per run.

    Raises:
        RunError: none of the runs has alignment data.
    """
    parts, keep = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingDataWarning)
        for i, run in enumerate(runs.runs):
            ds = read_alignment(run)
            if ds is not None:
                parts.append(ds)
                keep.append(i)
    if not parts:
        raise RunError(
            f"None of the {len(runs.runs)} runs has alignment data ({ALIGNMENT_LIVE} or {ALIGNMENT_FINAL}); "
            "train them with --enable_alignment_tracking (config.tracker.enable_alignment_tracking)."
        )
    return concat_runs(parts, [runs.runs[i] for i in keep], [runs.labels[i] for i in keep])


# ====================================================================================== numbers
def _variable(align: xr.Dataset, which: str) -> xr.DataArray:
    name = VARIABLES.get(which, which)
    if name not in align:
        raise KeyError(f"{which!r} is not in the alignment data; use one of {', '.join(VARIABLES)}.")
    return align[name]


def _cell_mean(da: xr.DataArray) -> xr.DataArray:
    """Mean over layers and modules, NaN skipped (all-NaN -> NaN, without a warning)."""
    dims = [d for d in ("layer", "module") if d in da.dims]
    values = da.transpose(*[d for d in da.dims if d not in dims], *dims).values
    flat = values.reshape(values.shape[: values.ndim - len(dims)] + (-1,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(flat, axis=-1)
    kept = [d for d in da.dims if d not in dims]
    return xr.DataArray(mean, dims=kept, coords={d: da[d] for d in kept}, name=da.name, attrs=da.attrs)


def final_values(align: xr.Dataset, which: str) -> dict[str, tuple[float, int | None]]:
    """Per run label: (mean over cells at the run's last step where it is finite, that step)."""
    mean = _cell_mean(_variable(align, which))
    out = {}
    for label in mean["run"].values:
        series = mean.sel(run=label)
        finite = np.flatnonzero(np.isfinite(series.values))
        if finite.size:
            i = finite[-1]
            out[str(label)] = (float(series.values[i]), int(series["step"].values[i]))
        else:
            out[str(label)] = (math.nan, None)
    return out


def _chance(align: xr.Dataset, label: str, side: str = "left") -> float:
    name = f"chance_energy_fraction_{side}"
    if name not in align:
        return math.nan
    top = align["energy_fraction_top_left"].sel(run=label)
    tracked = np.isfinite(top).any("step") if "step" in top.dims else np.isfinite(top)
    values = align[name].sel(run=label).where(tracked).values
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


def _vs_chance(align: xr.Dataset, label: str, step: int | None) -> float:
    """Mean over cells of principal_left / (k/m) at ``step``: how many times chance the principal energy is."""
    if step is None or "chance_energy_fraction_left" not in align:
        return math.nan
    ratio = (
        align["energy_fraction_top_left"].sel(run=label, step=step)
        / align["chance_energy_fraction_left"].sel(run=label)
    ).values
    return float(np.nanmean(ratio)) if np.isfinite(ratio).any() else math.nan


def _metrics(run: Run) -> xr.Dataset | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingDataWarning)
        return run.metrics


def alignment_table(runs: Runs, align: xr.Dataset | None, last: int = 10):
    """One row per run: final reward and where its update lives at its last tracked step.

    Columns: ``method``, ``r``, ``seed``, ``final_reward`` (mean of the last ``last`` logged
    rewards, `perl.run.final_reward`), ``step`` (the last step with a finite principal_left),
    ``principal_left``, ``minor_left``, ``principal_right``, ``minor_right``, ``chance`` (k/m,
    the principal_left of a random update), ``x_chance`` (principal_left / chance, mean over
    cells), ``amplification``, ``intruders`` (per module, at the last intruder snapshot),
    ``update_norm`` (||dW||_F, mean over cells), ``note`` (why a row is empty).

    Args:
        runs (Runs): the runs, from `perl.open_runs`.
        align (xr.Dataset | None): `open_alignment(runs)`.
        last (int, default 10): logged steps the final reward is averaged over.

    Returns:
        pandas.DataFrame indexed by run label, in the order of ``runs``.
    """
    import pandas as pd

    finals = {k: final_values(align, k) for k in VARIABLES if align is not None and VARIABLES[k] in align}
    labels_with_data = {str(v) for v in align["run"].values} if align is not None else set()
    rows = []
    for label, run in zip(runs.labels, runs.runs):
        row = {
            "run": label,
            "method": run.method,
            "r": run.r,
            "seed": run.seed,
            "final_reward": final_reward(_metrics(run), last),
        }
        if label in labels_with_data:
            step = finals["principal_left"][label][1]
            row["step"] = step if step is not None else math.nan
            for key in VARIABLES:
                row[key] = finals[key][label][0] if key in finals else math.nan
            row["chance"] = _chance(align, label)
            row["x_chance"] = _vs_chance(align, label, step)
            row["note"] = "" if step is not None else "update is zero at every tracked step"
        else:
            row["note"] = _NO_LOW_RANK.get(str(run.method), "no alignment data (--enable_alignment_tracking was off)")
        rows.append(row)
    columns = [
        "method",
        "r",
        "seed",
        "final_reward",
        "step",
        *FRACTIONS,
        "chance",
        "x_chance",
        "amplification",
        "intruders",
        "update_norm",
        "note",
    ]
    table = pd.DataFrame(rows).set_index("run")
    return table.reindex(columns=columns)


def fraction_over_training(align: xr.Dataset, which: str = "principal_left"):
    """Mean over cells of one quantity, per step (rows) and run (columns): a pandas DataFrame."""
    return _cell_mean(_variable(align, which)).transpose("step", "run").to_pandas()


def _final_step_slice(da: xr.DataArray) -> xr.DataArray:
    """Each run at its own last step where any cell is finite (all NaN for a run that has none)."""
    finite = (
        np.isfinite(da.transpose("run", "step", ...).values).reshape(da.sizes["run"], da.sizes["step"], -1).any(axis=2)
    )
    has_any = finite.any(axis=1)
    last = np.where(has_any, da.sizes["step"] - 1 - np.argmax(finite[:, ::-1], axis=1), 0)
    picked = da.isel(step=xr.DataArray(last, dims="run")).drop_vars("step")
    return picked.where(xr.DataArray(has_any, dims="run"))


def fraction_by_module(align: xr.Dataset, which: str = "principal_left"):
    """Final value per run (rows) and module (columns), mean over layers: a pandas DataFrame."""
    final = _final_step_slice(_variable(align, which))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return final.mean("layer", skipna=True).transpose("run", "module").to_pandas()


def fraction_by_layer(align: xr.Dataset, which: str = "principal_left"):
    """Final value per run (rows) and layer (columns), mean over modules: a pandas DataFrame."""
    final = _final_step_slice(_variable(align, which))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return final.mean("module", skipna=True).transpose("run", "layer").to_pandas()


def intruders_over_training(align: xr.Dataset):
    """Intruder dimensions per module (mean over cells) at each intruder snapshot: steps x runs."""
    table = fraction_over_training(align, "intruders")
    return table.dropna(how="all")


def reward_relation(
    table,
    columns=("principal_left", "minor_left", "x_chance", "amplification", "intruders"),
    reward: str = "final_reward",
):
    """Across runs: Spearman (rank) and Pearson correlation of each column with the final reward.

    Only runs where both are finite count (``n``); with fewer than three runs, or a column that
    does not vary, the correlations are NaN. A handful of runs, one seed each, can suggest a
    relation, not show one.

    Returns:
        pandas.DataFrame indexed by quantity: ``spearman``, ``pearson``, ``n``.
    """
    import pandas as pd

    rows = []
    y_all = pd.to_numeric(table[reward], errors="coerce")
    for col in columns:
        x_all = pd.to_numeric(table[col], errors="coerce") if col in table else pd.Series(np.nan, index=table.index)
        ok = np.isfinite(x_all.to_numpy(dtype=float)) & np.isfinite(y_all.to_numpy(dtype=float))
        x, y = x_all[ok], y_all[ok]
        spearman = pearson = math.nan
        if ok.sum() >= 3 and x.nunique() > 1 and y.nunique() > 1:
            pearson = float(np.corrcoef(x.to_numpy(dtype=float), y.to_numpy(dtype=float))[0, 1])
            # Spearman = Pearson of the ranks (ties share their mean rank)
            spearman = float(np.corrcoef(x.rank().to_numpy(dtype=float), y.rank().to_numpy(dtype=float))[0, 1])
        rows.append({"quantity": col, "spearman": spearman, "pearson": pearson, "n": int(ok.sum())})
    return pd.DataFrame(rows).set_index("quantity")


# ====================================================================================== plots
def _hv():
    import holoviews as hv
    import holoviews.plotting.bokeh

    if hv.Store.current_backend not in hv.Store.renderers:
        hv.Store.set_current_backend("bokeh")
    return hv


def _colors(labels) -> dict[str, str]:
    from bokeh.palettes import Category10_10, Category20_20

    palette = Category10_10 if len(labels) <= 10 else Category20_20
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def alignment_curves(align: xr.Dataset, metrics: xr.Dataset | None = None, which=("principal_left", "minor_left")):
    """One panel per quantity (mean over cells, one line per run, chance level dashed), and the reward beside.

    A run has the same colour in every panel.

    Args:
        align (xr.Dataset): `open_alignment(runs)`.
        metrics (xr.Dataset, optional): ``runs.metrics`` (run, step): adds a reward panel.
        which (tuple of str): quantities, names as in `FRACTIONS` / ``amplification`` / ``intruders``.

    Returns:
        hv.Layout of Overlays (Curves by run; the x axes are linked).
    """
    hv = _hv()
    has_reward = metrics is not None and "reward" in metrics
    labels = [str(v) for v in align["run"].values]
    if has_reward:
        labels += [str(v) for v in metrics["run"].values if str(v) not in labels]
    color = _colors(labels)
    panels = []
    for key in which:
        mean = _cell_mean(_variable(align, key))
        curves = [
            hv.Curve((mean["step"].values, mean.sel(run=label).values), "step", (key, key), label=str(label)).opts(
                color=color[str(label)]
            )
            for label in mean["run"].values
        ]
        overlay = hv.Overlay(curves)
        if key in FRACTIONS:
            side = "left" if key.endswith("left") else "right"
            chance = align.get(f"chance_energy_fraction_{side}")
            if chance is not None and np.isfinite(chance.values).any():
                overlay = overlay * hv.HLine(float(np.nanmean(chance.values))).opts(color="gray", line_dash="dashed")
        panels.append(
            overlay.opts(
                title=key.replace("_", " "), width=420, height=300, show_legend=not panels, legend_position="right"
            )
        )
    if has_reward:
        curves = [
            hv.Curve(
                (metrics["step"].values, metrics["reward"].sel(run=label).values), "step", "reward", label=str(label)
            ).opts(color=color[str(label)])
            for label in metrics["run"].values
        ]
        panels.append(hv.Overlay(curves).opts(title="reward", width=420, height=300, show_legend=False))
    return hv.Layout(panels).cols(2)


def reward_scatter(table, x: str = "principal_left", y: str = "final_reward"):
    """Final reward against one alignment quantity, a labelled point per run (runs with NaN left out)."""
    hv = _hv()
    data = table[[x, y, "method"]].apply(lambda c: c if c.name == "method" else c.astype(float))
    data = data[np.isfinite(data[x]) & np.isfinite(data[y])].reset_index()
    points = hv.Points(data, kdims=[x, y], vdims=["run", "method"]).opts(
        size=9, tools=["hover"], width=520, height=360, title=f"{y.replace('_', ' ')} vs {x.replace('_', ' ')}"
    )
    span = float(np.ptp(data[y])) if len(data) > 1 else 0.0
    labels = hv.Labels(data, kdims=[x, y], vdims=["method"]).opts(
        text_font_size="8pt", text_baseline="bottom", yoffset=0.03 * span if span > 0 else 0.01
    )
    return points * labels
