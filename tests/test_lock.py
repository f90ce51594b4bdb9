"""One writer per run folder: the lock of perl/rundir.py, and two real trainings into one folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from test_hostile import REPO, RUN_PY, assert_refused, run_cli

from perl.rundir import LOCK_FILE, RunFolderLocked, RunLock, lock_holder


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path / "run") as first:
        assert json.loads(first.path.read_text())["pid"] == os.getpid()
        assert lock_holder(tmp_path / "run")["pid"] == os.getpid()
        with pytest.raises(RunFolderLocked, match=f"pid {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released and removed
    assert lock_holder(tmp_path / "run") is None
    RunLock(tmp_path / "run").acquire().release()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    assert lock_holder(tmp_path) is None
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_a_lock_written_on_another_host_is_respected(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 4242, "host": "node-that-is-not-this-one"}))
    assert lock_holder(tmp_path)["pid"] == 4242
    with pytest.raises(RunFolderLocked, match="pid 4242 on host node-that-is-not-this-one.*delete"):
        RunLock(tmp_path).acquire()


def test_the_lock_is_released_when_its_process_is_killed(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from perl.rundir import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    assert lock_holder(tmp_path)["pid"] == holder.pid
    holder.kill()
    holder.wait()
    assert lock_holder(tmp_path) is None
    RunLock(tmp_path).acquire().release()


def test_two_trainings_into_one_folder(tmp_path):
    """The second fails at once (exit 2, naming the first's pid); the first's stores are whole and monotonic."""
    import perl

    run = tmp_path / "run"
    args = [
        "--config.model.model_name_or_path",
        "countdown-nano",
        "--config.training.output_dir",
        str(run),
        "--config.training.max_steps",
        "12",
        "--config.training.num_generations",
        "4",
        "--config.training.per_device_train_batch_size",
        "4",
        "--config.training.max_completion_length",
        "24",
        "--config.dataset.example_numbers",
        "32",
        "--config.dataset.test_size",
        "4",
        "--enable_tracking",
        "--tracking_frequency",
        "1",
        "--overwrite_output_dir",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    first = subprocess.Popen(
        [sys.executable, str(RUN_PY), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while lock_holder(run) is None:
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the first training never took the lock"
            time.sleep(0.2)
        second = run_cli(tmp_path, *args)
        assert_refused(second, f"pid {first.pid}", "in use")
        first_stderr = first.communicate(timeout=600)[1]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, first_stderr[-2000:]
    assert not (run / LOCK_FILE).exists()
    opened = perl.open_run(run)
    for ds in (opened.spectral, opened.gradients):
        steps = ds["step"].values
        assert np.all(np.diff(steps) > 0) and steps[-1] == 12, steps
    metric_steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metric_steps == sorted(metric_steps) and metric_steps[-1] == 12
    assert len(set(metric_steps)) >= 12


def test_a_lock_path_that_is_in_the_way_is_one_clear_error(tmp_path):
    (tmp_path / LOCK_FILE).mkdir()
    assert lock_holder(tmp_path) is None
    with pytest.raises(ValueError, match="cannot create the lock file"):
        RunLock(tmp_path).acquire()


def test_the_sweep_driver_files_are_never_moved_aside():
    from perl import sweep
    from perl.rundir import LAUNCHER_FILES

    # note: the sweep keeps writing its log while the run it launched overwrites the folder
    assert {sweep.LAUNCH_CONFIG, sweep.LOG_FILE, sweep.MARKER} == LAUNCHER_FILES
