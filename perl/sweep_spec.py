"""A sweep's grid spec: the sweep file's keys, its parsing and validation, the run folders it expands to.

See :mod:`perl.sweep` for running a sweep; everything here is re-exported from there.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shlex
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perl.config import (
    SECTIONS,
    ConfigError,
    TrainConfig,
    _check_key,
    _suggest,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    read_yaml_file,
    validate,
)

MARKER = "sweep_run.json"
LAUNCH_CONFIG = "launch_config.yaml"
LOG_FILE = "train.log"
SWEEP_COPY = "sweep.yaml"
LOCK_FILE = ".sweep.lock"
# note: each point is a whole training (minutes to hours); a grid beyond this is a typo or a hostile file
MAX_GRID_POINTS = 1000
NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
DEFAULT_NOTEBOOKS = ("04_compare_runs", "05_spectral_alignment", "06_perl_questions")
# the trained weights Trainer.save_model leaves in output_dir: an adapter, or a whole model (full)
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
# fields that say where and how a run was launched, not what it is: ignored when a finished run's
# config.yaml is compared with the sweep's (the sweep folder may have been moved)
_LOCATION_FIELDS = {("training", "output_dir"), ("training", "overwrite_output_dir")}

# grid axis -> config field, in the order they appear in a run's name
NAMED_AXES = {
    "methods": "peft.type",
    "ranks": "peft.r",
    "seeds": "common.seed",
    "learning_rates": "training.learning_rate",
}
SWEEP_KEYS = ("sweep_dir", "base_config", "grid", "launcher", "parallel", "notebooks", *SECTIONS)
# fields a sweep decides per run; a sweep file that sets them is refused (see _check_reserved)
_RESERVED = {
    "training.output_dir": "each run's folder is <sweep_dir>/<run name>; set sweep_dir instead",
    "tracker.tracking_output_dir": "every run would write its tracking data into the same folder; leave it unset",
    "training.resume_from_checkpoint": "a sweep restarts unfinished runs from scratch; leave it unset",
}
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # bad sweep files and flags: 2, as every perl command (perl.cli_support.fail)


class SweepError(ConfigError):
    """A sweep file (or sweep folder) a user can fix; the message is one sentence that says how."""


# ============================================================================================ model
@dataclass
class SweepRun:
    """One grid point: its name, its folder and its validated `TrainConfig`.

    Args:
        name (`str`): the folder name, e.g. ``lora-r8-s0-lr5e-4``.
        path (`Path`): ``<sweep_dir>/<name>``.
        config (`TrainConfig`): the run's config (output_dir, run_name set; overwrite_output_dir off).
        point (`dict`): the grid values of this point, ``{"peft.type": "lora", ...}``.
    """

    name: str
    path: Path
    config: TrainConfig
    point: dict[str, Any]


@dataclass
class Sweep:
    """A loaded, validated sweep file.

    Usage:
        sweep = load_sweep("configs/sweeps/methods_nano.yaml")
        [run.name for run in sweep.runs]

    Args:
        source (`Path`): the sweep file.
        text (`str`): its text (copied to ``<sweep_dir>/sweep.yaml`` when the sweep runs).
        sweep_dir (`Path`): where the run folders go.
        runs (`list[SweepRun]`): the grid points, seeds outermost and methods innermost.
        launcher (`list[str]`): command prefix that runs a Python module given ``-m``.
        parallel (`int`, defaults to 1): runs at a time.
        notebooks (`list[str]`): notebooks (names in ``notebooks/``) executed after the runs.
        notebook_paths (`dict[str, Path]`): notebooks given by path on the command line (``--notebook``),
            by name; the only way to run a notebook from outside ``notebooks/``.
    """

    source: Path
    text: str
    sweep_dir: Path
    runs: list[SweepRun]
    launcher: list[str]
    parallel: int = 1
    notebooks: list[str] = field(default_factory=lambda: list(DEFAULT_NOTEBOOKS))
    notebook_paths: dict[str, Path] = field(default_factory=dict)


@dataclass
class SweepResult:
    """What `run_sweep` did.

    Args:
        trained, skipped, failed (`list[str]`): run names trained now, skipped as finished, failed.
        logs (`dict[str, Path]`): each launched run's log.
        notebooks (`list[Path]`): executed notebooks; notebook_failures: ``name -> one-line reason``.
        interrupted (`bool`): Ctrl-C stopped the sweep.
    """

    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    notebooks: list[Path] = field(default_factory=list)
    notebook_failures: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if self.failed or self.notebook_failures else 0


# ============================================================================================ loading
def _read_yaml_mapping(path: Path, what: str) -> dict:
    data = read_yaml_file(path, what, "pass the path of a sweep YAML file", error=SweepError)
    if not isinstance(data, dict):
        raise SweepError(f"{what} {path} must be a YAML mapping (sweep_dir, grid, ...), not {type(data).__name__}.")
    return data


def _axis_field(key: str, where: str) -> str:
    """A grid key -> the dotted config field it sets (``methods`` -> ``peft.type``)."""
    if key in NAMED_AXES:
        return NAMED_AXES[key]
    dotted = key.removeprefix("--").removeprefix("config.")
    if dotted.count(".") == 1:
        try:
            _check_key(*dotted.split("."))
        except ConfigError as e:
            raise SweepError(f"{where}: grid axis {key}: {e}") from None
        return dotted
    hint = _suggest(key, list(NAMED_AXES)) or f"; use {', '.join(NAMED_AXES)} or a config field such as training.beta."
    raise SweepError(f"{where}: unknown grid axis '{key}'{hint}")


def _axis_values(key: str, values: Any, where: str) -> list:
    if not isinstance(values, list):
        values = [values]  # note: a single value is a one-point axis
    if not values:
        raise SweepError(f"{where}: grid.{key} is an empty list; give at least one value or remove the axis.")
    seen = []
    for v in values:
        if v in seen:
            raise SweepError(f"{where}: grid.{key} lists {v!r} twice; each value once.")
        seen.append(v)
    return values


def _launcher(value: Any, where: str) -> list[str]:
    if value is None:
        return [sys.executable]
    if isinstance(value, str):
        try:
            tokens = shlex.split(value)
        except ValueError as e:
            raise SweepError(f"{where}: launcher {value!r} is not a valid command line ({e}).") from None
    elif isinstance(value, list) and all(isinstance(t, str) for t in value):
        tokens = list(value)
    else:
        raise SweepError(f"{where}: launcher must be a command line such as 'accelerate launch --num_processes 8'.")
    if not tokens:
        raise SweepError(f"{where}: launcher is empty; remove it to run with this Python, or name a command.")
    program = tokens[0]
    if shutil.which(program) is None and not (os.sep in program and os.access(program, os.X_OK)):
        raise SweepError(
            f"{where}: launcher program '{program}' is not found on PATH; install it or fix the launcher."
        )
    return tokens


def _launcher_world_size(tokens: Sequence[str]) -> int:
    """Processes one run gets from its launcher (accelerate --num_processes, torchrun --nproc_per_node x --nnodes)."""
    values: dict[str, str] = {}
    for i, tok in enumerate(tokens):
        name, eq, val = tok.partition("=")
        if name in ("--num_processes", "--nproc_per_node", "--nproc-per-node", "--nnodes", "--num_machines"):
            values[name.replace("-", "_").strip("_")] = val if eq else (tokens[i + 1] if i + 1 < len(tokens) else "")
    try:
        if "num_processes" in values:
            return max(1, int(values["num_processes"]))
        if "nproc_per_node" in values:
            return max(1, int(values["nproc_per_node"])) * max(1, int(values.get("nnodes", "1").split(":")[-1]))
    except ValueError:
        return 1
    return 1


@contextlib.contextmanager
def _world_size(n: int) -> Iterator[None]:
    # note: validate() reads WORLD_SIZE (the GRPO batch must hold whole groups across processes);
    # the sweep validates as the launched processes will see it
    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(n)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = old


def _notebook_list(value: Any, where: str) -> list[str]:
    if value is None or value is True:
        # note: an install without the repository's notebooks/ folder simply runs none
        return [n for n in DEFAULT_NOTEBOOKS if (NOTEBOOKS_DIR / f"{n}.ipynb").is_file()]
    if value is False:
        return []
    names = value if isinstance(value, list) else [value]
    out = []
    for name in names:
        stem = str(name).removesuffix(".ipynb")
        if isinstance(name, str) and (stem in ("", ".", "..") or "/" in stem or "\\" in stem or os.sep in stem):
            # note: the project's notebooks only: a path would run any notebook (code) from anywhere
            raise SweepError(
                f"{where}: notebooks lists {name!r}, a path; name notebooks of {NOTEBOOKS_DIR} "
                "without folders (e.g. 04_compare_runs)."
            )
        if not isinstance(name, str) or not (NOTEBOOKS_DIR / f"{stem}.ipynb").is_file():
            have = ", ".join(sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.ipynb"))) or "none"
            raise SweepError(f"{where}: notebook {name!r} is not in {NOTEBOOKS_DIR} (have: {have}).")
        out.append(stem)
    return out


def _format_number(value: float, scientific: bool = False) -> str:
    """Compact and exact enough for a folder name: 5e-4, 2.5e-5, 0.04, 1 (scientific: 1e-2, 4e-2, 1e0)."""
    if value != 0 and (scientific or abs(value) < 1e-2 or abs(value) >= 1e5):
        mantissa, exponent = f"{value:.6e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:g}"


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = _format_number(value)
    elif isinstance(value, list):
        text = "+".join(_format_value(v) for v in value)
    elif value is None:
        text = "none"
    elif isinstance(value, str) and "/" in value.strip("/"):
        text = value.rstrip("/").rsplit("/", 1)[-1]  # note: a path or hub id is named by its last part
    else:
        text = str(value)
    safe = "".join(c if c.isalnum() or c in "._+-" else "_" for c in text)
    return safe or "_"


def run_name(config: TrainConfig, extra_fields: Sequence[str] = ()) -> str:
    """The folder name of a grid point: ``<method>-r<r>-s<seed>-lr<lr>`` then ``-<field>_<value>`` per further axis.

    Usage:
        >>> run_name(cfg)                        # 'lora-r8-s0-lr5e-4'
        >>> run_name(cfg, ["training.beta"])     # 'lora-r8-s0-lr5e-4-beta_0.04'
    """
    parts = [
        _format_value(config.peft.type),
        f"r{config.peft.r}",
        f"s{config.common.seed}",
        f"lr{_format_number(float(config.training.learning_rate), scientific=True)}",
    ]
    for dotted in extra_fields:
        section, name = dotted.split(".")
        parts.append(f"{name}_{_format_value(getattr(getattr(config, section), name))}")
    return "-".join(parts)


def _check_reserved(sections: dict, grid_fields: Sequence[str], where: str) -> None:
    for dotted, why in _RESERVED.items():
        section, name = dotted.split(".")
        inline = isinstance(sections.get(section), dict) and name in sections[section]
        if inline or dotted in grid_fields:
            raise SweepError(f"{where} sets {dotted}, which a sweep decides: {why}.")


def load_sweep(path: str | os.PathLike, parallel: int | None = None) -> Sweep:
    """Read and validate a sweep file; every grid point's config is validated (nothing is written).

    Args:
        path (`str | Path`): the sweep YAML file.
        parallel (`int`, optional): runs at a time; defaults to the file's ``parallel`` (1).

    Raises:
        SweepError / ConfigError: the first problem, in one sentence naming the file (and run).
    """
    source = Path(path).expanduser()
    where = f"sweep file {source}"
    data = _read_yaml_mapping(source, "sweep file")
    for key in data:
        if key not in SWEEP_KEYS:
            hint = _suggest(str(key), list(SWEEP_KEYS)) or f"; keys are {', '.join(SWEEP_KEYS)}."
            raise SweepError(f"{where}: unknown key '{key}'{hint}")

    sweep_dir = data.get("sweep_dir")
    if not isinstance(sweep_dir, str) or not sweep_dir.strip():
        raise SweepError(f"{where} needs sweep_dir: the folder the runs go to (e.g. sweeps/methods_nano).")
    sweep_dir_path = Path(sweep_dir).expanduser().resolve()

    # the base config: defaults, then base_config, then the inline sections
    base = TrainConfig()
    if data.get("base_config") is not None:
        if not isinstance(data["base_config"], str):
            raise SweepError(f"{where}: base_config must be the path of a config YAML file.")
        base_path = Path(data["base_config"]).expanduser()
        if not base_path.is_absolute():
            base_path = source.parent / base_path  # note: beside the sweep file, so shipped sweeps can share a base
        base = load_config(base_path)
    sections = {k: v for k, v in data.items() if k in SECTIONS}
    merged = config_to_dict(base)
    for section, values in sections.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise SweepError(f"{where}: section '{section}' must be a mapping of field: value.")
        merged[section].update(values)
    try:
        base = config_from_dict(merged, source=where)
    except SweepError:
        raise
    except ConfigError as e:
        raise SweepError(str(e) if where in str(e) else f"{where}: {e}") from None

    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise SweepError(f"{where}: grid must be a mapping such as {{methods: [lora, dora], seeds: [0, 1]}}.")
    axes: dict[str, list] = {}
    for key, values in grid.items():
        dotted = _axis_field(str(key), where)
        if dotted in axes:
            raise SweepError(f"{where}: grid sets {dotted} twice; keep one of its axes.")
        axes[dotted] = _axis_values(str(key), values, where)
    _check_reserved(sections, list(axes), where)
    points = math.prod(len(v) for v in axes.values())
    if points > MAX_GRID_POINTS:
        sizes = " x ".join(str(len(v)) for v in axes.values())
        raise SweepError(
            f"{where}: the grid has {points} points ({sizes}), more than the {MAX_GRID_POINTS} runs a "
            "sweep may hold; split it into several sweep files."
        )
    if base.tracker.tracking_output_dir or base.training.resume_from_checkpoint is not None:
        key = "tracker.tracking_output_dir" if base.tracker.tracking_output_dir else "training.resume_from_checkpoint"
        raise SweepError(f"{where}: base_config sets {key}, which a sweep decides: {_RESERVED[key]}.")

    launcher = _launcher(data.get("launcher"), where)
    parallel = parallel if parallel is not None else data.get("parallel", 1)
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise SweepError(f"{where}: parallel must be a positive integer (runs at a time), got {parallel!r}.")
    notebooks = _notebook_list(data.get("notebooks"), where)

    runs = _expand(base, axes, sweep_dir_path, where, _launcher_world_size(launcher))
    return Sweep(
        source=source,
        text=source.read_text(encoding="utf-8"),
        sweep_dir=sweep_dir_path,
        runs=runs,
        launcher=launcher,
        parallel=parallel,
        notebooks=notebooks,
    )


def _expand(base: TrainConfig, axes: dict[str, list], sweep_dir: Path, where: str, world: int) -> list[SweepRun]:
    """Every grid point, validated; seeds outermost and methods innermost (each seed sees every method first)."""
    order = ["common.seed", "training.learning_rate", "peft.r"]
    extra = [f for f in axes if f not in NAMED_AXES.values()]
    keys = [f for f in order if f in axes] + extra + (["peft.type"] if "peft.type" in axes else [])
    runs: list[SweepRun] = []
    names: dict[str, dict] = {}
    for values in itertools.product(*(axes[k] for k in keys)):
        point = dict(zip(keys, values))
        label = ", ".join(f"{k}={v}" for k, v in point.items()) or "the base config"
        try:
            cfg = apply_overrides(base, point)
            if "peft.r" in point and cfg.peft.type == "adalora":
                cfg = _adalora_rank(base, cfg, point)
            name = run_name(cfg, extra)
            cfg.training.output_dir = str(sweep_dir / name)
            cfg.training.run_name = name
            cfg.training.overwrite_output_dir = False
            with _world_size(world):
                validate(cfg)
        except ConfigError as e:
            raise SweepError(f"{where}: grid point {label}: {e}") from None
        if name in names:
            raise SweepError(
                f"{where}: grid points {names[name]} and {point} both make the run folder {name}; "
                "make their values differ in the name (e.g. not 1e-4 and 0.0001)."
            )
        names[name] = point
        runs.append(SweepRun(name=name, path=sweep_dir / name, config=cfg, point=point))
    return runs


def _adalora_rank(base: TrainConfig, cfg: TrainConfig, point: dict) -> TrainConfig:
    """AdaLoRA ignores peft.r: a grid rank is its target_r, and init_r keeps the base's init_r/target_r ratio."""
    r = int(cfg.peft.r)
    overrides: dict[str, Any] = {}
    if "peft.target_r" not in point:
        overrides["peft.target_r"] = r
    if "peft.init_r" not in point:
        overrides["peft.init_r"] = max(r, math.ceil(r * base.peft.init_r / base.peft.target_r))
    return apply_overrides(cfg, overrides)
