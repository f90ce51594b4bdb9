"""Checks at the edge, before anything is written: the run folder, the model, the dataset, the machine.

`perlwb train` (the CLI) and `perl.train.train` (a notebook cell) both call :func:`preflight`, so a
mistyped model name or an output folder holding an earlier run gets the same one-sentence
`ConfigError` wherever training starts. What only shows once the model is built (an adapter rank
larger than a layer, target modules that match nothing) is checked by `check_adapter_fits`, which
`train()` calls on the model in memory, still before the folder is touched.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Optional

from perl.config import PEFT_TYPES, ConfigError, TrainConfig, validate

__all__ = [
    "preflight",
    "check_output_dir",
    "earlier_run",
    "optional_module",
    "check_machine",
    "check_adapter_fits",
    "resume_differences",
    "RESUME_FIELDS",
]

# note: what gives stored data its meaning; a resume that changes one of these would append
# steps of another adapter, model or tracking layout to the same stores (and mislabel them).
RESUME_FIELDS = (
    "model.model_name_or_path",
    "model.dtype",
    "peft.type",
    "peft.r",
    "peft.lora_alpha",
    "peft.target_modules",
    "peft.init_r",
    "peft.target_r",
    "peft.feedforward_modules",
    "peft.ln_target_modules",
    "peft.miss_init",
    "peft.miss_mini_r",
    "peft.pissa_niter",
    "peft.vera_d_initial",
    "peft.projection_prng_key",
    "tracker.enable_spectral_tracking",
    "tracker.enable_gradient_tracking",
    "tracker.enable_alignment_tracking",
    "tracker.spectral_log_frequency",
    "tracker.gradient_log_frequency",
    "tracker.alignment_log_frequency",
    "tracker.track_adapter_only",
    "tracker.compute_full_svd",
    "tracker.max_layers_to_track",
    "tracker.top_k_singular_values",
    "tracker.tracking_output_dir",
    "tracker.alignment_top_k",
    "tracker.intruder_log_frequency",
    "tracker.intruder_epsilon",
)
# note: methods whose r is a rank of a matrix adapting a linear layer (AdaLoRA: init_r); derived from
# the config's one list of method names: the others' r counts reflections (hra), slices (slicefine) or
# nothing (ia3, layernorm, full)
_RANKED = frozenset(PEFT_TYPES) - {"hra", "slicefine", "ia3", "layernorm", "full"}


# note: what marks a folder as holding an earlier run (see docs/architecture.md, "Run folder").
_RUN_MARKERS = (
    "config.yaml",
    "metrics.jsonl",
    "checkpoint-*",
    "*.nc",
    "*/*.nc",
    "spectral_logs",
    "gradient_logs",
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
        _check_resume_config(cfg, out)
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


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def check_folder_writable(folder: Path, what: str, flag: str) -> None:
    """Refuse a folder that cannot be created or written: its nearest existing ancestor must be a writable folder."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(
            f"{what} {folder} cannot be created: {probe} is a file, not a folder; choose another {flag}."
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {folder} cannot be written: no write permission in {probe}; choose another {flag}.")


def resume_differences(stored: Any, cfg: TrainConfig) -> list[str]:
    """The `RESUME_FIELDS` in which ``cfg`` differs from a run's stored config (a mapping), as ``key: old -> new``."""
    from perl.config import config_to_dict

    new = config_to_dict(cfg)
    out = []
    for key in RESUME_FIELDS:
        section, name = key.split(".")
        old_section = stored.get(section) if isinstance(stored, dict) else None
        if not isinstance(old_section, dict) or name not in old_section:
            continue  # note: a field an older version did not write cannot be compared
        old, now = old_section[name], new[section][name]
        if old != now:
            out.append(f"{key}: {old!r} -> {now!r}")
    return out


def _check_resume_config(cfg: TrainConfig, out: Path) -> None:
    from perl.config import read_yaml_file

    stored_path = out / "config.yaml"
    if not stored_path.is_file():
        return
    stored = read_yaml_file(stored_path, "the run's config", f"fix or remove {stored_path}")
    diff = resume_differences(stored, cfg)
    if diff:
        raise ConfigError(
            f"resuming {out} with a config that changes what its stored data means ({'; '.join(diff)}); "
            "resume with the run's own settings (--config " + str(stored_path) + "), or start a new run "
            "in another --config.training.output_dir."
        )


def check_machine(cfg: TrainConfig) -> None:
    """Refuse options this machine cannot honour: bf16 without a GPU that has it, vLLM without vllm
    or a GPU, a logger in ``training.report_to`` that is not installed."""
    import importlib.util

    t = cfg.training
    cuda = _cuda_available()
    if t.bf16:
        if not cuda:
            raise ConfigError(
                "training.bf16 is true but this machine has no GPU; set --config.training.bf16 none "
                "(mixed precision follows the model dtype) or false."
            )
        import torch

        if not torch.cuda.is_bf16_supported():
            raise ConfigError("training.bf16 is true but this GPU does not support bfloat16; set it to false.")
    if t.use_vllm:
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "training.use_vllm is true but vllm is not installed; pip install vllm (GPU only) "
                "or set --config.training.use_vllm false."
            )
        if not cuda:
            raise ConfigError(
                "training.use_vllm is true but this machine has no GPU; set --config.training.use_vllm false."
            )
    loggers = [name for name in t.report_to if name not in ("none", "all")]
    if loggers:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from transformers.integrations.integration_utils import (
                INTEGRATION_TO_CALLBACK,
                get_available_reporting_integrations,
            )

            available = set(get_available_reporting_integrations())
        for name in loggers:
            if name not in INTEGRATION_TO_CALLBACK:
                known = ", ".join(sorted(INTEGRATION_TO_CALLBACK))
                raise ConfigError(
                    f"training.report_to names {name!r}, which is not a logger transformers knows "
                    f"({known}); use one of them or none."
                )
            if name not in available:
                raise ConfigError(
                    f"training.report_to names {name!r}, which is not installed; pip install it "
                    f"or set --config.training.report_to none."
                )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_adapter_fits(model: Any, cfg: TrainConfig) -> None:
    """Refuse target modules that match no linear layer of ``model`` and a rank larger than a layer it adapts.

    Matching follows PEFT (a module name equal to a target or ending in ``.<target>``). Runs on the
    base model in memory, before the adapter is built: an r of 100000 on a 128-wide layer would
    otherwise allocate gigabytes before failing.
    """
    p = cfg.peft
    if p.type in ("full", "layernorm"):
        return
    targets = list(p.target_modules)
    dims: dict[str, int] = {}
    linear_names = set()
    for name, module in model.named_modules():
        shape = _linear_shape(module)
        if shape is None:
            continue
        linear_names.add(name.rsplit(".", 1)[-1])
        if any(name == t or name.endswith("." + t) for t in targets):
            dims[name] = min(shape)
    if not dims:
        have = ", ".join(sorted(linear_names)[:12]) or "none"
        raise ConfigError(
            f"peft.target_modules ({','.join(targets)}) match no linear layer of "
            f"{cfg.model.model_name_or_path} (its linear layers are named {have}); "
            "set --config.peft.target_modules to some of those."
        )
    if p.type not in _RANKED:
        return
    rank, key = (p.init_r, "peft.init_r") if p.type == "adalora" else (p.r, "peft.r")
    smallest_name = min(dims, key=dims.get)
    smallest = dims[smallest_name]
    if rank > smallest:
        raise ConfigError(
            f"{key} ({rank}) exceeds the smallest dimension of the layers it adapts "
            f"({smallest}, {smallest_name}); a rank above it adds nothing but memory, so "
            f"choose {key} <= {smallest}."
        )


def _linear_shape(module: Any) -> Optional[tuple[int, int]]:
    weight = getattr(module, "weight", None)
    in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(in_f, int) and isinstance(out_f, int):
        return in_f, out_f
    if type(module).__name__ == "Conv1D" and weight is not None and getattr(weight, "ndim", 0) == 2:
        return tuple(weight.shape)  # note: GPT-2 style Conv1D keeps (in, out)
    return None


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
    """Check what `validate` cannot: folders, the model and the dataset exist, the machine can
    honour the options; nothing is written (except putting back a previous run that a killed
    overwrite left aside, see `perl.rundir`).

    Raises:
        ConfigError: a folder another training holds (its pid named), an output directory that
            holds an earlier run (unless resuming or overwrite_output_dir) or cannot be created, a
            missing checkpoint, a resume that changes what the stored data means, a model or
            dataset that is not there, an option this machine cannot honour.
    """
    from perl.rundir import RunFolderLocked, RunLock, lock_holder, recover_interrupted_overwrite

    validate(cfg)
    # note: under `accelerate launch` rank 0 may already have written config.yaml when another rank
    # gets here; rank 0 alone judges the folder (if it refuses, the launcher stops the others).
    if _is_rank_zero():
        out = Path(cfg.training.output_dir).expanduser()
        tracking = Path(cfg.tracker.tracking_output_dir or out).expanduser()
        holder = lock_holder(out)
        if holder is not None:
            raise RunFolderLocked(RunLock(out).refusal(holder))
        # note: a training killed mid-overwrite left the previous run aside; put it back before judging
        for folder in recover_interrupted_overwrite([out, tracking], lock_folder=out):
            logging.getLogger("perl").warning(
                "restored the previous run in %s, which an interrupted overwrite had moved aside.", folder
            )
        check_output_dir(cfg)
        check_folder_writable(out, "output directory", "--config.training.output_dir")
        if tracking != out:
            check_folder_writable(tracking, "tracking directory", "--tracking_output_dir")
    with warnings.catch_warnings():
        # note: import-time warnings of transformers would break the one-line error contract
        warnings.simplefilter("ignore")
        _resolve("perl.models.loading", "resolve_model_path", cfg.model.model_name_or_path)
        _resolve("perl.data.datasets", "resolve_dataset_source", cfg.dataset.dataset_name_or_path)
    check_machine(cfg)
    return cfg
