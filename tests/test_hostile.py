"""Hostile and careless inputs, run as a user would: each ends with exit code 2, one line on
stderr, no traceback, and the run folder byte for byte as it was (its tree is hashed before and after).

One table per door: `perlwb train` (refused before anything is written, deleted or trained, even with
--overwrite_output_dir), `perlwb report` and `perlwb sweep`. The folder under attack is a copy of the
session's shared tracked run, so every refusal is tested against a real previous run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import netCDF4
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_PY = REPO / "run.py"


def tree_hash(folder: Path) -> str:
    """sha256 over every path below ``folder`` and every file's bytes (a missing folder hashes too)."""
    h = hashlib.sha256()
    if not folder.exists():
        return "absent"
    for p in sorted(folder.rglob("*")):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def run_cli(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(RUN_PY), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert len(lines[0]) < 1000, lines[0][:300]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def previous_run(tracked_run, tmp_path_factory) -> Path:
    """A copy of the shared finished run, with a checkpoint folder so that resuming is possible."""
    run = tmp_path_factory.mktemp("hostile") / "previous"
    shutil.copytree(tracked_run, run)
    (run / "checkpoint-6").mkdir()
    return run


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Hostile files: YAML bombs, a data file with the wrong columns, broken model folders."""
    d = tmp_path_factory.mktemp("inputs")
    laughs = "training:\n  generation_kwargs:\n    a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 9):
        laughs += f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
    (d / "bomb.yaml").write_text(laughs)
    (d / "deep.yaml").write_text("training:\n  generation_kwargs: " + "[" * 10000 + "]" * 10000 + "\n")
    (d / "columns.jsonl").write_text(json.dumps({"numbers": [1, 2, 3], "goal": 6}) + "\n")
    from perl.models.loading import resolve_model_path

    nano = Path(resolve_model_path("countdown-nano"))
    for name, damage in (("bad_config", "config.json"), ("bad_weights", "model.safetensors")):
        shutil.copytree(nano, d / name)
        (d / name / damage).write_bytes(b"{ this is not what it claims" * 10)
    (d / "a_file").write_text("not a folder\n")
    return d


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# (case id, extra args (with {inputs} / {run} placeholders), words the one line must contain)
TRAIN_CASES = [
    # item 4: YAML bounds, while parsing
    ("alias-bomb-in-mapping-field", ["--config", "{inputs}/bomb.yaml"], ["aliases"]),
    ("nesting-10000-deep", ["--config", "{inputs}/deep.yaml"], ["nesting deeper"]),
    (
        "alias-bomb-in-flag",
        [
            "--config.training.generation_kwargs",
            "{{a: &a [x,x,x,x,x,x,x,x,x,x], "
            "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], "
            "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], "
            "f: [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]}}",
        ],
        ["generation_kwargs"],
    ),
    # item 1: the config, what the machine can honour, the folder
    ("invalid-seed", ["--config.common.seed", "-1"], ["common.seed"]),
    ("seed-beyond-32-bits", ["--config.common.seed", str(2**40)], ["common.seed"]),
    ("generated-data-too-large", ["--config.dataset.example_numbers", "100000000"], ["100000"]),
    ("bf16-on-cpu", ["--config.training.bf16", "true"], ["bf16", "no GPU"]),
    ("vllm-not-installed", ["--config.training.use_vllm", "true"], ["use_vllm"]),
    ("logger-not-installed", ["--config.training.report_to", "tensorboard"], ["report_to", "tensorboard"]),
    ("output-below-a-file", ["--config.training.output_dir", "{inputs}/a_file/run"], ["a_file", "not a folder"]),
    # item 1: what only shows once model, data and adapter are built
    ("dataset-wrong-columns", ["--config.dataset.dataset_name_or_path", "{inputs}/columns.jsonl"], ["nums", "target"]),
    (
        "model-corrupt-config",
        ["--config.model.model_name_or_path", "{inputs}/bad_config"],
        ["could not load the model"],
    ),
    (
        "model-corrupt-weights",
        ["--config.model.model_name_or_path", "{inputs}/bad_weights"],
        ["could not load the model"],
    ),
    ("targets-match-nothing", ["--config.peft.target_modules", "attn_qkv"], ["match no linear layer"]),
    ("rank-larger-than-layer", ["--config.peft.r", "100000"], ["peft.r (100000)", "<= 64"]),
    # item 2: resume that would change what the stored data means
    (
        "resume-with-other-rank",
        ["--config.training.resume_from_checkpoint", "true", "--config.peft.r", "4"],
        ["peft.r: 8 -> 4"],
    ),
]


@pytest.mark.parametrize("case,args,needles", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_refuses_before_touching_the_run(case, args, needles, previous_run, inputs, tmp_path):
    if case == "logger-not-installed" and _installed("tensorboard"):
        pytest.skip("tensorboard is installed here")
    if case == "vllm-not-installed" and _installed("vllm"):
        pytest.skip("vllm is installed here")
    before = tree_hash(previous_run)
    args = [a.format(inputs=inputs, run=previous_run) for a in args]
    proc = run_cli(
        tmp_path,
        "--config",
        str(previous_run / "config.yaml"),
        "--overwrite_output_dir",
        "--config.training.output_dir",
        str(previous_run),
        *args,
    )
    assert_refused(proc, *needles)
    assert tree_hash(previous_run) == before


def test_second_training_is_refused_while_the_folder_is_locked(previous_run, tmp_path):
    # item 3: a live holder (another process) of the run folder's lock
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from perl.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)",
            str(previous_run),
        ],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree_hash(previous_run)
        proc = run_cli(
            tmp_path,
            "--config",
            str(previous_run / "config.yaml"),
            "--overwrite_output_dir",
            "--config.training.output_dir",
            str(previous_run),
        )
        assert_refused(proc, f"pid {holder.pid}", "in use")
        assert tree_hash(previous_run) == before
    finally:
        holder.kill()
        holder.wait()
    # note: killed holders leave their lock file; nobody holds it, so it is stale, and readers never needed it
    from perl.rundir import lock_holder

    assert lock_holder(previous_run) is None
    (previous_run / ".perl.lock").unlink()


# ------------------------------------------------------------------------------------ readers
def _corrupt_copy(previous_run: Path, dest: Path, damage: str) -> Path:
    run = dest / damage
    shutil.copytree(previous_run, run)
    if damage == "config-wrong-type":
        text = (run / "config.yaml").read_text().replace("  r: 8\n", "  r: [8, 8]\n")
        assert text != (run / "config.yaml").read_text()
        (run / "config.yaml").write_text(text)
    elif damage == "config-33MB":
        (run / "config.yaml").write_text("# " + "x" * (33 * 2**20) + "\n")
    elif damage == "config-alias-bomb":
        (run / "config.yaml").write_text(
            "a: &a [x,x,x,x,x,x,x,x,x,x]\n"
            + "".join(f"{c}: &{c} [" + ",".join([f"*{p}"] * 10) + "]\n" for p, c in zip("abcdefg", "bcdefgh"))
        )
    elif damage == "metrics-step-1e300":
        with open(run / "metrics.jsonl", "a") as fh:
            fh.write('{"step": 1e300, "reward": 1.0}\n{"step": 7, "reward": 1.0}\n')
    elif damage in ("store-declares-149GiB", "store-other-variables"):
        store = run / "spectral_history_final.nc"
        store.unlink()
        for p in (run / "spectral_logs").glob("*.nc"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()  # the live store is a folder of .nc files
        with netCDF4.Dataset(store, "w") as nc:
            if damage == "store-declares-149GiB":
                for dim, size in (("step", None), ("layer", 4), ("module", 7), ("sv", 2**20 * 178)):
                    nc.createDimension(dim, size)
                nc.createVariable("step", "i8", ("step",))[:] = np.arange(2)
                nc.createVariable("singular_values", "f8", ("step", "layer", "module", "sv"))
            else:
                nc.createDimension("x", 3)
                nc.createVariable("temperature", "f4", ("x",))[:] = np.ones(3)
        assert store.stat().st_size < 64_000
    else:
        raise AssertionError(damage)
    return run


READER_CASES = [
    ("config-wrong-type", ["config.yaml", "peft.r"]),
    ("config-33MB", ["config.yaml", "larger than"]),
    ("config-alias-bomb", ["config.yaml", "aliases"]),
    ("metrics-step-1e300", ["metrics.jsonl", "line"]),
    ("store-declares-149GiB", ["spectral_history_final.nc", "GiB"]),
    ("store-other-variables", ["spectral_history_final.nc", "dimension"]),
]


@pytest.mark.parametrize("damage,needles", READER_CASES, ids=[c[0] for c in READER_CASES])
def test_readers_refuse_a_bad_file_in_one_line(damage, needles, previous_run, tmp_path):
    """item 5: open_run / open_runs / .load() raise one RunError naming the file; a bad store never loads."""
    import warnings

    import perl
    from perl.run import RunError

    run = _corrupt_copy(previous_run, tmp_path, damage)
    before = tree_hash(run)
    with pytest.raises((RunError, ValueError)) as err:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opened = perl.open_run(run)
            _ = (opened.spectral, opened.gradients, opened.metrics)
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in needles), message
    if damage.startswith("config"):  # note: a glob over runs never skips a damaged one silently
        with pytest.raises(RunError, match="config.yaml"):
            perl.open_runs(str(tmp_path / "*"))
    if damage.startswith("store"):
        with pytest.raises(RunError, match="spectral_history_final.nc"):
            _ = perl.open_runs([run]).spectral
        from perl.trackers import SpectralTracker
        from perl.trackers.store import StoreError

        with pytest.raises(StoreError, match="spectral_history_final.nc"):
            SpectralTracker.load(run / "spectral_history_final.nc")
    assert tree_hash(run) == before


@pytest.mark.parametrize("damage", [c[0] for c in READER_CASES])
def test_report_refuses_a_bad_run_in_one_line(damage, previous_run, tmp_path):
    run = _corrupt_copy(previous_run, tmp_path, damage)
    before = tree_hash(run)
    proc = run_cli(tmp_path, "report", str(run))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert dict(READER_CASES)[damage][0] in proc.stderr
    assert tree_hash(run) == before


# ------------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize("target", ["config.yaml", "metrics.jsonl", ".", "spectral_logs"])
def test_report_output_never_lands_on_the_run(target, previous_run, tmp_path):
    """item 6: --output a run's own file, or a folder, is refused and leaves nothing behind."""
    before = tree_hash(previous_run)
    proc = run_cli(tmp_path, "report", str(previous_run), "--output", str(previous_run / target))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert tree_hash(previous_run) == before


def _sweep_file(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text("sweep_dir: sw\nmodel: {model_name_or_path: countdown-nano}\n" + extra)
    return path


SWEEP_CASES = [
    ("notebook-outside-notebooks", "grid: {methods: [lora]}\nnotebooks: [../evil]\n", ["a path"]),
    ("notebook-absolute-path", "grid: {methods: [lora]}\nnotebooks: [/tmp/evil.ipynb]\n", ["a path"]),
    (
        "grid-too-large",
        "grid: {seeds: [" + ",".join(map(str, range(100))) + "], ranks: [" + ",".join(map(str, range(1, 21))) + "]}\n",
        ["2000 points", "1000"],
    ),
    (
        "alias-bomb-in-grid",
        "x: &x [1,1,1,1,1,1,1,1,1,1]\n"
        + "".join(f"{c}: &{c} [" + ",".join([f"*{p}"] * 10) + "]\n" for p, c in zip("xabcdef", "abcdefg"))
        + "grid: {seeds: *g}\n",
        ["aliases"],
    ),
]


@pytest.mark.parametrize("case,text,needles", SWEEP_CASES, ids=[c[0] for c in SWEEP_CASES])
def test_sweep_refuses_before_writing(case, text, needles, tmp_path):
    sweep = _sweep_file(tmp_path, text)
    before = tree_hash(tmp_path)
    proc = run_cli(tmp_path, "sweep", str(sweep), "--dry-run")
    assert_refused(proc, *needles)
    assert tree_hash(tmp_path) == before and not (tmp_path / "sw").exists()


# ------------------------------------------------------------------------------------ YAML bounds
def test_bounded_yaml_reads_ordinary_anchors_and_refuses_bombs_and_depth():
    import yaml

    from perl.config import MAX_YAML_DEPTH, _yaml_load

    ordinary = "base: &b {lr: 5e-4, r: 8}\nruns: [*b, *b, {<<: *b, r: 16}]\n"
    assert _yaml_load(ordinary) == yaml.safe_load(ordinary.replace("5e-4", "5.0e-4"))
    deep_ok = "[" * (MAX_YAML_DEPTH - 1) + "]" * (MAX_YAML_DEPTH - 1)
    assert _yaml_load(deep_ok) is not None
    with pytest.raises(yaml.YAMLError, match="nesting deeper"):
        _yaml_load("[" * (MAX_YAML_DEPTH + 1) + "]" * (MAX_YAML_DEPTH + 1))
    bomb = "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{c}: &{c} [" + ",".join([f"*{p}"] * 10) + "]\n" for p, c in zip("abcd", "bcde")
    )
    with pytest.raises(yaml.YAMLError, match="aliases"):
        _yaml_load(bomb)  # 10**5 values once expanded, though the text is 200 bytes
    assert len(_yaml_load(bomb.rsplit("\n", 2)[0] + "\n")["d"]) == 10  # 10**4: within the bound


def test_sweep_runs_a_notebook_from_elsewhere_only_when_named_on_the_command_line(tmp_path):
    sweep = _sweep_file(tmp_path, "grid: {methods: [lora]}\n")
    own = tmp_path / "mine" / "my_analysis.ipynb"
    own.parent.mkdir()
    own.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    proc = run_cli(tmp_path, "sweep", str(sweep), "--dry-run", "--notebook", str(own))
    assert proc.returncode == 0 and "my_analysis.ipynb" in proc.stdout, proc.stderr
    before = tree_hash(tmp_path)
    assert_refused(
        run_cli(tmp_path, "sweep", str(sweep), "--dry-run", "--notebook", str(tmp_path / "no.ipynb")),
        "not a notebook file",
    )
    assert tree_hash(tmp_path) == before
