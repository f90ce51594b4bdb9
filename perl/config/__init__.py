"""The run configuration: one dataclass per concern, filled from YAML and dotted overrides.

A `TrainConfig` has six sections that mirror PeRL's: ``common``, ``model``, ``peft``,
``training``, ``dataset`` and ``tracker``. Every field has a default that suits the embedded CPU
run and a help text (``metadata["help"]``) that the command line shows. The same dataclasses are
filled three ways, later ones winning: defaults, a YAML file, dotted overrides
(``{"peft.r": "16"}``, the ``--config.peft.r 16`` flags).

Usage:
    >>> from perl.config import load_config, apply_overrides, validate, save_config
    >>> cfg = apply_overrides(load_config("my.yaml"), {"peft.type": "dora", "peft.r": "16"})
    >>> validate(cfg)
    >>> save_config(cfg, "runs/x/config.yaml")   # `--config runs/x/config.yaml` reproduces it

Every user mistake (unknown key, wrong type, out-of-range value, malformed YAML) raises
`ConfigError`, a `ValueError` whose message is one sentence. This module imports no torch, so
the command line answers `--help` and refuses bad input at once.
"""

# note: split by concern (schema / parsing / validation / grpo); every name, and the private ones
# other modules and tests use, stays importable from `perl.config`.
from perl.config.grpo import OWN_TRAINING_FIELDS, _dtype_name, _training_grpo_kwargs, to_grpo_kwargs
from perl.config.parsing import (
    MAX_CONFIG_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    YAMLBoundsError,
    _check_key,
    _coerce,
    _parse_value,
    _short,
    _suggest,
    _yaml_load,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    read_yaml_file,
    save_config,
    to_yaml,
)
from perl.config.schema import (
    DEFAULT_TARGET_MODULES,
    LOSS_TYPES,
    LR_SCHEDULERS,
    PEFT_TYPES,
    SECTIONS,
    CommonConfig,
    ConfigError,
    DatasetConfig,
    ModelConfig,
    PeftConfig,
    TrackerConfig,
    TrainConfig,
    TrainingConfig,
    _describe,
    field_type,
    unwrap_optional,
)
from perl.config.validation import MAX_GENERATED_PROBLEMS, validate

__all__ = [
    "ConfigError",
    "read_yaml_file",
    "CommonConfig",
    "ModelConfig",
    "PeftConfig",
    "TrainingConfig",
    "DatasetConfig",
    "TrackerConfig",
    "TrainConfig",
    "PEFT_TYPES",
    "SECTIONS",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "validate",
    "to_yaml",
    "save_config",
    "to_grpo_kwargs",
    "field_type",
    "unwrap_optional",
]
