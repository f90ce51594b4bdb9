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

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

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

# note: the largest config file we agree to read; a real one is a few kB, so anything bigger is
# almost surely the wrong file (or a hostile one) and is refused before YAML sees it.
MAX_CONFIG_BYTES = 1_000_000
# note: the offline generator verifies every problem (a few ms each on a CPU); beyond this many a
# run would spend longer generating than training, so larger data sets come from a file.
MAX_GENERATED_PROBLEMS = 100_000


# note: PyYAML shares the object of an anchor between its aliases, so a 1 kB "billion laughs"
# file loads into a small graph that explodes the moment anything walks it (validation, deepcopy,
# yaml.dump into a store's attributes, an error message). The composer therefore counts every node
# as the reader will see it, aliases expanded, and refuses past a fixed size; and it refuses
# nesting past a fixed depth before Python's recursion limit turns it into a 3000-line traceback.
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64


class YAMLBoundsError(yaml.YAMLError):
    """A YAML document whose aliases expand beyond `MAX_YAML_NODES` or that nests beyond `MAX_YAML_DEPTH`."""

    def __init__(self, problem: str, mark=None):
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


class _Loader(yaml.SafeLoader):
    """safe_load plus YAML 1.2 floats (PyYAML alone reads `5e-4`, no dot, as a string), bounded
    in expanded size and nesting depth (see `MAX_YAML_NODES`, `MAX_YAML_DEPTH`)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise YAMLBoundsError(f"nesting deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = self._sizes.get(id(node))
        if size is None:
            size = 1
            if isinstance(node, yaml.SequenceNode):
                size += sum(self._sizes.get(id(child), 1) for child in node.value)
            elif isinstance(node, yaml.MappingNode):
                size += sum(self._sizes.get(id(k), 1) + self._sizes.get(id(v), 1) for k, v in node.value)
            if size > MAX_YAML_NODES:
                raise YAMLBoundsError(
                    f"more than {MAX_YAML_NODES} values once its aliases (*name) are expanded", node.start_mark
                )
            self._sizes[id(node)] = size
        return node


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    """YAML text -> Python values with the bounded safe loader (aliases and depth bounded)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass




class ConfigError(ValueError):
    """A configuration mistake a user can fix; the message is one sentence that says how."""


def _f(default: Any, help: str, **constraints: Any) -> Any:
    """A dataclass field with a help text and optional constraints.

    Constraints are read by `validate`: ``choices`` (allowed values), and bounds ``ge``, ``gt``,
    ``le``, ``lt`` for numbers. Mutable defaults (lists) are copied per instance.
    """
    metadata = {"help": help, **constraints}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


PEFT_TYPES = (
    "lora", "dora", "adalora", "pissa", "milora", "milora_plus", "lora_plus", "rslora", "lorafa",
    "vera", "ia3", "layernorm", "miss", "hra", "slicefine", "full",
)
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# note: the installed TRL (1.16) accepts exactly these; `luspo` additionally needs
# importance_sampling_level="sequence", checked in `validate`.
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
# note: transformers' SchedulerType minus those that need an eval loop (reduce_lr_on_plateau)
# or are not schedules (greedy); tests check this list against the installed transformers.
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
)


@dataclass
class CommonConfig:
    """Settings shared by every part of a run.

    Usage:
        >>> CommonConfig(seed=0)

    Args:
        seed (`int`, defaults to 42): seed of the trainer (weights of new adapters, sampling).
        debug (`bool`, defaults to False): verbose logging.
    """

    seed: int = _f(42, "Random seed of the run (adapter initialisation, sampling, data order).", ge=0, le=2**32 - 1)
    debug: bool = _f(False, "Debug mode: verbose logging.")


@dataclass
class ModelConfig:
    """Which base model to load and how.

    Usage:
        >>> ModelConfig(model_name_or_path="/models/qwen", dtype="bfloat16")

    Args:
        model_name_or_path (`str`, defaults to "countdown-nano"): the embedded model, a local
            directory, or a Hugging Face hub id already in the local cache (never downloaded).
        dtype (`str`, defaults to "auto"): auto = float32 on CPU, bfloat16 on GPU.
        attn_implementation (`str`, defaults to "sdpa"): flash_attention_2 falls back to sdpa.
    """

    model_name_or_path: str = _f(
        "countdown-nano",
        "Base model: 'countdown-nano' (embedded), a local directory, or a hub id in the local cache.",
    )
    dtype: str = _f(
        "auto",
        "Weight dtype; auto = float32 on CPU, bfloat16 on GPU.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    attn_implementation: str = _f(
        "sdpa",
        "Attention kernel; flash_attention_2 falls back to sdpa when flash-attn or a GPU is missing.",
        choices=("flash_attention_2", "sdpa", "eager"),
    )


@dataclass
class PeftConfig:
    """Which adapter to train, with the knobs of every method.

    Usage:
        >>> PeftConfig(type="dora", r=16, lora_alpha=32)

    Args:
        type (`str`, defaults to "lora"): one of `PEFT_TYPES`; "full" trains the whole model.
        r (`int`, defaults to 8): adapter rank (VeRA, MiSS: their rank; AdaLoRA uses init_r).
        lora_alpha (`int`, defaults to 16): scaling numerator, s = alpha / r (alpha / sqrt(r) for rsLoRA).
        lora_dropout (`float`, defaults to 0.0): dropout on the adapter input, in [0, 1).
        target_modules (`list[str]`): module names to adapt.
        The remaining fields belong to one method each; their help names the method.
    """

    type: str = _f(
        "lora",
        "Adapter method; 'full' means full fine-tuning without an adapter.",
        choices=PEFT_TYPES,
    )
    r: int = _f(8, "Adapter rank r (also VeRA's and MiSS's rank).", ge=1)
    lora_alpha: int = _f(16, "Scaling numerator alpha: s = alpha/r (alpha/sqrt(r) for rslora).", gt=0)
    lora_dropout: float = _f(0.0, "Dropout probability on the adapter input, in [0, 1).", ge=0.0, lt=1.0)
    target_modules: list[str] = _f(
        DEFAULT_TARGET_MODULES,
        "Module names to adapt (comma separated on the command line).",
    )
    loraplus_lr_ratio: float = _f(
        16.0, "lora_plus: learning rate of B divided by that of A.", gt=0.0
    )
    loraplus_lr_embedding: float = _f(
        1e-6, "lora_plus: learning rate of adapted embedding layers.", gt=0.0
    )
    pissa_niter: int = _f(
        0,
        "pissa: 0 = exact SVD of each target weight; N > 0 = fast randomized SVD with N subspace iterations.",
        ge=0,
    )
    init_r: int = _f(12, "adalora: initial rank of every adapted module before budget pruning.", ge=1)
    target_r: int = _f(8, "adalora: average rank per module that the budget shrinks to.", ge=1)
    tinit: int = _f(0, "adalora: warm-up steps before the rank budget starts to shrink.", ge=0)
    tfinal: int = _f(0, "adalora: final steps with the rank budget held fixed.", ge=0)
    deltaT: int = _f(1, "adalora: steps between two budget reallocations.", ge=1)
    beta1: float = _f(0.85, "adalora: EMA coefficient of the sensitivity (importance) estimate.", gt=0.0, lt=1.0)
    beta2: float = _f(0.85, "adalora: EMA coefficient of the uncertainty estimate.", gt=0.0, lt=1.0)
    orth_reg_weight: float = _f(0.5, "adalora: weight of the orthogonality regulariser on P and Q.", ge=0.0)
    vera_d_initial: float = _f(0.1, "vera: initial value of the scaling vector d.", gt=0.0)
    projection_prng_key: int = _f(0, "vera: seed of the shared frozen random projections.", ge=0)
    feedforward_modules: Optional[list[str]] = _f(
        None,
        "ia3: which target modules are feed-forward (scaled at the input); none = those named like an MLP.",
    )
    ln_target_modules: Optional[list[str]] = _f(
        None, "layernorm: norm modules to tune; none = every normalisation layer of the model."
    )
    miss_init: str = _f(
        "balance", "miss: initialisation variant (balance, bat or mini).", choices=("balance", "bat", "mini")
    )
    miss_mini_r: int = _f(1, "miss: size of the shared shard (r must be divisible by it).", ge=1)
    slicefine_mode: str = _f(
        "column", "slicefine: train r columns (input features) or r rows (output features) of each weight.",
        choices=("column", "row"),
    )
    slicefine_position: int = _f(0, "slicefine: first column / row of the trainable slice.", ge=0)


@dataclass
class TrainingConfig:
    """The GRPO run: optimisation, rollouts, logging, saving.

    Fields that `trl.GRPOConfig` has keep its names and meaning and reach it through
    `to_grpo_kwargs`; ``overwrite_output_dir``, ``max_prompt_length`` and ``warmup_ratio`` are
    ours (the installed TRL/transformers no longer have them) and are honoured by the CLI, the
    data pipeline and `to_grpo_kwargs` respectively.

    Usage:
        >>> TrainingConfig(output_dir="runs/dora-r16", max_steps=50)

    Args:
        learning_rate (`float`), max_steps (`int`), max_completion_length (`int`): the demo's
            values (see the DEMO marks below); real models want smaller rates and longer completions.
        output_dir (`str`, defaults to "runs/demo"): the run folder.
        resume_from_checkpoint (`str | None`): None, "true" (latest checkpoint) or a path.
        Every field's help text says the rest.
    """

    # --- DEMO: tuned for the embedded model on a 2-core CPU (measured: 300 steps in 5.6 min, the
    # correct-equation reward rising from 0.23 to 0.33); change these for real models.
    learning_rate: float = _f(5e-4, "Peak learning rate of AdamW.", gt=0.0)
    max_steps: int = _f(300, "Optimizer steps to run; -1 = run num_train_epochs instead.")
    max_completion_length: int = _f(64, "Maximum number of generated tokens per completion.", ge=1)
    per_device_train_batch_size: int = _f(
        64, "Completions per device per micro-batch; times accumulation, divisible by num_generations "
        "(64 = 8 prompts x 8 completions: fewer prompts per step make the reward too noisy to learn from).", ge=1
    )
    # --- end DEMO

    output_dir: str = _f("runs/demo", "Run folder: config.yaml, metrics, checkpoints, tracking data.")
    run_name: Optional[str] = _f(None, "Name of the run in loggers; none = the output directory.")
    resume_from_checkpoint: Optional[str] = _f(
        None, "Resume: none (fresh run), 'true' (latest checkpoint in output_dir) or a checkpoint path."
    )
    overwrite_output_dir: bool = _f(
        False, "Allow writing into an output directory that already holds a run."
    )
    max_prompt_length: Optional[int] = _f(
        None, "Drop dataset prompts longer than this many tokens; none = keep all.", ge=1
    )
    num_generations: int = _f(8, "Completions sampled per prompt (the GRPO group size).", ge=2)
    gradient_accumulation_steps: int = _f(1, "Micro-batches accumulated per optimizer step.", ge=1)
    num_train_epochs: float = _f(1.0, "Epochs over the dataset when max_steps is -1.", gt=0.0)
    num_iterations: int = _f(1, "Optimisation passes per generated batch (GRPO's mu).", ge=1)
    loss_type: str = _f("dapo", "GRPO loss aggregation.", choices=LOSS_TYPES)
    importance_sampling_level: str = _f(
        "token", "Importance ratio per token or per sequence (GSPO); luspo needs 'sequence'.",
        choices=("token", "sequence"),
    )
    scale_rewards: str = _f(
        "group", "Advantage scaling: by the group's std, the batch's std, or none (Dr. GRPO).",
        choices=("group", "batch", "none"),
    )
    beta: float = _f(0.0, "KL coefficient; 0 = no reference model is loaded.", ge=0.0)
    epsilon: float = _f(0.2, "Lower clipping bound of the importance ratio.", gt=0.0)
    epsilon_high: Optional[float] = _f(
        0.28, "Upper clipping bound (DAPO's clip-higher); none = same as epsilon.", gt=0.0
    )
    mask_truncated_completions: bool = _f(
        False, "Exclude completions cut at max_completion_length from the loss."
    )
    temperature: float = _f(1.0, "Sampling temperature of the rollouts.", gt=0.0)
    top_p: float = _f(1.0, "Nucleus sampling mass, in (0, 1].", gt=0.0, le=1.0)
    top_k: int = _f(0, "Top-k sampling; 0 = disabled.", ge=0)
    generation_kwargs: Optional[dict] = _f(
        None, "Extra keyword arguments of the generation config (YAML mapping)."
    )
    lr_scheduler_type: str = _f("constant", "Learning-rate schedule.", choices=LR_SCHEDULERS)
    lr_scheduler_kwargs: Optional[dict] = _f(
        None, "Extra arguments of the schedule, e.g. {min_lr: 1e-6} for cosine_with_min_lr (YAML mapping)."
    )
    warmup_ratio: float = _f(0.0, "Fraction of the steps spent in linear warm-up, in [0, 1).", ge=0.0, lt=1.0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 = no clipping.", ge=0.0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge=0.0)
    logging_steps: int = _f(1, "Log training metrics every N optimizer steps.", ge=1)
    logging_first_step: bool = _f(True, "Also log the first optimizer step.")
    log_completions: bool = _f(False, "Print a table of sampled completions at each log step.")
    save_strategy: str = _f(
        "no", "When to write checkpoints: no, every save_steps steps, or each epoch.",
        choices=("no", "steps", "epoch"),
    )
    save_steps: int = _f(100, "Write a checkpoint every N optimizer steps (save_strategy=steps).", ge=1)
    save_total_limit: Optional[int] = _f(None, "Keep only the N newest checkpoints; none = keep all.", ge=1)
    report_to: list[str] = _f(["none"], "Experiment loggers (e.g. tensorboard, wandb); none = no logger.")
    use_vllm: bool = _f(False, "Generate rollouts with vLLM (GPU only; needs vllm installed).")
    vllm_mode: str = _f(
        "colocate", "vLLM in the training process (colocate) or a separate `trl vllm-serve` (server).",
        choices=("colocate", "server"),
    )
    vllm_gpu_memory_utilization: float = _f(
        0.3, "colocate vLLM: fraction of GPU memory it may take.", gt=0.0, le=1.0
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    bf16: Optional[bool] = _f(None, "bfloat16 mixed precision; none = on exactly when the model dtype is bfloat16.")
    dataloader_num_workers: int = _f(0, "Worker processes of the data loader.", ge=0)

    def to_grpo_kwargs(self) -> dict[str, Any]:
        """This section's keyword arguments for `trl.GRPOConfig` (see `_training_grpo_kwargs`).

        ``bf16=None`` is passed as None (TRL then turns it on unless fp16 is set); the module
        function `to_grpo_kwargs(cfg)` also sets ``seed`` and resolves ``bf16`` from the model dtype.
        """
        return _training_grpo_kwargs(self)


@dataclass
class DatasetConfig:
    """Where the Countdown problems come from.

    Usage:
        >>> DatasetConfig(dataset_name_or_path="Jiayi-Pan/Countdown-Tasks-3to4", example_numbers=5000)

    Args:
        dataset_name_or_path (`str`, defaults to "countdown-generated"): the offline generator,
            a hub id in the local cache, or a local parquet/json/jsonl file with `nums` and `target`.
        example_numbers (`int | None`, defaults to 2000): training problems; test_size more are held out.
        The generator's knobs are read only for "countdown-generated".
    """

    dataset_name_or_path: str = _f(
        "countdown-generated",
        "'countdown-generated' (offline generator), a hub id in the local cache, or a parquet/json/jsonl file.",
    )
    example_numbers: Optional[int] = _f(
        2000, "Number of training problems; none = every row of a file or hub dataset.", ge=1
    )
    test_size: int = _f(200, "Problems held out for evaluation, in addition to the training problems.", ge=0)
    min_numbers: int = _f(3, "Generator: fewest numbers in a problem.", ge=2)
    # note: 3 by default: countdown-nano solves about a third of 3-number problems under sampling
    # (room for RL), but almost no 4-number ones, which would give GRPO no signal on a CPU
    max_numbers: int = _f(3, "Generator: most numbers in a problem (the hub data set has 3 and 4).", ge=2, le=5)
    max_number: int = _f(100, "Generator: largest number drawn.", ge=1)
    max_target: int = _f(1000, "Generator: largest target.", ge=1)
    seed: int = _f(0, "Seed of the generator and of the train/test split.", ge=0, le=2**32 - 1)


@dataclass
class TrackerConfig:
    """What the spectral, gradient and alignment trackers record (see TRACKING.md).

    Usage:
        >>> TrackerConfig(enable_spectral_tracking=True, spectral_log_frequency=10)

    Args:
        enable_spectral_tracking (`bool`, defaults to False), enable_gradient_tracking (`bool`,
            defaults to False), spectral_log_frequency (`int`, 100), gradient_log_frequency
            (`int`, 100), track_adapter_only (`bool`, True), compute_full_svd (`bool`, True),
            max_layers_to_track (`int | None`, None), save_with_checkpoints (`bool`, True),
            tracking_output_dir (`str | None`, None): the nine options of the tracking docs.
        top_k_singular_values (`int`, defaults to 8): singular values kept when
            compute_full_svd is False.
        enable_alignment_tracking (`bool`, False), alignment_log_frequency (`int`, 100).
    """

    enable_spectral_tracking: bool = _f(False, "Enable spectral analysis of adapter weights.")
    enable_gradient_tracking: bool = _f(False, "Enable gradient flow tracking.")
    spectral_log_frequency: int = _f(100, "Log spectral metrics every N steps.", ge=1)
    gradient_log_frequency: int = _f(100, "Log gradient norms every N steps.", ge=1)
    track_adapter_only: bool = _f(True, "Only track adapter parameters.")
    compute_full_svd: bool = _f(True, "Compute the full spectrum (false = the top_k_singular_values largest).")
    max_layers_to_track: Optional[int] = _f(None, "Limit the layers tracked; none = all.", ge=1)
    save_with_checkpoints: bool = _f(True, "Save tracking data with checkpoints.")
    tracking_output_dir: Optional[str] = _f(None, "Custom output directory for tracking data; none = output_dir.")
    top_k_singular_values: int = _f(8, "Singular values kept when compute_full_svd is false.", ge=1)
    enable_alignment_tracking: bool = _f(False, "Enable alignment tracking of adapter subspaces.")
    alignment_log_frequency: int = _f(100, "Log alignment metrics every N steps.", ge=1)
    alignment_top_k: Optional[int] = _f(
        None, "Size k of the base weight's top and bottom singular subspaces; none = 2r.", ge=1
    )
    intruder_log_frequency: Optional[int] = _f(
        None,
        "Count intruder dimensions every N steps (a dense SVD per module); none = 10 x alignment_log_frequency, "
        "0 = only at the end.",
        ge=0,
    )
    intruder_epsilon: float = _f(
        0.5, "A tuned singular vector is an intruder when its largest |cosine| with the base's is below this.",
        gt=0.0, lt=1.0,
    )


@dataclass
class TrainConfig:
    """The whole run: six sections, each a dataclass.

    Usage:
        >>> cfg = TrainConfig()
        >>> cfg.peft.type = "dora"
        >>> from perl.train import train; train(cfg)

    Args:
        common (`CommonConfig`), model (`ModelConfig`), peft (`PeftConfig`),
        training (`TrainingConfig`), dataset (`DatasetConfig`), tracker (`TrackerConfig`).
    """

    common: CommonConfig = field(default_factory=CommonConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)



SECTIONS: dict[str, type] = {
    "common": CommonConfig,
    "model": ModelConfig,
    "peft": PeftConfig,
    "training": TrainingConfig,
    "dataset": DatasetConfig,
    "tracker": TrackerConfig,
}


# ---------------------------------------------------------------------------------------------
# Types: every field's declared type, and parsing a value into it.

def field_type(section_cls: type, name: str) -> Any:
    """The declared (resolved) type of field ``name`` of a section dataclass."""
    return typing.get_type_hints(section_cls)[name]


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for ``X | None`` / ``Optional[X]``; (tp, False) otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _describe(tp: Any) -> str:
    base = typing.get_origin(tp) or tp
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        list: "a list (comma separated or a YAML list)",
        dict: "a YAML mapping such as {key: value}",
    }.get(base, str(tp))


class _BadValue(Exception):
    """Internal: a value that does not fit its type (turned into a ConfigError with the key)."""


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_scalar(value: Any, tp: Any, from_text: bool) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _BadValue
    if tp is int:
        if isinstance(value, bool):
            raise _BadValue
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise _BadValue from None
        raise _BadValue
    if tp is float:
        if isinstance(value, bool):
            raise _BadValue
        if isinstance(value, (int, float)):
            result = float(value)
        elif isinstance(value, str):
            try:
                result = float(value.strip())
            except ValueError:
                raise _BadValue from None
        else:
            raise _BadValue
        if not math.isfinite(result):
            raise _BadValue
        return result
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML `resume_from_checkpoint: true`
            return "true" if value else "false"
        if isinstance(value, (int, float)) and not from_text:
            return str(value)
        raise _BadValue
    raise _BadValue


def _parse_value(value: Any, tp: Any, from_text: bool = True) -> Any:
    """Convert ``value`` to the declared type ``tp``.

    Args:
        value: a command-line string (``from_text=True``) or a value read by YAML.
        tp: the field's declared type: int, float, bool, str, list[X], dict, or Optional of those.
        from_text (`bool`, defaults to True): on the command line "none"/"null" mean None for
            Optional fields; in YAML only `null` does, so a string "none" round-trips.

    Raises:
        _BadValue (internal) when the value does not fit; callers turn it into a ConfigError.
    """
    inner, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise _BadValue
    if optional and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        if from_text or inner is not str:
            return None
    origin = typing.get_origin(inner) or inner
    if origin is list:
        (item_tp,) = typing.get_args(inner) or (str,)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith(("[", "{")):
                try:
                    value = _yaml_load(text)
                except yaml.YAMLError:
                    raise _BadValue from None
                if not isinstance(value, list):
                    raise _BadValue
            else:
                value = [item.strip() for item in text.split(",") if item.strip()]
        if not isinstance(value, list):
            raise _BadValue
        return [_parse_scalar(item, item_tp, from_text) for item in value]
    if origin is dict:
        if isinstance(value, str):
            try:
                value = _yaml_load(value)
            except yaml.YAMLError:
                raise _BadValue from None
        if not isinstance(value, dict):
            raise _BadValue
        return {str(k): v for k, v in value.items()}
    return _parse_scalar(value, inner, from_text)


def _coerce(section: str, name: str, value: Any, from_text: bool) -> Any:
    tp = field_type(SECTIONS[section], name)
    try:
        return _parse_value(value, tp, from_text=from_text)
    except _BadValue:
        inner, optional = unwrap_optional(tp)
        expected = _describe(inner) + (" or none" if optional else "")
        raise ConfigError(
            f"{section}.{name} expects {expected}, got {_short(value)}."
        ) from None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Keys: finding a field by its dotted name, with a suggestion when it is mistyped.

def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_key(section: str, name: Optional[str]) -> None:
    if section not in SECTIONS:
        hint = _suggest(section, list(SECTIONS)) or f"; sections are {', '.join(SECTIONS)}."
        raise ConfigError(f"unknown config section '{section}'{hint}")
    if name is None:
        return
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if name not in names:
        key = f"{section}.{name}"
        hint = _suggest(key, _all_keys()) or _suggest(name, names)
        if not hint:
            hint = f"; valid keys of '{section}' are {', '.join(names)}."
        raise ConfigError(f"unknown config key '{key}'{hint}")


# ---------------------------------------------------------------------------------------------
# Building, loading, overriding, dumping.

def config_from_dict(data: Optional[Mapping[str, Any]], source: str = "config") -> TrainConfig:
    """Build a `TrainConfig` from a nested mapping ``{section: {field: value}}``.

    Missing sections and fields keep their defaults; values are converted to the declared types
    (YAML rules: only `null` is None). Unknown sections or keys raise `ConfigError`.
    """
    cfg = TrainConfig()
    if data is None:
        return cfg
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source} must be a mapping of sections ({', '.join(SECTIONS)}), not {type(data).__name__}."
        )
    for section, values in data.items():
        section = str(section)
        _check_key(section, None)
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"section '{section}' of {source} must be a mapping of field: value, not {type(values).__name__}."
            )
        target = getattr(cfg, section)
        for name, value in values.items():
            name = str(name)
            _check_key(section, name)
            setattr(target, name, _coerce(section, name, value, from_text=False))
    return cfg


def read_yaml_file(path: Path, what: str, hint: str, error: type[ConfigError] = ConfigError) -> Any:
    """Read a user's YAML file safely; every way it can be wrong is one ``error`` sentence.

    Args:
        path (`Path`): the file.
        what (`str`): how messages name it, e.g. "config file".
        hint (`str`): what the user should do instead, e.g. "pass another --config".
        error (`type`): the `ConfigError` subclass to raise.
    """
    if not path.is_file():
        state = "is a directory, not a YAML file" if path.is_dir() else "does not exist"
        raise error(f"{what} {path} {state}; {hint}.")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise error(f"{what} {path} is larger than {MAX_CONFIG_BYTES} bytes; {hint}.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {what} {path} as UTF-8 text ({type(e).__name__}).") from None
    try:
        return _yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid syntax"
        raise error(f"malformed YAML in {what} {path}{where}: {problem}; fix the file or {hint}.") from None


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a YAML config file into a `TrainConfig` (structure and types checked, not ranges).

    Args:
        path: a YAML file with any subset of the sections, e.g. ``peft: {type: dora, r: 16}``.

    Raises:
        ConfigError: the file is missing, unreadable, malformed YAML, or has an unknown key.
    """
    p = Path(path)
    data = read_yaml_file(p, "config file", "pass another --config")
    return config_from_dict(data, source=f"config file {p}")


def apply_overrides(cfg: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """Return a copy of ``cfg`` with dotted overrides applied.

    Usage:
        >>> apply_overrides(TrainConfig(), {"peft.r": "16", "peft.target_modules": "q_proj,v_proj"})

    Args:
        cfg (`TrainConfig`): the config to start from (not modified).
        overrides (`Mapping[str, Any]`): ``"section.field" -> value``. Strings are parsed by the
            field's declared type: int, float, bool (true/false/1/0/yes/no), str, list (comma
            separated or a YAML list), dict (YAML), and "none"/"null" -> None for Optional fields.
            Other values (from Python) are converted the same way as YAML values.

    Raises:
        ConfigError: unknown key (with the closest one suggested) or a value of the wrong type.
    """
    out = copy.deepcopy(cfg)
    for key, value in overrides.items():
        parts = str(key).split(".")
        if len(parts) != 2:
            hint = _suggest(str(key), _all_keys()) or "."
            raise ConfigError(f"config key '{key}' must look like section.field (e.g. peft.r){hint}")
        section, name = parts
        _check_key(section, name)
        setattr(getattr(out, section), name, _coerce(section, name, value, from_text=isinstance(value, str)))
    return out


def config_to_dict(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """The config as plain nested dicts and lists (YAML- and JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: TrainConfig) -> str:
    """The config as YAML text that `load_config` reads back into an equal config."""
    header = "# perl TrainConfig; `perl train --config <this file>` reproduces the run.\n"
    return header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as YAML to ``path`` (parent folders created); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(to_yaml(cfg), encoding="utf-8")
    os.replace(tmp, p)  # note: a reader never sees half a config
    return p


# ---------------------------------------------------------------------------------------------
# Validation: ranges, choices, and the rules that join fields.

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
        raise ConfigError("alignment tracking measures an adapter's low-rank factors and full fine-tuning has none; "
                          "drop --enable_alignment_tracking (spectral and gradient tracking work for full).")
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
        raise ConfigError(f"dataset.min_numbers ({d.min_numbers}) must not exceed dataset.max_numbers ({d.max_numbers}).")
    if cfg.tracker.tracking_output_dir is not None and not cfg.tracker.tracking_output_dir.strip():
        raise ConfigError("tracker.tracking_output_dir is empty; use none (the output_dir) or a folder.")
    return cfg


def _world_size() -> int:
    # note: accelerate/torchrun export WORLD_SIZE; the GRPO batch must hold whole groups across them.
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


# ---------------------------------------------------------------------------------------------
# Handing over to TRL.

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
