"""Validating a config: ranges, choices, and the rules that join fields."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from perl.config.parsing import _coerce, _short, _suggest
from perl.config.schema import SECTIONS, ConfigError, TrainConfig

# note: the offline generator verifies every problem (a few ms each on a CPU); beyond this many a
# run would spend longer generating than training, so larger data sets come from a file.
MAX_GENERATED_PROBLEMS = 100_000


def _check_field(section: str, f: dataclasses.Field, value: Any) -> None:
    key = f"{section}.{f.name}"
    meta = f.metadata
    choices = meta.get("choices")
    if choices is not None and value is not None and value not in choices:
        hint = _suggest(str(value), list(choices))
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, not {_short(value)}{hint or '.'}")
    if value is None or isinstance(value, (bool, str, list, dict)):
        return
    for bound, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        if bound in meta and not ok(value, meta[bound]):
            raise ConfigError(f"{key} must be {word} {meta[bound]}, got {value}.")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every value and the rules between fields; return ``cfg``.

    Values set from Python are converted to their declared types on the way (``cfg.peft.r =
    "16"`` becomes 16), so a config that passes is exactly what `save_config` writes.

    Raises:
        ConfigError: the first problem found, in one sentence that says what to change.
    """
    if isinstance(getattr(cfg.peft, "type", None), str):
        # note: method names are case-insensitive (`IA3`, as the original PeRL spells it, is `ia3`)
        cfg.peft.type = cfg.peft.type.strip().lower()
    for section, cls in SECTIONS.items():
        obj = getattr(cfg, section)
        if not isinstance(obj, cls):
            raise ConfigError(f"config section '{section}' must be a {cls.__name__}.")
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            # note: re-parse so configs edited in Python (cfg.peft.r = "8") are type checked too.
            setattr(obj, f.name, _coerce(section, f.name, value, from_text=False))
            _check_field(section, f, getattr(obj, f.name))

    m, p, t, d = cfg.model, cfg.peft, cfg.training, cfg.dataset
    if t.max_steps < 1 and t.max_steps != -1:
        raise ConfigError(
            f"training.max_steps must be a positive number of steps, or -1 to run num_train_epochs, got {t.max_steps}."
        )
    if not m.model_name_or_path.strip():
        raise ConfigError("model.model_name_or_path is empty; name the embedded model, a directory or a hub id.")
    if not t.output_dir.strip():
        raise ConfigError("training.output_dir is empty; name the folder the run should be written to.")
    if not d.dataset_name_or_path.strip():
        raise ConfigError("dataset.dataset_name_or_path is empty; use countdown-generated, a hub id or a file.")
    if not p.target_modules or any(not name.strip() for name in p.target_modules):
        raise ConfigError("peft.target_modules must list at least one module name, e.g. q_proj,v_proj.")
    if p.target_r > p.init_r:
        raise ConfigError(f"peft.target_r ({p.target_r}) must not exceed peft.init_r ({p.init_r}).")
    if p.type == "adalora" and t.max_steps > 0 and p.tinit + p.tfinal >= t.max_steps:
        raise ConfigError(
            f"adalora needs peft.tinit + peft.tfinal ({p.tinit + p.tfinal}) below training.max_steps "
            f"({t.max_steps}) so that the rank budget has steps in which to move."
        )
    if p.type == "miss" and p.r % p.miss_mini_r:
        raise ConfigError(f"peft.r ({p.r}) must be divisible by peft.miss_mini_r ({p.miss_mini_r}) for miss.")
    if p.type == "hra" and p.r % 2:
        raise ConfigError(f"peft.r ({p.r}) must be even for hra: its identity init pairs the r reflections.")
    if p.type == "full" and cfg.tracker.enable_alignment_tracking:
        raise ConfigError(
            "alignment tracking measures an adapter's low-rank factors and full fine-tuning has none; "
            "drop --enable_alignment_tracking (spectral and gradient tracking work for full)."
        )
    if t.loss_type == "luspo" and t.importance_sampling_level != "sequence":
        raise ConfigError("loss_type luspo needs training.importance_sampling_level sequence.")
    world = _world_size()
    batch = t.per_device_train_batch_size * t.gradient_accumulation_steps * world
    if batch % t.num_generations:
        procs = f" x {world} processes" if world > 1 else ""
        raise ConfigError(
            f"per_device_train_batch_size x gradient_accumulation_steps{procs} ({batch}) must be divisible "
            f"by num_generations ({t.num_generations}); change one of them."
        )
    if t.resume_from_checkpoint is not None and not t.resume_from_checkpoint.strip():
        raise ConfigError("training.resume_from_checkpoint is empty; use none, true or a checkpoint path.")
    if d.dataset_name_or_path.strip() == "countdown-generated":
        wanted = (d.example_numbers or 0) + d.test_size
        if wanted > MAX_GENERATED_PROBLEMS:
            raise ConfigError(
                f"dataset.example_numbers + dataset.test_size ({wanted}) exceeds {MAX_GENERATED_PROBLEMS} "
                "generated problems, the most the offline generator makes in reasonable time; ask for fewer "
                "or use a dataset file."
            )
    if d.min_numbers > d.max_numbers:
        raise ConfigError(
            f"dataset.min_numbers ({d.min_numbers}) must not exceed dataset.max_numbers ({d.max_numbers})."
        )
    if cfg.tracker.tracking_output_dir is not None and not cfg.tracker.tracking_output_dir.strip():
        raise ConfigError("tracker.tracking_output_dir is empty; use none (the output_dir) or a folder.")
    return cfg


def _world_size() -> int:
    # note: accelerate/torchrun export WORLD_SIZE; the GRPO batch must hold whole groups across them.
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1
