"""The sweep summary (summary.csv / summary.nc) against values computed here from the runs' own
files, and notebook 06 executed on the same sweep.

One tiny real sweep per module: LoRA and PiSSA at r=4 on the embedded countdown-nano, two seeds
each (four runs of four GRPO steps, all trackers at every step), trained by `perl sweep` with two
runs at a time; the sweep writes the summary and executes notebook 06 into its folder. Expected
numbers are computed from metrics.jsonl (JSON lines) and the final netCDF stores opened with
xarray directly, and the intervals with the t quantile from a table, not with perl.stats.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pytest
import xarray as xr
import yaml

from perl import sweep as sw

T_975_DF1 = 12.706204736  # Student t, 97.5% quantile, 1 degree of freedom (two seeds)
METHODS, SEEDS = ("lora", "pissa"), (0, 1)
STEPS = 4
SWEEP = {
    "sweep_dir": "sweeps/two_seeds",
    "model": {"model_name_or_path": "countdown-nano"},
    # note: 48 tokens hold the nano model's whole answer (about 42), so rewards are earned
    "training": {
        "max_steps": STEPS,
        "num_generations": 4,
        "per_device_train_batch_size": 8,
        "max_completion_length": 48,
        "logging_steps": 1,
    },
    "dataset": {"example_numbers": 32, "test_size": 4},
    "tracker": {
        "enable_spectral_tracking": True,
        "enable_gradient_tracking": True,
        "enable_alignment_tracking": True,
        "spectral_log_frequency": 1,
        "gradient_log_frequency": 1,
        "alignment_log_frequency": 1,
        "intruder_log_frequency": 2,
    },
    "grid": {"methods": list(METHODS), "ranks": [4], "seeds": list(SEEDS), "learning_rates": [1.0e-3]},
    "notebooks": ["04_compare_runs", "05_spectral_alignment", "06_perl_questions"],
}


@pytest.fixture(scope="module")
def two_seed_sweep(tmp_path_factory):
    """The sweep above, trained once: returns its folder."""
    cwd = tmp_path_factory.mktemp("two_seeds")
    (cwd / "sweep.yaml").write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        code = sw.main([str(cwd / "sweep.yaml"), "--parallel", "2"])
    assert code == 0
    return cwd / "sweeps" / "two_seeds"


def read_nc(path: Path) -> xr.Dataset:
    with xr.open_dataset(path, engine="netcdf4") as ds:
        return ds.load()


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {row["config"]: row for row in csv.DictReader(fh)}


def equation_rewards(run: Path) -> list[float]:
    values = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "rewards/equation_reward/mean" in record:
            values.append(float(record["rewards/equation_reward/mean"]))
    return values


def last_finite_cell_mean(da: xr.DataArray) -> float:
    for step in reversed(da["step"].values):
        row = da.sel(step=step).values
        if np.isfinite(row).any():
            return float(np.mean(row[np.isfinite(row)]))
    return math.nan


def by_hand(run: Path, k: int) -> dict[str, float]:
    """The per-run quantities of the summary, from the run's files."""
    eq = equation_rewards(run)
    out = {"final_equation_reward": np.mean(eq[-k:]), "equation_reward_gain": np.mean(eq[-k:]) - np.mean(eq[:k])}
    sp = read_nc(run / "spectral_history_final.nc")
    r = yaml.safe_load((run / "config.yaml").read_text())["peft"]["r"]
    out["update_effective_rank"] = last_finite_cell_mean(sp["update_effective_rank"])
    out["update_rank_fraction"] = out["update_effective_rank"] / r
    al = read_nc(run / "alignment_final.nc")
    out["energy_principal"] = last_finite_cell_mean(al["energy_fraction_top_left"])
    out["energy_minor"] = last_finite_cell_mean(al["energy_fraction_bottom_left"])
    out["intruders"] = last_finite_cell_mean(al["intruder_dimensions"])
    gr = read_nc(run / "gradient_flow_final.nc")["grad_norm"]
    a, b = gr.sel(component="A").values, gr.sel(component="B").values
    both = np.isfinite(a) & np.isfinite(b)
    out["grad_ab_ratio"] = a[both].mean() / b[both].mean()
    return out


def test_summary_csv_matches_the_runs_stores(two_seed_sweep):
    sweep_dir = two_seed_sweep
    summary = read_nc(sweep_dir / "summary.nc")
    # K: at most LAST_K, and no more than half the logged steps so the gain's windows do not overlap
    assert summary.attrs["last_k"] == STEPS // 2
    assert summary.attrs["ci_method"] == "t" and summary.attrs["ci_level"] == 0.95
    k = STEPS // 2
    rows = read_csv(sweep_dir / "summary.csv")
    assert sorted(rows) == ["lora-r4-lr1e-3", "pissa-r4-lr1e-3"]
    for method in METHODS:
        row = rows[f"{method}-r4-lr1e-3"]
        assert (row["method"], int(row["r"]), float(row["learning_rate"])) == (method, 4, 1e-3)
        assert (int(row["n_seeds"]), row["seeds"]) == (2, "0 1")
        runs = [by_hand(sweep_dir / f"{method}-r4-s{s}-lr1e-3", k) for s in SEEDS]
        for quantity in runs[0]:
            values = np.array([r[quantity] for r in runs])
            mean, std = values.mean(), values.std(ddof=1)
            half = T_975_DF1 * std / math.sqrt(2)
            for stat, expected in (("mean", mean), ("std", std), ("ci_low", mean - half), ("ci_high", mean + half)):
                got = float(row[f"{quantity}_{stat}"])
                assert got == pytest.approx(expected, rel=1e-6, abs=1e-9), f"{method} {quantity}_{stat}"
    # the per-seed values are in the netCDF too, and the reward did something (not all zeros)
    assert np.isfinite(summary["final_equation_reward"].values).all()
    assert np.nanmax(summary["grad_ab_ratio"].values) > 0
    assert (
        summary["energy_principal"].sel(config="pissa-r4-lr1e-3").mean()
        > summary["energy_principal"].sel(config="lora-r4-lr1e-3").mean()
    )
    for name in ("final_equation_reward_ci_low", "grad_ab_ratio"):
        assert summary[name].attrs["long_name"]


def test_summary_rebuilds_without_training_and_skips_unfinished_runs(two_seed_sweep, tmp_path, capsys):
    before = (two_seed_sweep / "summary.csv").read_text()
    copy = tmp_path / "copy"
    shutil.copytree(two_seed_sweep, copy, symlinks=True)
    (copy / "summary.csv").unlink()
    (copy / "summary.nc").unlink()
    # a failed run and a run still training are not seeds of anything
    for name, marker in (("lora-r4-s2-lr1e-3", {"status": "failed"}), ("pissa-r4-s2-lr1e-3", None)):
        run = copy / name
        run.mkdir()
        shutil.copy(copy / "lora-r4-s0-lr1e-3" / "config.yaml", run / "config.yaml")
        if marker:
            (run / sw.MARKER).write_text(json.dumps(marker))
    code = sw.main(["--summary", str(copy)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (copy / "summary.csv").read_text() == before
    assert re.search(r"lora-r4-lr1e-3\s+n=2\s+\d\.\d{3} \[-?\d\.\d{3}, \d\.\d{3}\]", out)
    skipped = read_nc(copy / "summary.nc").attrs["skipped_runs"]
    assert "lora-r4-s2-lr1e-3: sweep_run.json says 'failed'" in skipped and "pissa-r4-s2-lr1e-3" in skipped

    assert sw.main(["--summary", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sw.main(["--summary", str(copy), str(copy / "sweep.yaml")]) == 2
    assert "not both" in capsys.readouterr().err


def test_compare_configs_reports_the_difference_of_means_and_a_named_test(two_seed_sweep):
    from perl.sweep_summary import compare_configs

    summary = read_nc(two_seed_sweep / "summary.nc")
    table = compare_configs(summary, "energy_principal")  # against LoRA by default
    assert list(table.index) == ["pissa-r4-lr1e-3"] and table.attrs["reference"] == "lora-r4-lr1e-3"
    assert table.attrs["test"].startswith("Welch")
    pissa, lora = (summary["energy_principal"].sel(config=c).values for c in ("pissa-r4-lr1e-3", "lora-r4-lr1e-3"))
    assert table.loc["pissa-r4-lr1e-3", "diff"] == pytest.approx(pissa.mean() - lora.mean())
    perm = compare_configs(summary, "energy_principal", test="permutation")
    # with 2 + 2 seeds the exact permutation test's smallest p-value is 2/6: never below 0.05
    assert perm.loc["pissa-r4-lr1e-3", "min_pvalue"] == pytest.approx(1 / 3)
    assert perm.loc["pissa-r4-lr1e-3", "verdict"] == "no evidence"
    with pytest.raises(KeyError, match="not in the summary"):
        compare_configs(summary, "accuracy")


def test_markdown_table_shows_mean_and_interval_per_configuration(two_seed_sweep):
    from perl.sweep_summary import markdown_table

    rows = read_csv(two_seed_sweep / "summary.csv")
    lines = markdown_table(read_nc(two_seed_sweep / "summary.nc"), ["energy_principal"]).splitlines()
    assert lines[0] == "| method | n | energy_principal |"
    for method in METHODS:
        row = rows[f"{method}-r4-lr1e-3"]
        cell = " [".join(
            [
                f"{float(row['energy_principal_mean']):.3f}",
                f"{float(row['energy_principal_ci_low']):.3f}, {float(row['energy_principal_ci_high']):.3f}]",
            ]
        )
        assert f"| {method} | 2 | {cell} |" in lines


def _outputs(nb) -> list[str]:
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                texts.append(out.text)
            elif out.output_type == "error":
                raise AssertionError(f"notebook cell failed: {out.ename}: {out.evalue}")
            else:
                data = out.get("data", {})
                texts.append(data.get("text/markdown") or data.get("text/plain") or "")
    return texts


def test_notebook06_answers_each_question_with_the_summary_numbers(two_seed_sweep):
    nb = nbformat.read(two_seed_sweep / "06_perl_questions.ipynb", as_version=4)
    texts = _outputs(nb)
    injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert "sweep_dir = '.'" in injected.source.replace('"', "'")
    rows = read_csv(two_seed_sweep / "summary.csv")
    sentences = {t[:3]: t for t in texts if re.match(r"\([abcd]\) ", t)}
    assert sorted(sentences) == ["(a)", "(b)", "(c)", "(d)"]

    # (a): PiSSA's gain and LoRA's, as the summary has them, and a named test
    gain = {m: rows[f"{m}-r4-lr1e-3"] for m in METHODS}
    for m in METHODS:
        interval = (
            f"{float(gain[m]['equation_reward_gain_mean']):.3f} [{float(gain[m]['equation_reward_gain_ci_low']):.3f}, "
            f"{float(gain[m]['equation_reward_gain_ci_high']):.3f}]"
        )
        if float(gain[m]["equation_reward_gain_std"]) > 0:
            assert interval in sentences["(a)"]
    assert "Welch p = " in sentences["(a)"] and "Holm" in sentences["(a)"]
    assert f"{float(gain['pissa']['energy_principal_mean']):.2f} [" in sentences["(a)"]

    # (b): the most and least rank-using configurations, from the CSV
    frac = {c: float(r["update_rank_fraction_mean"]) for c, r in rows.items()}
    lo, hi = min(frac, key=frac.get), max(frac, key=frac.get)
    assert f"({lo})" in sentences["(b)"] and f"({hi})" in sentences["(b)"]

    # (c): how many intervals of the A/B ratio lie below 1, from the CSV
    below = sum(float(r["grad_ab_ratio_ci_high"]) < 1 for r in rows.values())
    assert f"for {below} of 2 configurations" in sentences["(c)"]

    # (d): the per-layer table is the mean over seeds of each seed's mean over modules of the update norm
    layer_table = next(t for t in texts if t.startswith("layer "))
    lora_row = next(line for line in layer_table.splitlines() if line.startswith("lora-r4-lr1e-3"))
    per_seed = []
    for s in SEEDS:
        sp = read_nc(two_seed_sweep / f"lora-r4-s{s}-lr1e-3" / "spectral_history_final.nc")
        per_seed.append(
            np.nanmean(sp["update_frobenius_norm"].isel(step=-1).transpose("layer", "module").values, axis=1)
        )
    shown = np.array([float(v) for v in lora_row.split()[1:]])
    np.testing.assert_allclose(shown, np.mean(per_seed, axis=0), rtol=1e-4, atol=1e-6)


def test_shipped_perl_questions_sweep_covers_every_method_with_three_seeds():
    from perl.config import PEFT_TYPES

    shipped = sw.load_sweep(Path(__file__).resolve().parent.parent / "configs" / "sweeps" / "perl_questions_nano.yaml")
    points = {(r.config.peft.type, r.config.peft.r, r.config.common.seed) for r in shipped.runs}
    methods = [m for m in PEFT_TYPES if m != "full"]
    assert points == {(m, 8, s) for m in methods for s in (0, 1, 2)}
    tracker = shipped.runs[0].config.tracker
    assert tracker.enable_spectral_tracking and tracker.enable_gradient_tracking and tracker.enable_alignment_tracking
    assert shipped.runs[0].config.model.model_name_or_path == "countdown-nano"
    assert "06_perl_questions" in shipped.notebooks


def test_notebooks_04_and_05_draw_error_bars_and_test_against_lora(two_seed_sweep):
    rows = read_csv(two_seed_sweep / "summary.csv")
    for name, quantity in (
        ("04_compare_runs", "final_equation_reward"),
        ("05_spectral_alignment", "energy_principal"),
    ):
        nb = nbformat.read(two_seed_sweep / f"{name}.ipynb", as_version=4)
        texts = _outputs(nb)  # raises on a failed cell
        plots = "\n".join(texts)
        assert ":ErrorBars" in plots, f"{name} draws no error bars"
        if name == "04_compare_runs":
            assert ":Area" in plots  # the band over steps
            assert any(
                t.startswith("Welch's unequal-variance t-test over seeds (two-sided) against lora-r4-lr1e-3")
                for t in texts
            )
        table = next(t for t in texts if t.lstrip().startswith("method") and "verdict" in t)
        row = next(line for line in table.splitlines() if line.startswith("pissa-r4-lr1e-3"))
        diff = float(row.split()[4])
        expected = float(rows["pissa-r4-lr1e-3"][f"{quantity}_mean"]) - float(
            rows["lora-r4-lr1e-3"][f"{quantity}_mean"]
        )
        assert diff == pytest.approx(expected, abs=1e-4)  # as pandas prints it
