"""--overwrite_output_dir cannot destroy: the previous run is moved aside until the new run has
written its first snapshot, and is back byte for byte after a failure at any stage before that
(a bad config, model, dataset or adapter; an exception, SIGTERM or SIGKILL once training started).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_hostile import REPO, assert_refused, run_cli, tree_hash

# a training that kills itself at a given moment: on_train_begin (after the trackers' first writes,
# before any step) or at the end of a step; signal name, event and step come from argv
KILLER = r"""
import os, signal, sys
from transformers import TrainerCallback
from perl.config import apply_overrides, load_config
from perl.train import train

run, sig, event, step = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

class Die(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        if event == "begin":
            os.kill(os.getpid(), getattr(signal, sig))

    def on_step_end(self, args, state, control, **kw):
        if event == "step" and state.global_step >= step:
            os.kill(os.getpid(), getattr(signal, sig))

cfg = apply_overrides(load_config(os.path.join(run, "config.yaml")), {
    "training.output_dir": run, "training.overwrite_output_dir": "true", "training.max_steps": "4",
    "common.seed": "7"})
train(cfg, extra_callbacks=[Die()])
"""


@pytest.fixture
def previous_run(tracked_run, tmp_path) -> Path:
    run = tmp_path / "previous"
    shutil.copytree(tracked_run, run)
    (run / "checkpoint-6").mkdir()
    (run / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": 6}')
    (run / "notes.txt").write_text("the researcher's notes on this run\n")
    return run


def run_killer(run: Path, sig: str, event: str = "begin", step: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", KILLER, str(run), sig, event, str(step)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "columns.jsonl").write_text(json.dumps({"numbers": [1, 2, 3], "goal": 6}) + "\n")
    from perl.models.loading import resolve_model_path

    shutil.copytree(resolve_model_path("countdown-nano"), d / "model")
    (d / "model" / "model.safetensors").write_bytes(b"not safetensors")
    return d


STAGES = [
    ("config", ["--config.common.seed", "-5"]),
    ("model", ["--config.model.model_name_or_path", "{bad}/model"]),
    ("dataset", ["--config.dataset.dataset_name_or_path", "{bad}/columns.jsonl"]),
    ("adapter", ["--config.peft.r", "65"]),
]


@pytest.mark.parametrize("stage,args", STAGES, ids=[s[0] for s in STAGES])
def test_overwrite_refused_at_a_stage_leaves_the_previous_run(stage, args, previous_run, bad_inputs, tmp_path):
    before = tree_hash(previous_run)
    proc = run_cli(
        tmp_path,
        "--config",
        str(previous_run / "config.yaml"),
        "--overwrite_output_dir",
        "--config.training.output_dir",
        str(previous_run),
        *[a.format(bad=bad_inputs) for a in args],
    )
    assert_refused(proc)
    assert tree_hash(previous_run) == before


def test_exception_after_training_started_puts_the_previous_run_back(previous_run):
    from transformers import TrainerCallback

    from perl.config import apply_overrides, load_config
    from perl.train import train

    class Boom(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            # note: the new run has written config.yaml and its trackers' first files by now
            assert (previous_run / ".perl-previous-run" / "notes.txt").is_file()
            raise RuntimeError("a crash before the first snapshot")

    before = tree_hash(previous_run)
    cfg = apply_overrides(
        load_config(previous_run / "config.yaml"),
        {"training.output_dir": str(previous_run), "training.overwrite_output_dir": "true"},
    )
    with pytest.raises(RuntimeError, match="before the first snapshot"):
        train(cfg, extra_callbacks=[Boom()])
    assert tree_hash(previous_run) == before


def test_sigterm_before_the_first_snapshot_puts_the_previous_run_back(previous_run):
    before = tree_hash(previous_run)
    proc = run_killer(previous_run, "SIGTERM")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert tree_hash(previous_run) == before


def test_sigkill_before_the_first_snapshot_is_restored_by_the_next_command(previous_run, tmp_path):
    """SIGKILL runs no cleanup: the previous run stays aside, and open_run or the next training puts it back."""
    import perl
    from perl.rundir import has_interrupted_overwrite

    before = tree_hash(previous_run)
    proc = run_killer(previous_run, "SIGKILL")
    assert proc.returncode == -signal.SIGKILL
    assert has_interrupted_overwrite(previous_run) and tree_hash(previous_run) != before
    twin = tmp_path / "twin"
    shutil.copytree(previous_run, twin, symlinks=True)

    with pytest.warns(UserWarning, match="Restored the previous run"):
        run = perl.open_run(previous_run)
    assert tree_hash(previous_run) == before
    assert run.r == 8 and run.spectral.sizes["step"] == 7  # the previous run's data, labelled as its own

    # the next training restores it too, then judges the folder it finds: a run, not to be written over
    proc = run_cli(tmp_path, "--config", str(previous_run / "config.yaml"), "--config.training.output_dir", str(twin))
    assert proc.returncode == 2 and "restored the previous run" in proc.stderr and "already holds a run" in proc.stderr
    twin_hash = tree_hash(twin)
    shutil.rmtree(twin)
    shutil.copytree(previous_run, twin)
    assert twin_hash == tree_hash(twin)


def test_overwrite_commits_after_the_first_snapshot(previous_run):
    """Killed after its second step, the new run holds: the previous one is gone, the new stores are whole."""
    import perl

    proc = run_killer(previous_run, "SIGKILL", event="step", step=2)
    assert proc.returncode == -signal.SIGKILL
    names = {p.name for p in previous_run.iterdir()}
    assert not {".perl-previous-run", "notes.txt", "checkpoint-6", "spectral_history_final.nc"} & names, names
    run = perl.open_run(previous_run)
    assert run.seed == 7
    steps = run.spectral["step"].values.tolist()
    assert steps[:3] == [0, 1, 2] and steps == sorted(set(steps))


def test_a_separate_tracking_folder_is_moved_aside_and_put_back_too(previous_run, tmp_path):
    from transformers import TrainerCallback

    from perl.config import apply_overrides, load_config
    from perl.train import train

    tracking = tmp_path / "tracking"
    tracking.mkdir()
    for name in ("spectral_logs", "gradient_logs", "spectral_history_final.nc", "gradient_flow_final.nc"):
        shutil.move(str(previous_run / name), str(tracking / name))
    (tracking / "unrelated.txt").write_text("not a run's file: never moved\n")
    (previous_run / "config.yaml").write_text(
        (previous_run / "config.yaml")
        .read_text()
        .replace("tracking_output_dir: null", f"tracking_output_dir: {tracking}")
    )
    before = tree_hash(previous_run), tree_hash(tracking)

    class Boom(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            assert (tracking / ".perl-previous-run" / "spectral_logs").is_dir()
            assert (tracking / "unrelated.txt").is_file()
            raise KeyboardInterrupt

    cfg = apply_overrides(
        load_config(previous_run / "config.yaml"),
        {"training.output_dir": str(previous_run), "training.overwrite_output_dir": "true"},
    )
    assert cfg.tracker.tracking_output_dir == str(tracking)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, extra_callbacks=[Boom()])
    assert (tree_hash(previous_run), tree_hash(tracking)) == before
