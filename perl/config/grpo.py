"""Handing a config over to TRL: the keyword arguments of `trl.GRPOConfig`."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional

from perl.config.schema import ConfigError, TrainConfig, TrainingConfig

# note: fields TRL 1.16 / transformers 5 do not have; each is honoured elsewhere (see TrainingConfig).
OWN_TRAINING_FIELDS = frozenset({"overwrite_output_dir", "max_prompt_length", "warmup_ratio"})


def _dtype_name(dtype: str, cuda_available: bool) -> str:
    """The dtype name a model is loaded in: "auto" is float32 on CPU and bfloat16 on GPU."""
    if dtype == "auto":
        return "bfloat16" if cuda_available else "float32"
    return dtype


def _training_grpo_kwargs(t: TrainingConfig) -> dict[str, Any]:
    """Every `TrainingConfig` field that GRPOConfig has, under its own name, plus the renames.

    ``warmup_ratio`` becomes transformers 5's fractional ``warmup_steps`` and
    ``gradient_checkpointing`` its new name ``activation_checkpointing``. Fields GRPOConfig lacks
    are never passed (the installed TRL would reject them): ours are honoured elsewhere, and any
    other one set away from its default raises `ConfigError`.
    """
    from trl import GRPOConfig  # note: lazy, this module must import fast

    grpo_fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    defaults = TrainingConfig()
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(TrainingConfig):
        if f.name in OWN_TRAINING_FIELDS:
            continue
        value = copy.deepcopy(getattr(t, f.name))
        if f.name not in grpo_fields:
            if value != getattr(defaults, f.name):
                raise ConfigError(
                    f"training.{f.name} is not supported by the installed trl; remove it from the config."
                )
            continue
        kwargs[f.name] = value
    if "activation_checkpointing" in grpo_fields:
        # note: transformers 5 renamed it and warns on the old name (TRL even defaults it to True)
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
    if t.warmup_ratio > 0:
        kwargs["warmup_steps"] = t.warmup_ratio  # transformers 5: a float in (0, 1) is a ratio
    if kwargs.get("lr_scheduler_kwargs") is None:
        kwargs.pop("lr_scheduler_kwargs", None)
    return kwargs


def to_grpo_kwargs(cfg: TrainConfig, cuda_available: Optional[bool] = None) -> dict[str, Any]:
    """Keyword arguments for `trl.GRPOConfig` built from the whole config.

    Usage:
        >>> from trl import GRPOConfig
        >>> args = GRPOConfig(**to_grpo_kwargs(cfg))

    The training section's fields (see `TrainingConfig.to_grpo_kwargs`), ``seed`` from
    ``common.seed``, and ``bf16=None`` resolved: on exactly when the model's dtype resolves to
    bfloat16 (so never on a CPU with dtype auto).

    Args:
        cfg (`TrainConfig`): a validated config.
        cuda_available (`bool`, optional): defaults to `torch.cuda.is_available()`.

    Raises:
        ConfigError: a field set away from its default that the installed TRL does not know.
    """
    kwargs = cfg.training.to_grpo_kwargs()
    kwargs["seed"] = cfg.common.seed
    if cfg.training.bf16 is None:
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        kwargs["bf16"] = _dtype_name(cfg.model.dtype, cuda_available) == "bfloat16"
    return kwargs
