"""One row per configuration of a sweep, aggregated over its seeds, with confidence intervals.

A *configuration* is every setting of a run except its seed (``common.seed``): runs whose configs
are equal once the seed and the run's location are left out are seeds of one configuration. For
each run a few numbers are read from its own stores (``metrics.jsonl``, the spectral, gradient and
alignment stores, through `perl.open_run`), then each configuration gets ``n_seeds`` and the
mean, standard deviation and confidence interval over its seeds (`perl.stats`; Student t by
default, the method is in the attrs).

The per-run quantities (`QUANTITIES`; each variable's attrs repeat its formula):

- ``final_equation_reward``: mean of the last K logged ``rewards/equation_reward/mean`` (the
  correct-equation reward), K = ``last_k`` (attrs).
- ``equation_reward_gain``: that mean over the last K minus the mean over the first K logged steps.
- ``final_reward``: the same last-K mean of the total reward (format + equation).
- ``update_effective_rank``: effective rank (sum sigma)^2 / sum sigma^2 of the update since
  initialisation s (B_t A_t - B_0 A_0), mean over adapted (layer, module) cells at the last
  spectral snapshot; ``update_rank_fraction`` is it divided by the run's r (PiSSA and MiLoRA
  updates have rank up to 2r, so the fraction can exceed 1).
- ``energy_principal`` / ``energy_minor``: fraction of the update's energy in W0's top-k / bottom-k
  left singular subspace (alignment store), mean over cells at the last step where it is finite.
  ``energy_chance`` is what a random update would score (k/m, mean over cells).
- ``intruders``: intruder dimensions per adapted module (mean over cells) at the last intruder snapshot.
- ``grad_ab_ratio``: mean ||grad A|| / mean ||grad B|| over the logged gradient steps and the cells
  that have both (a ratio of means: defined when A's gradient is 0, as at LoRA's first step).

Missing is NaN with a reason: a vector method (IA3, LayerNorm tuning) has no low-rank update, a run
without alignment tracking has no energies.

Usage:
    ds = summarize_sweep("sweeps/perl_questions_nano")       # xarray Dataset, dims (config, seed)
    write_summary("sweeps/perl_questions_nano")              # summary.csv and summary.nc in that folder
    summary_table(ds)                                        # the CSV's rows as a DataFrame
    compare_configs(ds, "final_equation_reward", reference="lora-r8-lr5e-4")
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from perl import stats
from perl.fileio import atomic_path
from perl.run import MissingDataWarning, Run, RunError, final_reward, logged_values
from perl.sweep_compare import band_over_seeds, compare_configs

__all__ = [
    "LAST_K",
    "QUANTITIES",
    "SUMMARY_CSV",
    "SUMMARY_NC",
    "band_over_seeds",
    "compare_configs",
    "configuration_of",
    "find_sweep_runs",
    "markdown_table",
    "run_values",
    "summarize_runs",
    "summarize_sweep",
    "summary_table",
    "write_summary",
]

SUMMARY_CSV = "summary.csv"
SUMMARY_NC = "summary.nc"
LAST_K = 20  # logged steps the final reward (and the first-K baseline of the gain) is averaged over
EQUATION_KEY = "rewards/equation_reward/mean"
REWARD_KEY = "reward"
MARKER = "sweep_run.json"  # perl.sweep.MARKER and SWEEP_COPY (not imported: that would pull in perl.config)
SWEEP_COPY = "sweep.yaml"

QUANTITIES: dict[str, dict[str, str]] = {
    "final_equation_reward": {
        "long_name": "final correct-equation reward",
        "units": "1",
        "formula": f"mean of the last K logged {EQUATION_KEY} (K = last_k)",
    },
    "equation_reward_gain": {
        "long_name": "gain of the correct-equation reward",
        "units": "1",
        "formula": f"mean of the last K minus mean of the first K logged {EQUATION_KEY} (K = last_k)",
    },
    "final_reward": {
        "long_name": "final total reward",
        "units": "1",
        "formula": "mean of the last K logged reward (format + equation; K = last_k)",
    },
    "update_effective_rank": {
        "long_name": "effective rank of the update since init",
        "units": "1",
        "formula": "(sum sigma)^2 / sum sigma^2 of s (B_t A_t - B_0 A_0), mean over adapted (layer, module) cells "
        "at the last spectral snapshot (spectral store: update_effective_rank)",
    },
    "update_rank_fraction": {
        "long_name": "effective rank of the update as a fraction of r",
        "units": "1",
        "formula": "update_effective_rank / r (the update of PiSSA / MiLoRA has rank <= 2r: can exceed 1)",
    },
    "energy_principal": {
        "long_name": "update energy in W0's top-k left singular subspace",
        "units": "1",
        "formula": "||U_k^T dW||_F^2 / ||dW||_F^2, mean over adapted cells at the last step where finite "
        "(alignment store: energy_fraction_top_left; chance level k/m)",
    },
    "energy_minor": {
        "long_name": "update energy in W0's bottom-k left singular subspace",
        "units": "1",
        "formula": "as energy_principal for W0's bottom-k left singular vectors (energy_fraction_bottom_left)",
    },
    "energy_chance": {
        "long_name": "chance level of energy_principal",
        "units": "1",
        "formula": "k/m, the expected energy fraction of a random update in a k-dim subspace of R^m, mean over the "
        "tracked cells (alignment store: chance_energy_fraction_left)",
    },
    "intruders": {
        "long_name": "intruder dimensions per adapted module",
        "units": "1",
        "formula": "intruder_dimensions (alignment store), mean over adapted cells at the last intruder snapshot",
    },
    "grad_ab_ratio": {
        "long_name": "A/B gradient-norm ratio",
        "units": "1",
        "formula": "mean ||grad A|| / mean ||grad B|| of the accumulated pre-clip gradients, over the logged "
        "gradient steps and the (layer, module) cells with both (gradient store: grad_norm)",
    },
}
STATS = ("mean", "std", "ci_low", "ci_high")
# config fields that say where a run went, not what it is
_LOCATION = {
    ("training", "output_dir"),
    ("training", "run_name"),
    ("training", "overwrite_output_dir"),
    ("training", "resume_from_checkpoint"),
    ("tracker", "tracking_output_dir"),
    ("common", "seed"),
}


# ====================================================================================== one run
def _quiet_get(run: Run, kind: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingDataWarning)
        return getattr(run, kind)


def _cell_mean_last(da: xr.DataArray) -> float:
    """Mean over (layer, module) cells at the last step where any cell is finite; NaN if none."""
    values = da.transpose("step", ...).values.reshape(da.sizes["step"], -1)
    finite = np.isfinite(values).any(axis=1)
    if not finite.any():
        return math.nan
    row = values[np.flatnonzero(finite)[-1]]
    return float(row[np.isfinite(row)].mean())


def run_values(run: Run | str | os.PathLike, last_k: int = LAST_K) -> dict[str, float]:
    """The per-run quantities of `QUANTITIES` read from one run folder's stores (NaN when missing).

    Args:
        run (Run | str | Path): a run folder or `perl.open_run` result.
        last_k (int, default `LAST_K`): logged steps of the final (and first) reward window.
    """
    from perl.viz.alignment import read_alignment

    run = run if isinstance(run, Run) else Run(run)
    out = dict.fromkeys(QUANTITIES, math.nan)
    metrics = _quiet_get(run, "metrics")
    # note: the final rewards are perl.run.final_reward, the one definition sweeps and notebooks share
    out["final_equation_reward"] = final_reward(metrics, last_k, EQUATION_KEY)
    out["final_reward"] = final_reward(metrics, last_k, REWARD_KEY)
    equation = logged_values(metrics, EQUATION_KEY)
    if equation.size:
        out["equation_reward_gain"] = out["final_equation_reward"] - float(equation[:last_k].mean())

    spectral = _quiet_get(run, "spectral")
    if spectral is not None and "update_effective_rank" in spectral:
        out["update_effective_rank"] = _cell_mean_last(spectral["update_effective_rank"])
        if run.r:
            out["update_rank_fraction"] = out["update_effective_rank"] / run.r

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingDataWarning)
        align = read_alignment(run)
    if align is not None:
        for key, name in (
            ("energy_principal", "energy_fraction_top_left"),
            ("energy_minor", "energy_fraction_bottom_left"),
            ("intruders", "intruder_dimensions"),
        ):
            if name in align:
                out[key] = _cell_mean_last(align[name])
        if "chance_energy_fraction_left" in align and "energy_fraction_top_left" in align:
            tracked = np.isfinite(align["energy_fraction_top_left"]).any("step").values
            chance = align["chance_energy_fraction_left"].values[tracked]
            out["energy_chance"] = float(chance.mean()) if chance.size else math.nan

    gradients = _quiet_get(run, "gradients")
    if (
        gradients is not None
        and "grad_norm" in gradients
        and {"A", "B"} <= set(gradients["component"].values.tolist())
    ):
        a = gradients["grad_norm"].sel(component="A").values
        b = gradients["grad_norm"].sel(component="B").values
        both = np.isfinite(a) & np.isfinite(b)
        if both.any() and b[both].mean() > 0:
            out["grad_ab_ratio"] = float(a[both].mean() / b[both].mean())
    return out


# ====================================================================================== configurations
def _identity(config: dict) -> str:
    """The run's config without its seed and location, as canonical JSON: equal for seeds of one configuration."""
    kept = {
        s: {k: v for k, v in fields.items() if (s, k) not in _LOCATION}
        for s, fields in config.items()
        if isinstance(fields, dict)
    }
    return json.dumps(kept, sort_keys=True, default=str)


def configuration_of(run: Run) -> str:
    """A configuration's label: the run folder's name without its seed part (``lora-r8-s0-lr5e-4`` -> ``lora-r8-lr5e-4``).

    A folder not named by a sweep is labelled ``<method>-r<r>``.
    """
    seed = run.seed
    if seed is not None:
        stripped, n = re.subn(rf"(^|-)s{seed}(?=-|$)", "", run.name, count=1)
        if n:
            return stripped.lstrip("-") or f"{run.method}-r{run.r}"
    return f"{run.method}-r{run.r}"


def _flat(config: dict) -> dict[str, object]:
    return {
        f"{s}.{k}": v
        for s, fields in config.items()
        if isinstance(fields, dict)
        for k, v in fields.items()
        if (s, k) not in _LOCATION
    }


def find_sweep_runs(sweep_dir: str | os.PathLike) -> tuple[list[Path], dict[str, str]]:
    """The finished run folders directly below ``sweep_dir``, and ``{folder: reason}`` for those skipped.

    A sub-folder counts when it holds a run's ``config.yaml`` and its ``sweep_run.json`` marker
    says ``finished``. In a folder that no sweep made (no ``sweep.yaml`` copy in it) a sub-folder
    without a marker counts too.

    Raises:
        RunError: ``sweep_dir`` is not a folder, or holds no finished run.
    """
    folder = Path(sweep_dir).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise RunError(f"Sweep folder {folder} {what}; pass the sweep_dir of a perlwb sweep.")
    runs, skipped = [], {}
    made_by_sweep = (folder / SWEEP_COPY).is_file()
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (child / "config.yaml").is_file():
            continue
        marker = child / MARKER
        if made_by_sweep and not marker.is_file():
            skipped[child.name] = "no sweep_run.json: still training, or stopped"
            continue
        if marker.is_file():
            try:
                status = json.loads(marker.read_text(encoding="utf-8")).get("status")
            except (OSError, ValueError, AttributeError):
                status = "unreadable marker"
            if status != "finished":
                skipped[child.name] = f"sweep_run.json says {status!r}"
                continue
        runs.append(child)
    if not runs:
        raise RunError(
            f"No finished runs in {folder}; a run folder holds config.yaml (and sweep_run.json status "
            "'finished' when a sweep trained it). Train the sweep first: perlwb sweep SWEEP.yaml."
        )
    return runs, skipped


def summarize_runs(
    runs: Iterable[Run | str | os.PathLike], last_k: int = LAST_K, level: float = 0.95, ci: str = "t"
) -> xr.Dataset:
    """The per-configuration summary of ``runs``: dims ``config`` x ``seed``.

    Variables: each quantity of `QUANTITIES` per (config, seed) (NaN where that seed did not run),
    and per config ``<quantity>_mean``, ``_std`` (ddof=1), ``_ci_low``, ``_ci_high`` (over the
    seeds with a finite value), ``<quantity>_n`` (those seeds), ``n_seeds`` (runs of the config)
    and ``run`` (config, seed: the folder name, "" if none). Coordinates along ``config``:
    ``method``, ``r``, ``learning_rate`` and every other config field that differs between the
    configurations (named ``section.field``).

    The first/last window K is ``min(last_k, n // 2)`` with n the fewest equation rewards any run
    logged, so the two windows of the gain never overlap; the K used is ``attrs["last_k"]``.

    Args:
        runs (iterable): run folders or `Run` objects.
        last_k (int, default `LAST_K`): the window of the final reward.
        level (float, default 0.95): confidence level of the intervals.
        ci (str, default "t"): ``"t"`` (Student t) or ``"bootstrap"`` (see `perl.stats`).
    """
    opened = [r if isinstance(r, Run) else Run(r) for r in runs]
    if not opened:
        raise RunError("summarize_runs got no runs; pass run folders (e.g. find_sweep_runs(sweep_dir)[0]).")
    if not isinstance(last_k, int) or last_k < 1:
        raise ValueError(f"last_k must be a positive integer (logged steps), got {last_k!r}.")
    logged = [logged_values(_quiet_get(r, "metrics"), EQUATION_KEY).size for r in opened]
    fewest = min((n for n in logged if n), default=0)
    k = max(1, min(last_k, fewest // 2)) if fewest else last_k

    groups: dict[tuple[str, int], list[Run]] = {}
    for run in opened:
        identity, copy = _identity(run.config), 0
        # note: the same configuration and seed twice (a run repeated in another folder) is a group of its own
        while any(m.seed == run.seed for m in groups.get((identity, copy), [])):
            copy += 1
        groups.setdefault((identity, copy), []).append(run)
    labels, used = [], set()
    for (_, copy), members in groups.items():
        label = configuration_of(members[0]) + (f" ({members[0].name})" if copy else "")
        while label in used:  # note: two configurations that only differ in a field the name leaves out
            label += "'"
        used.add(label)
        labels.append(label)
    seeds = sorted({r.seed if r.seed is not None else -1 for r in opened})

    values = {q: np.full((len(groups), len(seeds)), np.nan) for q in QUANTITIES}
    names = np.full((len(groups), len(seeds)), "", dtype=object)
    for i, members in enumerate(groups.values()):
        for run in members:
            j = seeds.index(run.seed if run.seed is not None else -1)
            names[i, j] = run.name
            for q, v in run_values(run, k).items():
                values[q][i, j] = v

    ds = xr.Dataset(
        coords={
            "config": ("config", labels, {"long_name": "configuration (every setting but the seed)"}),
            "seed": ("seed", np.array(seeds, dtype=np.int64), {"long_name": "common.seed of the run"}),
        }
    )
    flats = [_flat(members[0].config) for members in groups.values()]
    ds = ds.assign_coords(
        method=("config", [str(members[0].method) for members in groups.values()]),
        r=(
            "config",
            np.array(
                [members[0].r if members[0].r is not None else -1 for members in groups.values()], dtype=np.int64
            ),
        ),
        learning_rate=("config", np.array([float(f.get("training.learning_rate", math.nan)) for f in flats])),
    )
    varying = [
        key
        for key in dict.fromkeys(k2 for f in flats for k2 in f)
        if key not in ("peft.type", "peft.r", "training.learning_rate")
        and len({json.dumps(f.get(key), sort_keys=True, default=str) for f in flats}) > 1
    ]
    for key in varying:
        column = [f.get(key) for f in flats]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in column):
            ds = ds.assign_coords({key: ("config", np.array(column, dtype=float))})
        else:
            ds = ds.assign_coords(
                {key: ("config", [json.dumps(v, default=str) if not isinstance(v, str) else v for v in column])}
            )
    ds["n_seeds"] = (
        "config",
        np.array([len(m) for m in groups.values()], dtype=np.int64),
        {"long_name": "runs (seeds) of the configuration", "units": "1"},
    )
    ds["run"] = (
        ("config", "seed"),
        names.astype(str),
        {"long_name": "run folder of (configuration, seed); '' = none"},
    )
    ci_text = f"{stats.CI_METHODS[ci]}; level {level}"
    for q, attrs in QUANTITIES.items():
        ds[q] = (("config", "seed"), values[q], {**attrs, "description": "per run (seed)"})
        intervals = [stats.mean_interval(row, level, ci) for row in values[q]]
        for stat, field, what in (
            ("mean", "mean", "mean over seeds"),
            ("std", "std", "standard deviation over seeds (ddof=1)"),
            ("ci_low", "low", f"lower end of the {level:.0%} confidence interval of the mean"),
            ("ci_high", "high", f"upper end of the {level:.0%} confidence interval of the mean"),
        ):
            ds[f"{q}_{stat}"] = (
                "config",
                np.array([getattr(iv, field) for iv in intervals], dtype=float),
                {
                    "long_name": f"{attrs['long_name']}: {what}",
                    "units": attrs["units"],
                    **({"ci_method": ci_text} if stat.startswith("ci") else {}),
                },
            )
        ds[f"{q}_n"] = (
            "config",
            np.array([iv.n for iv in intervals], dtype=np.int64),
            {"long_name": f"seeds with a finite {q}", "units": "1"},
        )
    ds.attrs.update(
        {
            "title": "per-configuration summary over seeds",
            "Conventions": "CF-1.8",
            "last_k": int(k),
            "last_k_requested": int(last_k),
            "ci_method": ci,
            "ci_level": float(level),
            "ci_formula": ci_text,
            "std_ddof": 1,
            "missing": "NaN: the run has no such data (a vector method has no low-rank update; alignment or gradient "
            "tracking was off) or the configuration has fewer than 2 seeds with a value (std, interval)",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    return ds


def summarize_sweep(
    sweep_dir: str | os.PathLike, last_k: int = LAST_K, level: float = 0.95, ci: str = "t"
) -> xr.Dataset:
    """`summarize_runs` of the finished runs below a sweep folder (attrs say which were skipped)."""
    run_dirs, skipped = find_sweep_runs(sweep_dir)
    ds = summarize_runs(run_dirs, last_k=last_k, level=level, ci=ci)
    ds.attrs["sweep_dir"] = str(Path(sweep_dir).expanduser().resolve())
    ds.attrs["skipped_runs"] = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "none"
    return ds


def summary_table(ds: xr.Dataset):
    """The rows of ``summary.csv``: one per configuration (pandas DataFrame indexed by ``config``).

    Columns: the ``config`` coordinates (method, r, learning_rate, ...), ``n_seeds``, ``seeds``
    (space separated), then ``<quantity>_mean``, ``_std``, ``_ci_low``, ``_ci_high`` per quantity.
    """
    import pandas as pd

    coords = [c for c in ds.coords if c not in ("config", "seed") and ds[c].dims == ("config",)]
    rows = []
    for i, label in enumerate(ds["config"].values):
        row = {"config": str(label)}
        row.update(
            {c: ds[c].values[i].item() if hasattr(ds[c].values[i], "item") else ds[c].values[i] for c in coords}
        )
        row["n_seeds"] = int(ds["n_seeds"].values[i])
        row["seeds"] = " ".join(str(int(s)) for s, name in zip(ds["seed"].values, ds["run"].values[i]) if name)
        for q in QUANTITIES:
            for stat in STATS:
                row[f"{q}_{stat}"] = float(ds[f"{q}_{stat}"].values[i])
        rows.append(row)
    return pd.DataFrame(rows).set_index("config")


def write_summary(
    sweep_dir: str | os.PathLike, last_k: int = LAST_K, level: float = 0.95, ci: str = "t"
) -> tuple[Path, Path]:
    """Write ``summary.csv`` and ``summary.nc`` into ``sweep_dir`` from its finished runs; returns their paths.

    Both files are replaced atomically (written beside, then renamed).
    """
    folder = Path(sweep_dir).expanduser()
    ds = summarize_sweep(folder, last_k=last_k, level=level, ci=ci)
    csv_path, nc_path = folder / SUMMARY_CSV, folder / SUMMARY_NC
    with atomic_path(csv_path) as tmp_csv, atomic_path(nc_path) as tmp_nc:
        summary_table(ds).to_csv(tmp_csv)
        ds.to_netcdf(tmp_nc, engine="netcdf4")
    return csv_path, nc_path


# ====================================================================================== sweep / CLI glue
def _headline(ds: xr.Dataset, quantity: str = "final_equation_reward") -> list[str]:
    """One line per configuration: ``n`` seeds, mean and interval of ``quantity``."""
    width = max(len(str(c)) for c in ds["config"].values)
    lines = []
    for i, label in enumerate(ds["config"].values):
        mean, low, high = (float(ds[f"{quantity}_{s}"].values[i]) for s in ("mean", "ci_low", "ci_high"))
        interval = f"[{low:.3f}, {high:.3f}]" if np.isfinite(low) else "[no interval: < 2 seeds]"
        lines.append(f"  {str(label):<{width}}  n={int(ds['n_seeds'].values[i])}  {mean:.3f} {interval}")
    return lines


def summary_after_sweep(sweep_dir: str | os.PathLike, echo=print) -> str | None:
    """Write the summary of a sweep that just ran; return None, or why it could not be written (one line)."""
    try:
        csv_path, nc_path = write_summary(sweep_dir)
    except (RunError, ValueError, OSError) as err:
        reason = " ".join(str(err).split())[:300]
        echo(f"FAILED summary: {reason}")
        return reason
    echo(f"wrote {csv_path} and {nc_path} (rebuild: perlwb sweep --summary {sweep_dir})")
    return None


def summary_main(sweep_dir: str | None, sweep_file: str | None = None) -> int:
    """``perlwb sweep --summary SWEEP_DIR``: write the summary from finished runs; exit code 0, or 2 with one line."""
    from perl.cli_support import fail as _fail

    if sweep_dir is None:
        return _fail("perlwb sweep needs a sweep file (perlwb sweep SWEEP.yaml) or --summary SWEEP_DIR.")
    if sweep_file is not None:
        return _fail(
            f"give either a sweep file ({sweep_file}) to train, or --summary {sweep_dir} to summarise, not both."
        )
    try:
        csv_path, nc_path = write_summary(sweep_dir)
        with xr.open_dataset(nc_path, engine="netcdf4") as ds:
            ds = ds.load()
    except (RunError, ValueError, OSError) as err:
        return _fail(str(err))
    print(
        f"perlwb sweep: wrote {csv_path} and {nc_path}: {ds.sizes['config']} configurations, "
        f"{int(ds['n_seeds'].sum())} runs; final correct-equation reward (last {ds.attrs['last_k']} logged steps), "
        f"mean [{ds.attrs['ci_level']:.0%} CI, {ds.attrs['ci_method']}] over seeds:"
    )
    print("\n".join(_headline(ds)))
    return 0


def markdown_table(
    ds: xr.Dataset,
    quantities: Sequence[str] = (
        "final_equation_reward",
        "equation_reward_gain",
        "update_rank_fraction",
        "energy_principal",
        "energy_minor",
        "grad_ab_ratio",
    ),
    digits: int = 3,
) -> str:
    """The summary as a Markdown table: one row per configuration, ``mean [low, high]`` per quantity.

    Usage:
        print(markdown_table(xr.open_dataset("sweeps/perl_questions_nano/summary.nc")))
    """

    def cell(i: int, q: str) -> str:
        mean, low, high = (float(ds[f"{q}_{s}"].values[i]) for s in ("mean", "ci_low", "ci_high"))
        if not np.isfinite(mean):
            return "–"
        if not np.isfinite(low):
            return f"{mean:.{digits}f}"
        return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"

    head = ["method", "n", *quantities]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i in range(ds.sizes["config"]):
        lines.append(
            "| "
            + " | ".join(
                [str(ds["method"].values[i]), str(int(ds["n_seeds"].values[i])), *(cell(i, q) for q in quantities)]
            )
            + " |"
        )
    return "\n".join(lines)
