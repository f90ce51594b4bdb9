"""perl.run: one run folder as Datasets, many runs along a `run` dimension, errors at the edge.

Runs are made by `perl.synthetic`: a tiny random model tracked by the real trackers, so the
stores are a real run's. Expected values are read back independently (netCDF4 directly, json for
metrics.jsonl).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import netCDF4
import numpy as np
import pytest

import perl
from perl.run import MissingDataWarning, RunError, metric_name, open_run, open_runs
from perl.synthetic import synthetic_run


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return synthetic_run(
        tmp_path_factory.mktemp("runs") / "lora",
        steps=6,
        layers=3,
        modules=("q_proj", "v_proj"),
        r=4,
        seed=3,
        partial=("k_proj",),
        pngs=False,
    )


def _nc(path, name):
    if Path(path).is_dir():  # a live store: its steps_*.nc files in step order (none overlap in a fresh store)
        parts = [_nc(f, name) for f in sorted(Path(path).glob("steps_*.nc"))]
        return np.concatenate([values for values, _ in parts]), parts[0][1]
    with netCDF4.Dataset(path) as nc:
        nc.set_auto_mask(False)
        return np.asarray(nc.variables[name][:]), [
            str(v) for v in nc.variables["module"][:]
        ] if "module" in nc.variables else None


def test_open_run_reads_config_stores_and_metrics(lora_dir):
    run = open_run(lora_dir)
    assert run.path == Path(lora_dir)
    assert run.config["peft"]["type"] == "lora" and run.config["peft"]["r"] == 4 and run.config["common"]["seed"] == 3
    assert (run.method, run.r, run.seed, run.label) == ("lora", 4, 3, "lora r=4 seed=3")

    sp = run.spectral
    assert dict(sp.sizes) == {"step": 7, "layer": 3, "module": 3, "sv": 4, "sv_update": 8}
    assert list(sp["module"].values) == ["q_proj", "k_proj", "v_proj"]
    raw, modules = _nc(lora_dir / "spectral_history_final.nc", "singular_values")
    np.testing.assert_array_equal(sp["singular_values"].values, raw)
    # where a module is not adapted (k_proj outside block 0) it is NaN, never 0
    assert np.isnan(sp["effective_rank"].sel(module="k_proj", layer=[1, 2]).values).all()
    assert np.isfinite(sp["effective_rank"].sel(module="k_proj", layer=0).values).all()
    assert sp["effective_rank"].attrs["long_name"]

    gr = run.gradients
    raw, _ = _nc(lora_dir / "gradient_flow_final.nc", "grad_norm")
    np.testing.assert_array_equal(gr["grad_norm"].values, raw)
    assert list(gr["component"].values) == ["A", "B"]


def test_metrics_follow_metrics_jsonl(lora_dir):
    records = [json.loads(line) for line in (lora_dir / "metrics.jsonl").read_text().splitlines()]
    run = open_run(lora_dir)
    m = run.metrics
    assert list(m["step"].values) == sorted({r["step"] for r in records})
    expected = {}  # a step logged twice (the final summary) keeps the last value of each key
    for rec in records:
        expected.update({(rec["step"], k): v for k, v in rec.items() if k != "step"})
    for (step, key), value in expected.items():
        assert m[metric_name(key)].sel(step=step).item() == pytest.approx(value), (key, step)
    # TRL keys with "/" stay readable, the original key is kept in long_name
    assert m["rewards.format_reward.mean"].attrs["long_name"] == "rewards/format_reward/mean"
    assert m["completions.mean_length"].attrs["units"] == "tokens"
    # keys logged at one step only (the final summary) are NaN elsewhere
    assert np.isnan(m["train_runtime"].values[:-1]).all() and np.isfinite(m["train_runtime"].values[-1])


def test_newer_live_store_wins_over_final(lora_dir):
    run = open_run(lora_dir)
    assert run.source("spectral").name == "spectral_history_final.nc"
    live = lora_dir / "spectral_logs" / "spectral_history.nc"
    final = lora_dir / "spectral_history_final.nc"
    st = final.stat()
    os.utime(live, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert open_run(lora_dir).source("spectral") == live
    finally:
        os.utime(live, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    assert open_run(lora_dir).source("spectral") == final


def test_refresh_sees_new_steps_of_a_run_still_training(tmp_path):
    d = synthetic_run(tmp_path / "live", steps=5, layers=2, modules=("q_proj",), r=4, final=False, pngs=False)
    run = open_run(d)
    assert run.source("spectral").name == "spectral_history.nc"
    assert run.spectral.sizes["step"] == 6 and run.metrics.sizes["step"] == 5
    synthetic_run(d, steps=8, layers=2, modules=("q_proj",), r=4, final=False, pngs=False)  # "training" goes on
    assert run.spectral.sizes["step"] == 6, "data stays as read until refresh()"
    run.refresh()
    assert run.spectral.sizes["step"] == 9 and run.gradients.sizes["step"] == 8
    raw, _ = _nc(d / "spectral_logs" / "spectral_history.nc", "singular_values")
    np.testing.assert_array_equal(run.spectral["singular_values"].values, raw)
    # a line being written (no newline yet) is skipped, complete lines are read
    with open(d / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 99, "reward": 1.5}) + "\n" + '{"step": 100, "rew')
    run.refresh()
    assert run.metrics["reward"].sel(step=99).item() == 1.5 and 100 not in run.metrics["step"].values


def test_stores_are_not_held_open(lora_dir, tmp_path):
    d = synthetic_run(tmp_path / "r", steps=3, layers=2, modules=("q_proj",), r=2, pngs=False)
    run = open_run(d)
    assert run.spectral is not None and run.gradients is not None  # read, then closed
    fds = os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []
    targets = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in fds if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not any(t.endswith(".nc") and t.startswith(str(d)) for t in targets)
    # a writer replaces the file atomically (as RunStore does); the reader sees the new one on refresh
    tmp = d / ".spectral_history_final.nc.tmp"
    tmp.write_bytes((lora_dir / "spectral_history_final.nc").read_bytes())
    os.replace(tmp, d / "spectral_history_final.nc")
    assert run.spectral.sizes["layer"] == 2
    run.refresh()
    assert run.spectral.sizes["layer"] == 3


def test_open_runs_labels_and_outer_join(tmp_path):
    a = synthetic_run(tmp_path / "a", steps=4, layers=2, modules=("q_proj", "v_proj"), r=4, seed=0, pngs=False)
    b = synthetic_run(
        tmp_path / "b", steps=6, layers=3, modules=("q_proj", "o_proj"), r=4, seed=1, method="dora", pngs=False
    )
    runs = open_runs([a, b])
    sp = runs.spectral
    assert list(sp["run"].values) == ["lora r=4 seed=0", "dora r=4 seed=1"]
    assert list(sp["method"].values) == ["lora", "dora"] and list(sp["seed"].values) == [0, 1]
    assert list(sp["r"].values) == [4, 4] and list(sp["run_name"].values) == ["a", "b"]
    assert list(sp["module"].values) == ["q_proj", "v_proj", "o_proj"]  # first-seen order, not sorted
    assert list(sp["layer"].values) == [0, 1, 2] and sp.sizes["step"] == 7
    assert hasattr(sp["singular_values"].data, "dask"), "combined lazily"
    er = sp["effective_rank"]
    own_a, own_b = open_run(a).spectral["effective_rank"], open_run(b).spectral["effective_rank"]
    np.testing.assert_allclose(
        er.sel(run="lora r=4 seed=0", step=own_a.step, layer=own_a.layer, module=own_a.module).values, own_a.values
    )
    np.testing.assert_allclose(
        er.sel(run="dora r=4 seed=1", step=own_b.step, layer=own_b.layer, module=own_b.module).values, own_b.values
    )
    # what a run does not have is NaN: run a has no layer 2, no o_proj, no steps past 4, no DoRA variables
    assert np.isnan(er.sel(run="lora r=4 seed=0", layer=2).values).all()
    assert np.isnan(er.sel(run="lora r=4 seed=0", module="o_proj").values).all()
    assert np.isnan(er.sel(run="lora r=4 seed=0", step=5).values).all()
    assert np.isnan(sp["magnitude_norm"].sel(run="lora r=4 seed=0").values).all()
    assert np.isfinite(sp["magnitude_norm"].sel(run="dora r=4 seed=1", module="q_proj").values).all()
    m = runs.metrics
    np.testing.assert_allclose(m["reward"].sel(run="dora r=4 seed=1").values, open_run(b).metrics["reward"].values)
    # a glob opens the same runs; identical labels are made unique with the folder name
    synthetic_run(tmp_path / "c", steps=4, layers=2, modules=("q_proj",), r=4, seed=0, pngs=False)
    (tmp_path / "not_a_run").mkdir()
    globbed = open_runs(str(tmp_path / "*"))
    assert globbed.labels == ["lora r=4 seed=0 (a)", "dora r=4 seed=1", "lora r=4 seed=0 (c)"]
    assert globbed.gradients.sizes["run"] == 3


def test_errors_are_one_clear_line(tmp_path, lora_dir):
    with pytest.raises(RunError, match="does not exist"):
        open_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="not a run folder"):
        open_run(tmp_path / "empty")
    with pytest.raises(RunError, match="No run folders match"):
        open_runs(str(tmp_path / "nothing*"))

    bad = synthetic_run(tmp_path / "bad", steps=3, layers=2, modules=("q_proj",), r=2, pngs=False)
    (bad / "spectral_history_final.nc").write_bytes(b"this is not netCDF" * 100)
    run = open_run(bad)
    with pytest.raises(RunError) as err:
        _ = run.spectral
    assert "\n" not in str(err.value) and "spectral_history_final.nc" in str(err.value)
    assert run.gradients is not None  # the other store still reads

    (bad / "config.yaml").write_text("peft: [unclosed")
    with pytest.raises(RunError, match="YAML"):
        open_run(bad)
    (bad / "config.yaml").write_text("- a list\n- not a mapping\n")
    with pytest.raises(RunError, match="mapping"):
        open_run(bad)

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\nnot json\n{"step": 2, "reward": 0.7}\n')
    run = open_run(partial)
    with pytest.raises(RunError, match="line 2"):
        _ = run.metrics
    with pytest.warns(MissingDataWarning, match="enable_spectral_tracking"):
        assert run.spectral is None


def test_import_perl_is_light_and_exports_open_run():
    code = (
        "import sys, perl; f = perl.open_run; g = perl.open_runs; "
        "assert 'torch' not in sys.modules, 'torch imported'; print(f.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "perl.run"
    assert perl.open_run is open_run


def test_final_reward_is_one_definition_everywhere(tmp_path):
    """The sweep's console line, run_summary and alignment_table give the same number (last 10 finite rewards)."""
    from perl.notebook_utils import run_summary
    from perl.run import final_reward
    from perl.sweep import _final_reward
    from perl.viz.alignment import alignment_table

    d = tmp_path / "run"
    d.mkdir()
    rewards = [0.1 * s for s in range(1, 15)]
    lines = [{"step": s, "reward": r} for s, r in enumerate(rewards, start=1)]
    lines.insert(5, {"step": 5, "loss": 0.3})  # a log without reward
    lines.append({"step": 14, "train_runtime": 9.0})  # the Trainer's closing summary
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    expected = float(np.mean(rewards[-10:]))
    assert final_reward(open_run(d).metrics) == pytest.approx(expected)
    assert _final_reward(d) == pytest.approx(expected)
    runs = open_runs([d])
    assert run_summary(runs).iloc[0]["final_reward"] == pytest.approx(expected)
    assert alignment_table(runs, None).iloc[0]["final_reward"] == pytest.approx(expected)


def test_open_runs_of_one_layout_stacks_final_files_lazily_with_the_same_values(tmp_path):
    import xarray as xr

    dirs = [
        synthetic_run(
            tmp_path / f"s{seed}", steps=5, layers=2, modules=("q_proj", "v_proj"), r=4, seed=seed, pngs=False
        )
        for seed in range(3)
    ]
    sp = open_runs(dirs).spectral
    assert hasattr(sp["singular_values"].data, "dask") and list(sp["seed"].values) == [0, 1, 2]
    for i, d in enumerate(dirs):
        one = open_run(d).spectral
        assert open_run(d).source("spectral").name == "spectral_history_final.nc"  # the stacked path
        for name in one.data_vars:
            xr.testing.assert_equal(
                sp[name].isel(run=i, drop=True).reset_coords(drop=True), one[name].reset_coords(drop=True)
            )


def test_a_synthetic_run_has_the_schema_of_a_real_run(tracked_run, lora_dir):
    """What the tests on synthetic runs say holds for real runs: the same variables, dimensions, dtypes
    and units (read with netCDF4, not through perl)."""

    def schema(path):
        with netCDF4.Dataset(path) as nc:
            return {
                name: (v.dimensions, str(v.dtype), getattr(v, "units", None), getattr(v, "long_name", None))
                for name, v in nc.variables.items()
            }

    for final in ("spectral_history_final.nc", "gradient_flow_final.nc"):
        real, synthetic = schema(tracked_run / final), schema(lora_dir / final)
        assert real == synthetic, final
