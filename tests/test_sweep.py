"""`perlwb sweep`: a grid of real trainings in subprocesses, skip-on-restart, failures, bad sweep files,
and notebook 05 executed on a sweep with a known answer.

The end-to-end sweep is the shipped ``configs/sweeps/smoke_tiny.yaml``: PiSSA and MiLoRA on
"tiny-random", two optimizer steps. That model earns no reward, so every gradient is zero and the
only change is AdamW's weight decay shrinking B0 A0, which lies in W0's top-r (PiSSA) or bottom-r
(MiLoRA) singular subspace. So the update since init lies entirely in the principal (PiSSA) or
minor (MiLoRA) subspace: notebook 05 must show 1 and 0, whatever the code under test computes.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import xarray as xr
import yaml

from perl import sweep as sw
from perl import sweep_spec
from perl.config import PEFT_TYPES

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "sweeps" / "smoke_tiny.yaml"
NANO = REPO / "configs" / "sweeps" / "methods_nano.yaml"
NOTEBOOK05 = REPO / "notebooks" / "05_spectral_alignment.ipynb"
SMOKE_RUNS = ["pissa-r4-s0-lr1e-2", "milora-r4-s0-lr1e-2"]  # seeds outermost, methods innermost
TINY = {  # a two-step run on tiny-random, for the sweep files the tests write
    "model": {"model_name_or_path": "tiny-random"},
    "training": {"max_steps": 2, "num_generations": 2, "per_device_train_batch_size": 2, "max_completion_length": 8},
    "dataset": {"example_numbers": 8, "test_size": 2},
}


def sweep_cli(capsys, *args) -> tuple[int, str, str]:
    code = sw.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def write_sweep(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_nc(path: Path) -> xr.Dataset:
    with xr.open_dataset(path, engine="netcdf4") as ds:
        return ds.load()


def html_table(nb, header: str) -> dict[str, dict[str, str]]:
    """The DataFrame an executed cell displayed whose columns include ``header``: {row label: {column: text}}."""
    from bs4 import BeautifulSoup

    for cell in nb.cells:
        for out in cell.get("outputs", []):
            html = out.get("data", {}).get("text/html")
            if not html or "<table" not in html:
                continue
            table = BeautifulSoup(html, "html.parser").find("table")
            columns = [th.get_text(strip=True) for th in table.find("thead").find("tr").find_all("th")][1:]
            if header not in columns:
                continue
            rows = {}
            for tr in table.find("tbody").find_all("tr"):
                label = tr.find("th").get_text(strip=True)
                rows[label] = dict(zip(columns, (td.get_text(strip=True) for td in tr.find_all("td"))))
            return rows
    raise AssertionError(f"no displayed table with a column {header!r}")


def number(text: str) -> float:
    return float("nan") if text in ("", "NaN", "nan", "None") else float(text)


# ------------------------------------------------------------------------------ the shipped sweep, end to end
@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    """The shipped smoke sweep run once (both runs at once), notebooks included: (sweep dir, exit code, stdout)."""
    cwd = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)  # note: sweep_dir is relative to the working directory, as output_dir is
        code = sw.main([str(SMOKE), "--parallel", "2"])
    return cwd / "sweeps" / "smoke_tiny", code


def test_smoke_sweep_trains_every_grid_point_into_its_own_folder(smoke_sweep):
    sweep_dir, code = smoke_sweep
    assert code == 0
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == sorted(SMOKE_RUNS)
    for name, method in zip(SMOKE_RUNS, ("pissa", "milora")):
        run = sweep_dir / name
        config = yaml.safe_load((run / "config.yaml").read_text())  # written by the training itself
        assert (config["peft"]["type"], config["peft"]["r"], config["common"]["seed"]) == (method, 4, 0)
        assert config["training"]["learning_rate"] == 1e-2 and config["training"]["weight_decay"] == 0.1
        assert Path(config["training"]["output_dir"]) == run.resolve()
        assert config["tracker"]["enable_alignment_tracking"] is True
        assert (run / "adapter_model.safetensors").is_file()
        assert "perlwb: done" in (run / "train.log").read_text()
        marker = json.loads((run / sw.MARKER).read_text())
        assert marker["status"] == "finished" and marker["returncode"] == 0
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == 2
    assert (sweep_dir / "sweep.yaml").read_text() == SMOKE.read_text()


def test_notebook05_puts_pissa_in_the_principal_and_milora_in_the_minor_subspace(smoke_sweep):
    sweep_dir, _ = smoke_sweep
    nb = nbformat.read(sweep_dir / "05_spectral_alignment.ipynb", as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert "run_dirs = " + repr(SMOKE_RUNS) in injected.source.replace('"', "'")

    table = html_table(nb, "principal_left")
    assert list(table) == ["pissa r=4 seed=0", "milora r=4 seed=0"]  # the sweep's order
    planted = {
        "pissa r=4 seed=0": ("principal_left", "minor_left"),
        "milora r=4 seed=0": ("minor_left", "principal_left"),
    }
    for label, (inside, outside) in planted.items():
        row = table[label]
        assert number(row[inside]) == pytest.approx(1.0, abs=1e-4), (label, row)
        assert number(row[outside]) == pytest.approx(0.0, abs=1e-4), (label, row)
        assert number(row["step"]) == 2
        # and exactly what the run's store holds: the mean over its (layer, module) cells at step 2
        store = read_nc(sweep_dir / f"{label.split()[0]}-r4-s0-lr1e-2" / "alignment_final.nc")
        for column, variable in (
            ("principal_left", "energy_fraction_top_left"),
            ("minor_right", "energy_fraction_bottom_right"),
            ("update_norm", "update_frobenius_norm"),
        ):
            expected = float(np.nanmean(store[variable].sel(step=2).values))
            assert number(row[column]) == pytest.approx(expected, abs=1e-6), (label, column)  # shown to 6 decimals
        chance = store["chance_energy_fraction_left"].values  # k / m per module: 2r over the output size
        assert number(row["chance"]) == pytest.approx(float(np.mean(chance)), abs=1e-6)
        assert number(row["final_reward"]) == 0.0  # tiny-random: the premise of the planted answer

    by_module = html_table(nb, "q_proj")
    assert number(by_module["pissa r=4 seed=0"]["down_proj"]) == pytest.approx(1.0, abs=1e-4)
    assert number(by_module["milora r=4 seed=0"]["down_proj"]) == pytest.approx(0.0, abs=1e-4)


def test_notebook04_compares_the_sweeps_runs(smoke_sweep):
    sweep_dir, _ = smoke_sweep
    nb = nbformat.read(sweep_dir / "04_compare_runs.ipynb", as_version=4)
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    texts = [o.get("data", {}).get("text/plain", "") for c in nb.cells for o in c.get("outputs", [])]
    assert "<Runs: 2 runs: pissa r=4 seed=0, milora r=4 seed=0>" in texts


def test_restart_skips_finished_runs_and_refuses_a_changed_config(smoke_sweep, tmp_path, capsys, monkeypatch):
    sweep_dir, _ = smoke_sweep
    monkeypatch.chdir(sweep_dir.parent.parent)
    before = {p: p.stat().st_mtime_ns for name in SMOKE_RUNS for p in (sweep_dir / name).rglob("*") if p.is_file()}
    code, out, err = sweep_cli(capsys, SMOKE, "--no-notebooks")
    assert code == 0 and err == ""
    assert "2 finished (skipped), 0 to train" in out
    after = {p: p.stat().st_mtime_ns for name in SMOKE_RUNS for p in (sweep_dir / name).rglob("*") if p.is_file()}
    assert after == before  # nothing trained, nothing rewritten

    changed = yaml.safe_load(SMOKE.read_text())
    changed["training"]["max_steps"] = 3
    code, out, err = sweep_cli(capsys, write_sweep(tmp_path / "changed.yaml", changed), "--dry-run")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "holds a finished run of another config (training.max_steps is 2 there, 3 in the sweep)" in err

    code, out, err = sweep_cli(capsys, SMOKE, "--dry-run")
    assert code == 0 and all(f"{name}" in out for name in SMOKE_RUNS) and out.count("finished (skip)") == 2


# ------------------------------------------------------------------------------ failures
def test_a_failing_run_is_reported_and_the_others_still_train(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    broken = tmp_path / "broken-model"  # a model folder whose weights are missing: found, then fails to load
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    data = {
        "sweep_dir": "sw",
        **TINY,
        "grid": {"methods": ["lora"], "seeds": [0], "model.model_name_or_path": [str(broken), "tiny-random"]},
    }
    sweep_file = write_sweep(tmp_path / "sweep.yaml", data)
    bad, good = (f"lora-r8-s0-lr5e-4-model_name_or_path_{v}" for v in ("broken-model", "tiny-random"))
    # a crashed earlier attempt of the good run: trained again over it, from scratch
    half = tmp_path / "sw" / good
    half.mkdir(parents=True)
    (half / "config.yaml").write_text("{}\n")
    (half / "metrics.jsonl").write_text(json.dumps({"step": 99, "reward": 7.0}) + "\n")

    code, out, err = sweep_cli(capsys, sweep_file, "--no-notebooks")
    assert code == 1
    assert f"FAILED {bad}" in out and f"finished {good}" in out
    # note: a model that cannot load is refused before training: exit 2, one line, no traceback
    assert "1 of 2 runs failed" in err and f"{bad}: exit code 2: perlwb: error: could not load the model" in err
    assert f"log: {tmp_path / 'sw' / bad / 'train.log'}" in err
    assert "Traceback" not in (tmp_path / "sw" / bad / "train.log").read_text()
    assert json.loads((tmp_path / "sw" / bad / sw.MARKER).read_text())["status"] == "failed"

    assert json.loads((half / sw.MARKER).read_text())["status"] == "finished"
    steps = [json.loads(line)["step"] for line in (half / "metrics.jsonl").read_text().splitlines()]
    assert 99 not in steps and max(steps) == 2  # the crashed attempt's metrics are gone
    assert yaml.safe_load((half / "config.yaml").read_text())["training"]["overwrite_output_dir"] is True

    # a restart retries only the failed run (and fails again): the good one is skipped
    code, out, err = sweep_cli(capsys, sweep_file, "--no-notebooks")
    assert code == 1 and "1 finished (skipped), 1 to train (1 unfinished, trained again)" in out


# ------------------------------------------------------------------------------ bad sweep files
def _bad(tmp_path, changes: dict):
    data = {"sweep_dir": str(tmp_path / "never"), **TINY, "grid": {"methods": ["lora", "dora"]}}
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


BAD = {
    "unknown key": ({"sweepdir": "x"}, "unknown key 'sweepdir'; did you mean 'sweep_dir'?"),
    "bad method": ({"grid": {"methods": ["lora", "lorra"]}}, "peft.type must be one of"),
    "unknown axis": ({"grid": {"method": ["lora"]}}, "unknown grid axis 'method'; did you mean 'methods'?"),
    "unknown field axis": ({"grid": {"training.max_step": [1, 2]}}, "did you mean 'training.max_steps'?"),
    "wrong type": ({"grid": {"ranks": ["eight"]}}, "peft.r expects an integer, got 'eight'"),
    "empty axis": ({"grid": {"seeds": []}}, "grid.seeds is an empty list"),
    "duplicate value": ({"grid": {"seeds": [1, 1]}}, "grid.seeds lists 1 twice"),
    "no sweep_dir": ({"sweep_dir": None}, "needs sweep_dir"),
    "output_dir set": ({"training": {"output_dir": "x"}}, "sets training.output_dir, which a sweep decides"),
    "unknown section key": ({"training": {"max_step": 3}}, "unknown config key 'training.max_step'"),
    "launcher missing": (
        {"launcher": "no-such-launcher-xyz --x"},
        "launcher program 'no-such-launcher-xyz' is not found",
    ),
    "bad batch": (
        {"training": {"per_device_train_batch_size": 3, "num_generations": 2}},
        "must be divisible by num_generations",
    ),
    "missing model": (
        {"model": {"model_name_or_path": "no-such-model"}},
        "'no-such-model' is neither an embedded model",
    ),
    "base_config missing": ({"base_config": "nowhere.yaml"}, "nowhere.yaml does not exist"),
    "parallel": ({"parallel": 0}, "parallel must be a positive integer"),
    "notebook": ({"notebooks": ["99_nothing"]}, "notebook '99_nothing' is not in"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_sweep_file_is_one_line_and_exit_2_with_nothing_started(case, tmp_path, capsys):
    changes, message = BAD[case]
    code, out, err = sweep_cli(capsys, write_sweep(tmp_path / "bad.yaml", _bad(tmp_path, changes)))
    assert code == 2 and out == ""
    assert err.startswith("perlwb: error: ") and err.count("\n") == 1
    assert message in err
    assert not (tmp_path / "never").exists()


def test_malformed_files_and_flags_are_one_line(tmp_path, capsys):
    cases = [
        (tmp_path / "missing.yaml", [], "does not exist"),
        (write_text(tmp_path / "list.yaml", "- a\n- b\n"), [], "must be a YAML mapping"),
        (write_text(tmp_path / "broken.yaml", "grid: [unclosed\n"), [], "malformed YAML"),
        (SMOKE, ["--parallel", "none"], "--parallel expects a positive integer"),
        (SMOKE, ["--parralel", "2"], "unrecognized arguments"),
    ]
    for path, extra, message in cases:
        code, _, err = sweep_cli(capsys, path, *extra)
        assert code == 2 and err.count("\n") == 1 and message in err, (path, err)


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_dry_run_lists_the_grid_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = sweep_cli(capsys, NANO, "--dry-run")
    assert code == 0 and err == ""
    methods = yaml.safe_load(NANO.read_text())["grid"]["methods"]
    assert len(methods) == 15 and set(methods) == set(PEFT_TYPES) - {"full"}  # all fifteen methods
    names = re.findall(r"^  (\S+)\s+to train", out, flags=re.MULTILINE)
    assert names == [f"{m}-r8-s0-lr5e-4" for m in methods]
    assert not (tmp_path / "sweeps").exists()


# ------------------------------------------------------------------------------ loading
def test_grid_points_names_and_configs(tmp_path):
    data = {
        "sweep_dir": "s",
        **TINY,
        "training": {**TINY["training"], "beta": 0.0},
        "grid": {
            "methods": ["lora", "adalora"],
            "ranks": [4, 16],
            "seeds": [0, 1],
            "learning_rates": [5e-4, 2.5e-5],
            "config.training.beta": [0.0, 0.04],
        },
    }
    sweep = sw.load_sweep(write_sweep(tmp_path / "grid.yaml", data))
    assert len(sweep.runs) == 2 * 2 * 2 * 2 * 2
    names = [r.name for r in sweep.runs]
    assert names[:2] == ["lora-r4-s0-lr5e-4-beta_0", "adalora-r4-s0-lr5e-4-beta_0"]  # methods innermost
    assert names[-1] == "adalora-r16-s1-lr2.5e-5-beta_0.04"  # seeds outermost
    run = next(r for r in sweep.runs if r.name == "adalora-r16-s1-lr2.5e-5-beta_0.04")
    c = run.config
    assert (c.peft.type, c.common.seed, c.training.learning_rate, c.training.beta) == ("adalora", 1, 2.5e-5, 0.04)
    # adalora ignores peft.r: the grid rank is its target_r, init_r keeps the default 12/8 ratio
    assert (c.peft.r, c.peft.target_r, c.peft.init_r) == (16, 16, 24)
    assert c.training.output_dir == str((Path.cwd() / "s" / run.name).resolve()) and c.training.run_name == run.name
    assert sweep.launcher == [sys.executable] and sweep.parallel == 1


def test_launcher_processes_count_in_batch_validation(tmp_path):
    # 2 completions per device, groups of 4: whole groups only across two processes
    data = {
        "sweep_dir": "s",
        **TINY,
        "training": {**TINY["training"], "num_generations": 4},
        "grid": {"methods": ["lora"]},
    }
    with pytest.raises(sw.SweepError, match="must be divisible by num_generations"):
        sw.load_sweep(write_sweep(tmp_path / "one.yaml", data))
    data["launcher"] = f"{sys.executable} -m accelerate.commands.launch --num_processes 2"
    sweep = sw.load_sweep(write_sweep(tmp_path / "two.yaml", data))
    assert sw.launch_command(sweep, sweep.runs[0]) == [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "-m",
        "perl.cli",
        "train",
        "--config",
        str(sweep.runs[0].path / "launch_config.yaml"),
    ]
    assert sw._launcher_world_size(["torchrun", "--nproc_per_node=4", "--nnodes", "2"]) == 8


# ------------------------------------------------------------------------------ notebook 05, committed form
def test_notebook05_is_committed_clean_with_a_question_and_parameters():
    import ast

    nb = nbformat.read(NOTEBOOK05, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and "?" in nb.cells[0].source
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert "widgets" not in nb.metadata and nb.metadata.kernelspec.name == "python3"
    (params,) = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert {t.id for node in ast.parse(params.source).body for t in node.targets} == {"run_dirs"}
    for cell in code:
        ast.parse(cell.source)


# ------------------------------------------------------------------------------ small library pieces
def test_run_names_are_readable_and_exact_enough():
    from perl.config import TrainConfig, apply_overrides

    cfg = apply_overrides(
        TrainConfig(),
        {
            "peft.type": "milora_plus",
            "peft.r": 16,
            "common.seed": 3,
            "training.learning_rate": 2.5e-5,
            "training.beta": 0.04,
            "model.model_name_or_path": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
            "peft.target_modules": ["q_proj", "v_proj"],
        },
    )
    assert sw.run_name(cfg) == "milora_plus-r16-s3-lr2.5e-5"
    assert sw.run_name(cfg, ["training.beta", "model.model_name_or_path", "peft.target_modules"]) == (
        "milora_plus-r16-s3-lr2.5e-5-beta_0.04-model_name_or_path_DeepSeek-R1-Distill-Qwen-1.5B"
        "-target_modules_q_proj+v_proj"
    )
    assert [sweep_spec._format_number(v, scientific=True) for v in (5e-4, 1e-2, 1.0, 3.14e-6)] == [
        "5e-4",
        "1e-2",
        "1e0",
        "3.14e-6",
    ]


def test_reward_relation_is_rank_and_linear_correlation_over_finite_runs():
    import pandas as pd

    from perl.viz.alignment import reward_relation

    table = pd.DataFrame(
        {
            "final_reward": [1.0, 3.0, 2.0, 4.0, 9.0],
            "principal_left": [1.0, 2.0, 3.0, 4.0, np.nan],  # the fifth run has no alignment
            "minor_left": [0.5, 0.5, 0.5, 0.5, 0.5],
        },  # does not vary
        index=list("abcde"),
    )
    rel = reward_relation(table, columns=("principal_left", "minor_left", "intruders"))
    # ranks of x 1 2 3 4, of y 1 3 2 4: Spearman = 1 - 6 * (0 + 1 + 1 + 0) / (4 * 15) = 0.8; Pearson is the same here
    assert rel.loc["principal_left", "spearman"] == pytest.approx(0.8)
    assert rel.loc["principal_left", "pearson"] == pytest.approx(0.8)
    assert rel.loc["principal_left", "n"] == 4
    assert np.isnan(rel.loc["minor_left", "spearman"]) and rel.loc["minor_left", "n"] == 5
    assert np.isnan(rel.loc["intruders", "pearson"]) and rel.loc["intruders", "n"] == 0  # not a column: no runs
