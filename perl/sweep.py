"""`perlwb sweep SWEEP.yaml`: a grid of trainings (methods x ranks x seeds x learning rates x ...),
each in its own run folder under one sweep folder, then the comparison notebooks on the result.

A sweep file is YAML:

```yaml
sweep_dir: sweeps/methods_nano        # the sweep folder (relative to the working directory)
base_config: ../base.yaml             # optional: a TrainConfig YAML (relative to this file)
training: {max_steps: 200}            # optional: config sections inline, over base_config
tracker: {enable_spectral_tracking: true}
grid:
  methods: [lora, dora, pissa]        # peft.type
  ranks: [8, 16]                      # peft.r (adalora: its target_r, init_r keeps its ratio)
  seeds: [0, 1]                       # common.seed
  learning_rates: [5e-4]              # training.learning_rate
  training.beta: [0.0, 0.04]          # any section.field (also written config.section.field)
launcher: accelerate launch --num_processes 8   # optional; default: this Python interpreter
parallel: 1                           # optional; --parallel N wins
notebooks: true                       # optional: false, or names in notebooks/ such as [04_compare_runs]
```

Every grid point becomes a run folder named after its values, ``lora-r8-s0-lr5e-4`` (plus
``-beta_0.04`` for each further axis), trained by ``<launcher> -m perl.cli train --config
<run>/launch_config.yaml`` in a subprocess whose output goes to ``<run>/train.log``. Every grid
point's config is validated (and its model and dataset found) before anything starts; a bad sweep
file is one line on stderr and exit code 2.

A run is *finished* when the sweep wrote ``<run>/sweep_run.json`` with status ``finished`` after
the training process exited 0 and left its trained weights (``adapter_model.safetensors``, or
``model.safetensors`` for full fine-tuning) and its ``config.yaml``. Finished runs are skipped on
a restart; any other folder (a crash, a kill, a failure) is trained again from scratch with
``overwrite_output_dir``. A finished run whose config differs from the sweep's is refused (exit 2),
never silently overwritten or mistaken for the new one.

Failed runs do not stop the others; they are listed at the end with their log and the command
exits 1. Afterwards the per-configuration summary over seeds (`perl.sweep_summary`: ``summary.csv``,
``summary.nc``) is written and notebooks 04, 05 and 06 are executed with papermill on the finished
runs into the sweep folder. ``--summary SWEEP_DIR`` only rewrites the summary.

Usage:
    perlwb sweep configs/sweeps/methods_nano.yaml --parallel 2
    perlwb sweep configs/sweeps/methods_nano.yaml --dry-run      # the plan; nothing is written
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import hashlib
import json
import math
import os
import shlex
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perl.cli_support import OneLineParser, UsageError, fail
from perl.config import ConfigError, TrainConfig, config_to_dict, load_config, save_config
from perl.fileio import atomic_write_text
from perl.sweep_spec import (
    _LOCATION_FIELDS,
    EXIT_INTERRUPTED,
    LAUNCH_CONFIG,
    LOCK_FILE,
    LOG_FILE,
    MARKER,
    NOTEBOOKS_DIR,
    SWEEP_COPY,
    WEIGHT_FILES,
    Sweep,
    SweepError,
    SweepResult,
    SweepRun,
    _launcher_world_size,
    _world_size,
    load_sweep,
    run_name,
)

__all__ = [
    "LAUNCH_CONFIG",
    "LOG_FILE",
    "MARKER",
    "Sweep",
    "SweepError",
    "SweepResult",
    "SweepRun",
    "execute_notebooks",
    "launch_command",
    "load_sweep",
    "main",
    "plan",
    "run_name",
    "run_state",
    "run_sweep",
]


# ============================================================================================ state
def _read_marker(path: Path) -> dict:
    try:
        data = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _has_weights(path: Path) -> bool:
    return any((path / name).is_file() for name in WEIGHT_FILES)


def run_state(run: SweepRun) -> str:
    """``"new"`` (nothing there), ``"finished"`` (marker, weights, config.yaml) or ``"unfinished"`` (redo it)."""
    if not run.path.exists():
        return "new"
    from perl.preflight import earlier_run

    if (
        _read_marker(run.path).get("status") == "finished"
        and _has_weights(run.path)
        and (run.path / "config.yaml").is_file()
    ):
        return "finished"
    if not run.path.is_dir():
        return "unfinished"
    return "unfinished" if earlier_run(run.path) or (run.path / LOG_FILE).exists() else "new"


def _comparable(cfg: TrainConfig) -> dict:
    data = config_to_dict(cfg)
    for section, name in _LOCATION_FIELDS:
        data[section].pop(name, None)
    return data


def _config_difference(run: SweepRun) -> str | None:
    """None when the finished run's config.yaml is this grid point's config; else the first difference."""
    try:
        stored = _comparable(load_config(run.path / "config.yaml"))
    except ConfigError:
        return "its config.yaml cannot be read"
    planned = _comparable(run.config)
    for section, fields in planned.items():
        for name, value in fields.items():
            if stored.get(section, {}).get(name) != value:
                return f"{section}.{name} is {stored.get(section, {}).get(name)!r} there, {value!r} in the sweep"
    return None


def _fingerprint(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(_comparable(cfg), sort_keys=True, default=str).encode()).hexdigest()


def plan(sweep: Sweep) -> dict[str, str]:
    """Each run's state; raises `SweepError` for a finished run whose config differs from the sweep's."""
    states = {}
    for run in sweep.runs:
        state = run_state(run)
        if state == "finished":
            diff = _config_difference(run)
            if diff is not None:
                raise SweepError(
                    f"{run.path} holds a finished run of another config ({diff}); delete that folder to train it "
                    "again, or set another sweep_dir."
                )
        states[run.name] = state
    return states


def _preflight(sweep: Sweep, states: dict[str, str]) -> None:
    """Model, dataset and folder checks of every run to launch, before any starts (nothing written)."""
    from perl.preflight import preflight

    with _world_size(_launcher_world_size(sweep.launcher)):
        for run in sweep.runs:
            if states[run.name] == "finished":
                continue
            cfg = copy.deepcopy(run.config)
            cfg.training.overwrite_output_dir = states[run.name] == "unfinished"
            try:
                preflight(cfg)
            except ConfigError as e:
                raise SweepError(f"sweep file {sweep.source}: run {run.name}: {e}") from None


def launch_command(sweep: Sweep, run: SweepRun) -> list[str]:
    """``<launcher> -m perl.cli train --config <run>/launch_config.yaml``."""
    return [*sweep.launcher, "-m", "perl.cli", "train", "--config", str(run.path / LAUNCH_CONFIG)]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _child_env(parallel: int) -> dict[str, str]:
    env = dict(os.environ)
    threads = str(max(1, _cores() // parallel))
    # note: N runs on N cores with one thread each beat N runs fighting over every core; a value the
    # user exported wins
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"  # note: train.log shows progress as it happens
    return env


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def _last_line(path: Path, limit: int = 200) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            lines = [ln.strip() for ln in fh.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    text = lines[-1] if lines else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _final_reward(path: Path) -> float | None:
    """`perl.run.final_reward` of a finished run folder (None when it logged no reward)."""
    from perl.run import RunError, final_reward, read_metrics

    try:
        value = final_reward(read_metrics(path / "metrics.jsonl"))
    except (RunError, OSError):
        return None
    return value if math.isfinite(value) else None


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ============================================================================================ running
@dataclass
class _Running:
    run: SweepRun
    process: Any
    log: Any
    started: float
    command: list[str]


def _start(sweep: Sweep, run: SweepRun, redo: bool, env: dict) -> _Running:
    import subprocess

    run.path.mkdir(parents=True, exist_ok=True)
    (run.path / MARKER).unlink(missing_ok=True)
    cfg = copy.deepcopy(run.config)
    cfg.training.overwrite_output_dir = redo
    save_config(cfg, run.path / LAUNCH_CONFIG)
    command = launch_command(sweep, run)
    log = open(run.path / LOG_FILE, "w", encoding="utf-8")  # noqa: SIM115 - open while the run lives; _finish closes it
    log.write(f"# perlwb sweep: {shlex.join(command)}\n")
    log.flush()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return _Running(run, process, log, time.monotonic(), command)


def _finish(job: _Running, returncode: int) -> str | None:
    """Write the run's marker; return None when it finished, else the reason it failed."""
    job.log.close()
    run = job.run
    seconds = time.monotonic() - job.started
    reason = None
    if returncode != 0:
        reason = f"exit code {returncode}: {_last_line(run.path / LOG_FILE)}"
    elif not _has_weights(run.path) or not (run.path / "config.yaml").is_file():
        reason = "the training process exited 0 but left no trained weights or config.yaml"
    _write_json(
        run.path / MARKER,
        {
            "status": "finished" if reason is None else "failed",
            "run": run.name,
            "returncode": returncode,
            "reason": reason,
            "seconds": round(seconds, 1),
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config_sha256": _fingerprint(run.config),
            "command": job.command,
        },
    )
    return reason


def _stop(jobs: list[_Running]) -> None:
    for job in jobs:
        if job.process.poll() is None:
            job.process.terminate()
    deadline = time.monotonic() + 15
    for job in jobs:
        try:
            job.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
            job.process.kill()
            job.process.wait()
        job.log.close()


@contextlib.contextmanager
def _locked(sweep_dir: Path) -> Iterator[None]:
    """One `perlwb sweep` per sweep folder at a time (a second would redo the first's runs in progress)."""
    from perl.rundir import RunFolderLocked, RunLock

    # note: the run folders' lock (one way to lock); the kernel releases it when a sweep is killed
    lock = RunLock(sweep_dir, name=LOCK_FILE, what="another perlwb sweep")
    try:
        lock.acquire()
    except RunFolderLocked as e:
        raise SweepError(str(e)) from None
    try:
        yield
    finally:
        lock.release()


def run_sweep(sweep: Sweep, notebooks: bool = True, echo: Callable[[str], None] = print) -> SweepResult:
    """Train every unfinished run (``sweep.parallel`` at a time), then execute the notebooks.

    Usage:
        result = run_sweep(load_sweep("configs/sweeps/methods_nano.yaml", parallel=2))
        result.failed            # {} when every run finished

    Args:
        sweep (`Sweep`): from `load_sweep`.
        notebooks (`bool`, defaults to True): execute ``sweep.notebooks`` on the finished runs.
        echo (`callable`): where progress lines go.

    Raises:
        SweepError: a finished run of another config in the folder, a run that cannot start
            (model, dataset), or another sweep running in the same folder; nothing was started.
    """
    states = plan(sweep)
    _preflight(sweep, states)
    result = SweepResult(skipped=[n for n, s in states.items() if s == "finished"])
    todo = deque(run for run in sweep.runs if states[run.name] != "finished")
    with _locked(sweep.sweep_dir):
        (sweep.sweep_dir / SWEEP_COPY).write_text(sweep.text, encoding="utf-8")
        parallel = max(1, min(sweep.parallel, len(todo) or 1))
        env = _child_env(parallel)
        redo = sum(states[r.name] == "unfinished" for r in todo)
        echo(
            f"perlwb sweep: {len(sweep.runs)} runs in {sweep.sweep_dir}: {len(result.skipped)} finished (skipped), "
            f"{len(todo)} to train"
            + (f" ({redo} unfinished, trained again)" if redo else "")
            + (f"; {parallel} at a time, {env['OMP_NUM_THREADS']} thread(s) each" if todo else "")
        )
        total, started = len(todo), 0
        running: list[_Running] = []
        try:
            while todo or running:
                while todo and len(running) < parallel:
                    run = todo.popleft()
                    started += 1
                    running.append(_start(sweep, run, states[run.name] == "unfinished", env))
                    result.logs[run.name] = run.path / LOG_FILE
                    echo(f"[{started}/{total}] started {run.name} (log: {run.path / LOG_FILE})")
                time.sleep(0.2)
                for job in [j for j in running if j.process.poll() is not None]:
                    running.remove(job)
                    reason = _finish(job, job.process.returncode)
                    took = _duration(time.monotonic() - job.started)
                    if reason is None:
                        result.trained.append(job.run.name)
                        reward = _final_reward(job.run.path)
                        tail = f", final reward {reward:.3f}" if reward is not None else ""
                        echo(f"finished {job.run.name} in {took}{tail}")
                    else:
                        result.failed[job.run.name] = reason
                        echo(f"FAILED {job.run.name} after {took}: {reason}")
        except KeyboardInterrupt:
            _stop(running)
            result.interrupted = True
            for job in running:
                result.failed[job.run.name] = "interrupted"
            echo(f"perlwb sweep: interrupted; {len(running)} run(s) stopped, trained again on the next start.")
            return result

        finished = [r for r in sweep.runs if r.name in result.skipped or r.name in result.trained]
        if finished:
            from perl.sweep_summary import summary_after_sweep

            reason = summary_after_sweep(sweep.sweep_dir, echo=echo)
            if reason:
                result.notebook_failures["summary"] = reason
        if notebooks and sweep.notebooks and finished:
            result.notebooks, failures = execute_notebooks(sweep, finished, echo=echo)
            result.notebook_failures.update(failures)
    return result


def _parameter_names(path: Path) -> set[str]:
    import papermill

    return set(papermill.inspect_notebook(str(path)))


def execute_notebooks(
    sweep: Sweep, runs: Sequence[SweepRun], echo: Callable[[str], None] = print
) -> tuple[list[Path], dict[str, str]]:
    """Execute ``sweep.notebooks`` with papermill into the sweep folder on ``runs``.

    Each notebook gets ``run_dirs`` = the run folder names (relative to the sweep folder, where it
    is executed, so the executed notebook re-runs in place in Jupyter).

    Returns:
        (the executed notebooks, ``{notebook name: one-line reason}`` for those that failed).
    """
    import papermill

    done, failures = [], {}
    run_dirs = [os.path.relpath(r.path, sweep.sweep_dir) for r in runs]
    for name in sweep.notebooks:
        source = sweep.notebook_paths.get(name, NOTEBOOKS_DIR / f"{name}.ipynb")
        out = sweep.sweep_dir / f"{name}.ipynb"
        names = _parameter_names(source)
        params = {"run_dirs": run_dirs} if "run_dirs" in names else {}
        if "sweep_dir" in names:
            params["sweep_dir"] = "."  # note: executed in the sweep folder; reads its summary.nc
        started = time.monotonic()
        try:
            papermill.execute_notebook(
                str(source),
                str(out),
                parameters=params,
                kernel_name="python3",
                cwd=str(sweep.sweep_dir),
                progress_bar=False,
                log_output=False,
            )
        except Exception as e:  # noqa: BLE001 - a cell error, a missing kernel: reported, the sweep goes on
            ename = getattr(e, "ename", type(e).__name__)
            evalue = " ".join(str(getattr(e, "evalue", e)).split())[:200]
            failures[name] = f"{ename}: {evalue} (see {out})"
            echo(f"FAILED notebook {name}: {failures[name]}")
            continue
        done.append(out)
        echo(f"executed {out} in {_duration(time.monotonic() - started)}")
    return done, failures


# ============================================================================================ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="perlwb sweep",
        description="Train a grid of runs (methods x ranks x seeds x learning rates x any config field), "
        "each in its own folder under the sweep's sweep_dir, skipping finished runs; then execute "
        "the comparison notebooks on them. See perl/sweep.py for the sweep file format.",
        allow_abbrev=False,
    )
    parser.add_argument("sweep_file", metavar="SWEEP.yaml", nargs="?", help="The sweep file.")
    parser.add_argument(
        "--summary",
        metavar="SWEEP_DIR",
        help="Only (re)write SWEEP_DIR/summary.csv and summary.nc from its finished runs; trains nothing.",
    )
    parser.add_argument("--parallel", metavar="N", help="Runs at a time (default: the file's parallel, else 1).")
    parser.add_argument("--dry-run", action="store_true", help="Print the runs and their commands; write nothing.")
    parser.add_argument("--no-notebooks", action="store_true", help="Do not execute the notebooks after the runs.")
    parser.add_argument(
        "--notebook",
        metavar="PATH",
        action="append",
        default=None,
        help="Execute this notebook file after the runs instead of the sweep file's notebooks "
        "(repeatable); the sweep file itself may only name notebooks of notebooks/.",
    )
    return parser


def _print_plan(sweep: Sweep, states: dict[str, str]) -> None:
    word = {"new": "to train", "unfinished": "to train again (unfinished)", "finished": "finished (skip)"}
    template = shlex.join([*sweep.launcher, "-m", "perl.cli", "train", "--config"]) + f" <run>/{LAUNCH_CONFIG}"
    print(f"perlwb sweep: {len(sweep.runs)} runs in {sweep.sweep_dir}, {sweep.parallel} at a time; each: {template}")
    width = max(len(run.name) for run in sweep.runs)
    for run in sweep.runs:
        print(f"  {run.name:<{width}}  {word[states[run.name]]}")
    if sweep.notebooks:
        print(f"then: {', '.join(n + '.ipynb' for n in sweep.notebooks)} executed into {sweep.sweep_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    """`perlwb sweep SWEEP.yaml [--parallel N] [--dry-run] [--no-notebooks]`; returns the exit code.

    0: every run finished (and every notebook executed); 1: some run or notebook failed (listed on
    stderr with its log); 2: a bad sweep file or command line (one line on stderr, nothing started);
    130: interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        if args.summary is not None or args.sweep_file is None:
            from perl.sweep_summary import summary_main

            return summary_main(args.summary, args.sweep_file)
        parallel = None
        if args.parallel is not None:
            try:
                parallel = int(args.parallel)
            except ValueError:
                parallel = 0
            if parallel < 1:
                raise UsageError(f"--parallel expects a positive integer (runs at a time), got {args.parallel!r}.")
        sweep = load_sweep(args.sweep_file, parallel=parallel)
        if args.notebook:
            paths = [Path(p).expanduser() for p in args.notebook]
            for path in paths:
                if path.suffix != ".ipynb" or not path.is_file():
                    raise UsageError(f"--notebook {path} is not a notebook file (.ipynb); pass the path of one.")
            if len({p.stem for p in paths}) < len(paths):
                raise UsageError(
                    "--notebook names two notebooks with the same file name; each is executed into "
                    "the sweep folder under its name, so rename one."
                )
            sweep.notebooks = [p.stem for p in paths]
            sweep.notebook_paths = {p.stem: p.resolve() for p in paths}
        if args.no_notebooks:
            sweep.notebooks = []
        if args.dry_run:
            _print_plan(sweep, plan(sweep))
            return 0
        result = run_sweep(sweep)
    except (UsageError, ConfigError) as e:
        return fail(str(e))
    except KeyboardInterrupt:  # note: during the notebooks; the runs' loop handles its own
        print("perlwb sweep: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.failed or result.notebook_failures:
        what = [f"{len(result.failed)} of {len(sweep.runs)} runs failed"] if result.failed else []
        what += [f"{len(result.notebook_failures)} notebook(s) failed"] if result.notebook_failures else []
        lines = [f"perlwb sweep: {', '.join(what)}:"]
        lines += [f"  {name}: {reason}; log: {result.logs.get(name, '-')}" for name, reason in result.failed.items()]
        lines += [f"  notebook {name}: {reason}" for name, reason in result.notebook_failures.items()]
        print("\n".join(lines), file=sys.stderr)
    else:
        print(
            f"perlwb sweep: done; {len(sweep.runs)} runs in {sweep.sweep_dir} "
            f"({len(result.trained)} trained now, {len(result.skipped)} skipped as finished)"
        )
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
