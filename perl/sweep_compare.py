"""Configurations of a sweep summary compared over seeds: differences with tests, bands over steps.

Both read what `perl.sweep_summary` builds (``summary.nc``, or runs' metrics by configuration) and
use `perl.stats`; `perl.sweep_summary` re-exports them.

Usage:
    compare_configs(ds, "final_equation_reward", reference="lora-r8-lr5e-4")   # DataFrame, Holm-adjusted
    band_over_seeds(runs.metrics.reward, [configuration_of(r) for r in runs])   # Dataset (config, step)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from perl import stats

__all__ = ["band_over_seeds", "compare_configs"]


def compare_configs(
    ds: xr.Dataset, quantity: str, reference: str | None = None, test: str = "welch", alpha: float = 0.05
):
    """Every configuration against ``reference`` on one quantity: is the difference larger than the seed spread?

    For each other configuration: the difference of means over seeds (config - reference), its
    confidence interval (Welch / paired t), the ``test``'s p-value, the Holm-adjusted p-value over
    all the comparisons in the table, and ``verdict``: "differs" when the adjusted p-value is
    below ``alpha``, "no evidence" otherwise, "undefined" when the test cannot be computed (fewer
    than 2 seeds with values, or no spread). The table's attrs name the test and the adjustment.

    Args:
        ds (xr.Dataset): `summarize_runs` / ``summary.nc``.
        quantity (str): a key of `QUANTITIES`.
        reference (str, optional): the configuration compared against; default: the first one
            whose method is ``lora``, else the first configuration.
        test (str, default "welch"): ``"welch"``, ``"permutation"`` or ``"paired_t"`` (seeds matched).
        alpha (float, default 0.05): the family-wise level of the verdict.

    Returns:
        pandas.DataFrame indexed by configuration.
    """
    import pandas as pd

    from perl.sweep_summary import QUANTITIES

    if quantity not in ds:
        raise KeyError(f"{quantity!r} is not in the summary; use one of {', '.join(QUANTITIES)}.")
    labels = [str(c) for c in ds["config"].values]
    if reference is None:
        methods = [str(m) for m in ds["method"].values]
        reference = labels[methods.index("lora")] if "lora" in methods else labels[0]
    if reference not in labels:
        raise KeyError(
            f"reference {reference!r} is not a configuration of the summary; use one of {', '.join(labels)}."
        )
    ref = ds[quantity].sel(config=reference).values
    rows = []
    for label in labels:
        if label == reference:
            continue
        result = stats.compare(ds[quantity].sel(config=label).values, ref, test=test)
        rows.append(
            {
                "config": label,
                "method": str(ds["method"].sel(config=label).values),
                "n": result.n_a,
                "n_ref": result.n_b,
                "diff": result.diff,
                "diff_ci_low": result.low,
                "diff_ci_high": result.high,
                "pvalue": result.pvalue,
                "min_pvalue": result.min_pvalue,
            }
        )
    table = pd.DataFrame(
        rows, columns=["config", "method", "n", "n_ref", "diff", "diff_ci_low", "diff_ci_high", "pvalue", "min_pvalue"]
    ).set_index("config")
    table["pvalue_holm"] = stats.holm(table["pvalue"].to_numpy(dtype=float)) if len(table) else []
    table["verdict"] = [
        "undefined" if not np.isfinite(p) else "differs" if p < alpha else "no evidence" for p in table["pvalue_holm"]
    ]
    table.attrs.update(
        quantity=quantity,
        reference=reference,
        test=stats.TESTS[test],
        alpha=alpha,
        adjustment="Holm-Bonferroni over the rows of this table",
    )
    return table


def band_over_seeds(da: xr.DataArray, configs: Sequence[str], level: float = 0.95, smooth: int = 1) -> xr.Dataset:
    """Mean and t confidence band over seeds of a (run, step) quantity, per configuration and step.

    Args:
        da (xr.DataArray): dims ``run`` and ``step`` (e.g. ``runs.metrics.reward``).
        configs (sequence of str): the configuration of each run, in ``da``'s run order
            (e.g. ``[configuration_of(r) for r in runs]``).
        level (float, default 0.95): confidence level.
        smooth (int, default 1): centred rolling mean over this many steps before the band (a
            per-step reward of a few prompts is noisy); 1 = none.

    Returns:
        Dataset (config, step): ``mean``, ``low``, ``high``, ``n`` (seeds with a value at that step).
    """
    if len(configs) != da.sizes["run"]:
        raise ValueError(f"configs names {len(configs)} runs, the data has {da.sizes['run']}.")
    if smooth > 1:
        da = da.rolling(step=int(smooth), center=True, min_periods=1).mean()
    values = da.transpose("run", "step").values.astype(float)
    labels = list(dict.fromkeys(configs))
    out = {key: np.full((len(labels), da.sizes["step"]), np.nan) for key in ("mean", "low", "high")}
    count = np.zeros((len(labels), da.sizes["step"]), dtype=np.int64)
    for i, label in enumerate(labels):
        rows = values[[j for j, c in enumerate(configs) if c == label]]
        for t in range(rows.shape[1]):
            iv = stats.t_interval(rows[:, t], level)
            out["mean"][i, t], out["low"][i, t], out["high"][i, t], count[i, t] = iv.mean, iv.low, iv.high, iv.n
    coords = {"config": labels, "step": da["step"].values}
    ds = xr.Dataset({k: (("config", "step"), v) for k, v in out.items()}, coords=coords)
    ds["n"] = (("config", "step"), count)
    ds.attrs.update(ci_method=f"{stats.CI_METHODS['t']}; level {level}", smooth=int(smooth), quantity=str(da.name))
    return ds
