"""The PeRL study's questions answered on a sweep with seeds: each answer is a table and one sentence
that states the finding with its uncertainty (``notebooks/06_perl_questions.ipynb``).

(a) `svd_init_answer`: do SVD-initialised adapters (PiSSA, MiLoRA, MiLoRA+) lose reward under RL compared
    with LoRA, and where do their updates go relative to W0's principal and minor subspaces?
(b) `rank_answer`: how much of r does each method's update use?
(c) `ab_answer`: are the gradients of A and B asymmetric?
(d) `depth_answer`: which layers and modules change most?

Numbers come from the sweep summary (`perl.sweep_summary`, one value per run, then mean and
Student t interval over seeds) and, for (d), from the runs' spectral stores. Sentences are written
from those numbers, so they say what *this* sweep shows, including "no evidence" when the seeds
disagree more than the methods do. A difference is called one only when Welch's t-test over seeds,
Holm-adjusted across the comparisons of the table, is below ``alpha``.

Usage:
    ds = open_summary("sweeps/perl_questions_nano")
    answer = svd_init_answer(ds)
    answer.table; print(answer.sentence)
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from perl import stats
from perl.run import MissingDataWarning, Run
from perl.sweep_summary import (
    SUMMARY_NC,
    compare_configs,
    configuration_of,
    find_sweep_runs,
    summarize_sweep,
)

__all__ = [
    "Answer",
    "ab_answer",
    "depth_answer",
    "depth_profile",
    "interval_table",
    "open_summary",
    "rank_answer",
    "svd_init_answer",
]

SVD_INIT = ("pissa", "milora", "milora_plus")  # milora_plus: A from the bottom-r right singular vectors, B = 0


@dataclass
class Answer:
    """A question's answer: the table behind it, the sentence, and any further tables.

    Args:
        table (pandas.DataFrame): the numbers the sentence is about.
        sentence (str): the finding and its uncertainty, in one sentence.
        extra (dict): further tables (e.g. the tests), by name.
    """

    table: object
    sentence: str
    extra: dict = field(default_factory=dict)

    def _repr_markdown_(self) -> str:
        return self.sentence


def open_summary(sweep_dir: str | os.PathLike) -> xr.Dataset:
    """The sweep's ``summary.nc`` (what `perlwb sweep` wrote), else a summary built now from its finished runs."""
    path = Path(sweep_dir).expanduser() / SUMMARY_NC
    if path.is_file():
        with xr.open_dataset(path, engine="netcdf4") as ds:
            return ds.load()
    return summarize_sweep(sweep_dir)


def _fmt(value: float, digits: int = 3) -> str:
    return "nan" if not np.isfinite(value) else f"{value:.{digits}f}"


def _ci(ds: xr.Dataset, quantity: str, config: str, digits: int = 3) -> str:
    """``mean [low, high]`` of one configuration (``mean (1 seed)`` when there is no interval)."""
    sel = ds.sel(config=config)
    mean, low, high = (float(sel[f"{quantity}_{s}"]) for s in ("mean", "ci_low", "ci_high"))
    if not np.isfinite(low):
        return f"{_fmt(mean, digits)} (no interval: {int(sel[f'{quantity}_n'])} seed)"
    return f"{_fmt(mean, digits)} [{_fmt(low, digits)}, {_fmt(high, digits)}]"


def _level(ds: xr.Dataset) -> str:
    return f"{float(ds.attrs.get('ci_level', 0.95)):.0%}"


def interval_table(ds: xr.Dataset, quantities, configs=None, sort_by: str | None = None):
    """Per configuration: method, n seeds, and for each quantity its mean and interval (``_low``, ``_high``).

    Args:
        ds (xr.Dataset): the sweep summary.
        quantities (list of str): keys of `perl.sweep_summary.QUANTITIES`.
        configs (list of str, optional): the configurations (rows), default all.
        sort_by (str, optional): a quantity to sort the rows by (descending mean).
    """
    import pandas as pd

    configs = [str(c) for c in ds["config"].values] if configs is None else list(configs)
    rows = []
    for c in configs:
        sel = ds.sel(config=c)
        row = {"config": c, "method": str(sel["method"].values), "n_seeds": int(sel["n_seeds"])}
        for q in quantities:
            row[q] = float(sel[f"{q}_mean"])
            row[f"{q}_low"] = float(sel[f"{q}_ci_low"])
            row[f"{q}_high"] = float(sel[f"{q}_ci_high"])
        rows.append(row)
    table = pd.DataFrame(rows).set_index("config")
    if sort_by is not None and len(table):
        table = table.sort_values(sort_by, ascending=False, na_position="last")
    table.attrs["interval"] = ds.attrs.get("ci_formula", "")
    return table


def _configs_of(ds: xr.Dataset, methods) -> list[str]:
    return [str(c) for c, m in zip(ds["config"].values, ds["method"].values) if str(m) in methods]


def _reference(ds: xr.Dataset) -> str | None:
    lora = _configs_of(ds, ("lora",))
    return lora[0] if lora else None


# ====================================================================================== (a)
def svd_init_answer(ds: xr.Dataset, alpha: float = 0.05) -> Answer:
    """(a) PiSSA, MiLoRA and MiLoRA+ against LoRA: reward and its gain, and the update's principal / minor energy.

    ``extra["tests"]``: Welch's t-test over seeds of each SVD-initialised configuration against
    LoRA, for the final correct-equation reward and its gain, Holm-adjusted over all of these tests.
    """
    import pandas as pd

    quantities = ["final_equation_reward", "equation_reward_gain", "energy_principal", "energy_minor", "energy_chance"]
    ref = _reference(ds)
    svd = _configs_of(ds, SVD_INIT)
    configs = ([ref] if ref else []) + svd
    table = interval_table(ds, quantities, configs)
    if ref is None or not svd:
        have = ", ".join(sorted({str(m) for m in ds["method"].values}))
        return Answer(table, f"(a) needs LoRA and PiSSA or MiLoRA in the sweep; it has {have}.")
    tests = []
    for q in ("final_equation_reward", "equation_reward_gain"):
        t = compare_configs(ds.sel(config=[ref, *svd]), q, reference=ref, alpha=alpha)
        t.insert(0, "quantity", q)
        tests.append(t)
    tests = pd.concat(tests)
    tests["pvalue_holm"] = stats.holm(tests["pvalue"].to_numpy(dtype=float))
    tests["verdict"] = [
        "undefined" if not np.isfinite(p) else "differs" if p < alpha else "no evidence" for p in tests["pvalue_holm"]
    ]
    parts = []
    for c in svd:
        row = tests[(tests.index == c) & (tests["quantity"] == "equation_reward_gain")].iloc[0]
        sel = ds.sel(config=c)
        side = "principal" if float(sel["energy_principal_mean"]) > float(sel["energy_minor_mean"]) else "minor"
        low, high = float(sel["equation_reward_gain_ci_low"]), float(sel["equation_reward_gain_ci_high"])
        alone = (
            "no interval"
            if not np.isfinite(low)
            else "it loses reward"
            if high < 0
            else "it gains reward"
            if low > 0
            else "no evidence of a loss or a gain"
        )
        parts.append(
            f"{sel['method'].values!s} changes its correct-equation reward by {_ci(ds, 'equation_reward_gain', c)} "
            f"over training ({alone}) vs LoRA's "
            f"{_ci(ds, 'equation_reward_gain', ref)} (difference {_fmt(row['diff'])}, Welch p = {_fmt(row['pvalue'])}, "
            f"Holm {_fmt(row['pvalue_holm'])}: {row['verdict']}), and its update puts "
            f"{_ci(ds, 'energy_principal', c, 2)} of its energy in W0's principal and {_ci(ds, 'energy_minor', c, 2)} "
            f"in its minor subspace (mostly {side}; chance {_fmt(float(sel['energy_chance_mean']), 2)}; "
            f"LoRA {_ci(ds, 'energy_principal', ref, 2)} principal)"
        )
    sentence = "(a) " + "; ".join(parts) + f" ({_level(ds)} t intervals over seeds)."
    return Answer(table, sentence, {"tests": tests})


# ====================================================================================== (b)
def rank_answer(ds: xr.Dataset, alpha: float = 0.05) -> Answer:
    """(b) The effective rank of each method's update as a fraction of r (sorted, with intervals).

    ``extra["tests"]``: the most and the least rank-using configurations against each other (Welch).
    """
    table = interval_table(ds, ["update_rank_fraction", "update_effective_rank"], sort_by="update_rank_fraction")
    table = table[np.isfinite(table["update_rank_fraction"])]
    if len(table) == 0:
        return Answer(table, "(b) no run of the sweep has a spectral store with update_effective_rank.")
    top, bottom = table.index[0], table.index[-1]
    sentence = (
        f"(b) The update's effective rank uses between {_ci(ds, 'update_rank_fraction', bottom, 2)} of r "
        f"({bottom}) and {_ci(ds, 'update_rank_fraction', top, 2)} ({top})"
    )
    extra = {}
    if top != bottom:
        result = stats.welch_test(
            ds["update_rank_fraction"].sel(config=top).values, ds["update_rank_fraction"].sel(config=bottom).values
        )
        verdict = "a real spread" if result.significant(alpha) else "not distinguishable from seed noise"
        sentence += (
            f"; the gap between them, {_fmt(result.diff, 2)} [{_fmt(result.low, 2)}, {_fmt(result.high, 2)}], "
            f"is {verdict} (Welch p = {_fmt(result.pvalue)})"
        )
        extra["extremes"] = result
    sentence += f" ({_level(ds)} t intervals over seeds; PiSSA/MiLoRA updates have rank up to 2r)."
    return Answer(table, sentence, extra)


# ====================================================================================== (c)
def ab_answer(ds: xr.Dataset) -> Answer:
    """(c) ||grad A|| / ||grad B| per configuration; an interval that excludes 1 is an asymmetry (t-test at 5%)."""
    table = interval_table(ds, ["grad_ab_ratio"], sort_by="grad_ab_ratio")
    table = table[np.isfinite(table["grad_ab_ratio"])]
    if len(table) == 0:
        return Answer(
            table, "(c) no run of the sweep has A and B gradient norms (gradient tracking off, or no A/B factors)."
        )
    low, high = table["grad_ab_ratio_low"], table["grad_ab_ratio_high"]
    below = list(table.index[high < 1])
    above = list(table.index[low > 1])
    unclear = [c for c in table.index if c not in below and c not in above]
    table["A_vs_B"] = ["A < B" if c in below else "A > B" if c in above else "unclear" for c in table.index]
    sentence = (
        f"(c) The A/B gradient-norm ratio ranges from {_ci(ds, 'grad_ab_ratio', table.index[-1], 2)} "
        f"({table.index[-1]}) to {_ci(ds, 'grad_ab_ratio', table.index[0], 2)} ({table.index[0]}); "
        f"its {_level(ds)} interval lies below 1 (B gets the larger gradient) for {len(below)} of {len(table)} "
        f"configurations, above 1 for {len(above)}, and includes 1 for {len(unclear)}"
        + (f" ({', '.join(unclear)})" if unclear and len(unclear) <= 4 else "")
        + "."
    )
    return Answer(table, sentence)


# ====================================================================================== (d)
def depth_profile(
    sweep_dir: str | os.PathLike, variable: str = "update_frobenius_norm", level: float = 0.95
) -> xr.Dataset:
    """Each configuration's ``variable`` at the last spectral snapshot per (layer, module), over seeds.

    Returns:
        Dataset (config, layer, module): ``mean``, ``low``, ``high`` (Student t over seeds), ``n``,
        and ``per_seed`` (config, seed, layer, module). Not-adapted cells are NaN.
    """
    run_dirs, _ = find_sweep_runs(sweep_dir)
    finals, labels, seeds = [], [], []
    for path in run_dirs:
        run = Run(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MissingDataWarning)
            sp = run.spectral
        if sp is None or variable not in sp:
            continue
        da = sp[variable]
        values = da.transpose("step", "layer", "module").values
        finite = np.isfinite(values).reshape(values.shape[0], -1).any(axis=1)
        if not finite.any():
            continue
        finals.append(da.isel(step=int(np.flatnonzero(finite)[-1])).drop_vars("step"))
        labels.append(configuration_of(run))
        seeds.append(run.seed if run.seed is not None else -1)
    if not finals:
        raise ValueError(
            f"No run in {sweep_dir} has {variable!r} in its spectral store; train with spectral tracking."
        )
    layers = sorted({int(v) for f in finals for v in f["layer"].values})
    modules = list(dict.fromkeys(str(v) for f in finals for v in f["module"].values))
    configs, seed_values = list(dict.fromkeys(labels)), sorted(set(seeds))
    cube = np.full((len(configs), len(seed_values), len(layers), len(modules)), np.nan)
    for f, c, s in zip(finals, labels, seeds):
        f = f.reindex(layer=layers, module=modules)
        cube[configs.index(c), seed_values.index(s)] = f.transpose("layer", "module").values
    out = {k: np.full((len(configs), len(layers), len(modules)), np.nan) for k in ("mean", "low", "high")}
    count = np.zeros((len(configs), len(layers), len(modules)), dtype=np.int64)
    for i in range(len(configs)):
        for j in range(len(layers)):
            for k in range(len(modules)):
                iv = stats.t_interval(cube[i, :, j, k], level)
                out["mean"][i, j, k], out["low"][i, j, k], out["high"][i, j, k], count[i, j, k] = (
                    iv.mean,
                    iv.low,
                    iv.high,
                    iv.n,
                )
    dims = ("config", "layer", "module")
    ds = xr.Dataset(
        {k: (dims, v) for k, v in out.items()},
        coords={"config": configs, "layer": layers, "module": modules, "seed": seed_values},
    )
    ds["n"] = (dims, count)
    ds["per_seed"] = (("config", "seed", "layer", "module"), cube)
    ds.attrs.update(
        variable=variable,
        ci_method=f"{stats.CI_METHODS['t']}; level {level}",
        long_name=finals[0].attrs.get("long_name", variable),
        units=finals[0].attrs.get("units", ""),
    )
    return ds


def depth_answer(profile: xr.Dataset) -> Answer:
    """(d) Per layer (mean over modules) and per module (mean over layers) of each configuration, and the cell that changes most.

    The per-layer and per-module numbers are first averaged within each seed, then the t interval
    is taken over seeds (``extra["by_layer"]``, ``extra["by_module"]``: mean, low, high per config).
    """
    import pandas as pd

    def over_seeds(dim_kept: str):
        other = "module" if dim_kept == "layer" else "layer"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per_seed = profile["per_seed"].mean(other, skipna=True)  # (config, seed, dim_kept)
        rows = []
        for c in profile["config"].values:
            for v in per_seed[dim_kept].values:
                iv = stats.t_interval(per_seed.sel(config=c, **{dim_kept: v}).values)
                rows.append(
                    {"config": str(c), dim_kept: v, "mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n}
                )
        return pd.DataFrame(rows)

    by_layer, by_module = over_seeds("layer"), over_seeds("module")
    table = by_layer.pivot(index="config", columns="layer", values="mean")
    # the layer and the module that move most, counted over configurations
    top_layer = by_layer.loc[by_layer.groupby("config")["mean"].idxmax().dropna()]
    top_module = by_module.loc[by_module.groupby("config")["mean"].idxmax().dropna()]
    layer_votes = top_layer["layer"].value_counts()
    module_votes = top_module["module"].value_counts()
    n = len(top_layer)
    lead = profile["config"].values[0]
    lead_layers = by_layer[by_layer["config"] == str(lead)].sort_values("mean", ascending=False)
    first, second = lead_layers.iloc[0], lead_layers.iloc[1] if len(lead_layers) > 1 else None
    separated = second is not None and np.isfinite(first["low"]) and first["low"] > second["high"]
    sentence = (
        f"(d) {profile.attrs.get('long_name', profile.attrs['variable'])} is largest in layer "
        f"{int(layer_votes.index[0])} for {int(layer_votes.iloc[0])} of {n} configurations and in "
        f"{module_votes.index[0]} for {int(module_votes.iloc[0])} of {n}; for {lead}, layer {int(first['layer'])} "
        f"({_fmt(first['mean'])} [{_fmt(first['low'])}, {_fmt(first['high'])}]) "
        + (
            f"{'is' if separated else 'is not'} separated from the next, layer {int(second['layer'])} "
            f"({_fmt(second['mean'])} [{_fmt(second['low'])}, {_fmt(second['high'])}])"
            if second is not None
            else ""
        )
        + " (t intervals over seeds of the per-seed means)."
    )
    return Answer(table, sentence, {"by_layer": by_layer, "by_module": by_module})
