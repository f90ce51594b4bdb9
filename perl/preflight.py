"""Checks at the edge, before anything is written: the run folder, the model, the dataset.

`perlwb train` (the CLI) and `perl.train.train` (a notebook cell) both call :func:`preflight`, so a
mistyped model name or an output folder holding an earlier run gets the same one-sentence
`ConfigError` wherever training starts.
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path
from typing import Any, Optional

from perl.config import ConfigError, TrainConfig, validate

__all__ = ["preflight", "check_output_dir", "earlier_run", "optional_module"]


# note: what marks a folder as holding an earlier run (see docs/architecture.md, "Run folder").
_RUN_MARKERS = (
    "config.yaml", "metrics.jsonl", "checkpoint-*", "*.nc", "*/*.nc", "spectral_logs", "gradient_logs",
    "adapter_config.json",
)


def earlier_run(folder: Path) -> Optional[str]:
    for pattern in _RUN_MARKERS:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0].relative_to(folder).as_posix()
    return None


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse an output (or tracking) folder that holds an earlier run, unless resuming or overwriting.

    Also checks that a checkpoint to resume from is there. Reads only; raises `ConfigError`.
    """
    t = cfg.training
    out = Path(t.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output directory {out} is a file; choose another --config.training.output_dir.")
    resume = t.resume_from_checkpoint
    if resume is not None:
        if resume.strip().lower() == "true":
            if not (out.is_dir() and any(p.is_dir() for p in out.glob("checkpoint-*"))):
                raise ConfigError(
                    f"resume_from_checkpoint is true but {out} has no checkpoint-* folder; "
                    "train with --config.training.save_strategy steps first, or pass a checkpoint path."
                )
        elif not Path(resume).expanduser().is_dir():
            raise ConfigError(f"checkpoint {resume} to resume from is not a folder; pass a checkpoint-N path or true.")
        return
    folders = [out]
    if cfg.tracker.tracking_output_dir:
        folders.append(Path(cfg.tracker.tracking_output_dir).expanduser())
    for folder in folders:
        if folder.is_dir() and not t.overwrite_output_dir:
            marker = earlier_run(folder)
            if marker:
                raise ConfigError(
                    f"{folder} already holds a run ({marker}); pass --overwrite_output_dir to write over it, "
                    "--config.training.resume_from_checkpoint true to continue it, "
                    "or choose another --config.training.output_dir."
                )


def optional_module(name: str) -> Optional[Any]:
    """Import ``name``; None when that module itself is not installed (a part not yet built)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise


def _resolve(module: str, func: str, value: str) -> None:
    mod = optional_module(module)
    if mod is None:
        return  # note: that part of the package is not installed; train() will say so
    try:
        getattr(mod, func)(value)
    except ValueError as e:  # ModelNotFound and the dataset error are ValueErrors
        raise ConfigError(str(e)) from None


def preflight(cfg: TrainConfig) -> TrainConfig:
    """Check what `validate` cannot: folders, the model and the dataset exist; nothing is written.

    Raises:
        ConfigError: an output directory that holds an earlier run (unless resuming or
            overwrite_output_dir), a missing checkpoint to resume from, a model or dataset that
            is not there.
    """
    validate(cfg)
    # note: under `accelerate launch` rank 0 may already have written config.yaml when another rank
    # gets here; rank 0 alone judges the folder (if it refuses, the launcher stops the others).
    if os.environ.get("RANK", "0") in ("", "0"):
        check_output_dir(cfg)
    with warnings.catch_warnings():
        # note: import-time warnings of transformers would break the one-line error contract
        warnings.simplefilter("ignore")
        _resolve("perl.models.loading", "resolve_model_path", cfg.model.model_name_or_path)
        _resolve("perl.data.datasets", "resolve_dataset_source", cfg.dataset.dataset_name_or_path)
    return cfg
