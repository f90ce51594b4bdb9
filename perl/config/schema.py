"""The config's schema: the sections (dataclasses), their defaults and help texts, `ConfigError`.

Every field has a default that suits the embedded CPU run and a help text (``metadata["help"]``)
that the command line shows; constraints in the metadata are checked by `perl.config.validate`.
"""

from __future__ import annotations

import copy
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional


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
    "lora",
    "dora",
    "adalora",
    "pissa",
    "milora",
    "milora_plus",
    "lora_plus",
    "rslora",
    "lorafa",
    "vera",
    "ia3",
    "layernorm",
    "miss",
    "hra",
    "slicefine",
    "full",
)
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# note: the installed TRL (1.16) accepts exactly these; `luspo` additionally needs
# importance_sampling_level="sequence", checked in `validate`.
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
# note: transformers' SchedulerType minus those that need an eval loop (reduce_lr_on_plateau)
# or are not schedules (greedy); tests check this list against the installed transformers.
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
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
    loraplus_lr_ratio: float = _f(16.0, "lora_plus: learning rate of B divided by that of A.", gt=0.0)
    loraplus_lr_embedding: float = _f(1e-6, "lora_plus: learning rate of adapted embedding layers.", gt=0.0)
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
        "column",
        "slicefine: train r columns (input features) or r rows (output features) of each weight.",
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
        64,
        "Completions per device per micro-batch; times accumulation, divisible by num_generations "
        "(64 = 8 prompts x 8 completions: fewer prompts per step make the reward too noisy to learn from).",
        ge=1,
    )
    # --- end DEMO

    output_dir: str = _f("runs/demo", "Run folder: config.yaml, metrics, checkpoints, tracking data.")
    run_name: Optional[str] = _f(None, "Name of the run in loggers; none = the output directory.")
    resume_from_checkpoint: Optional[str] = _f(
        None, "Resume: none (fresh run), 'true' (latest checkpoint in output_dir) or a checkpoint path."
    )
    overwrite_output_dir: bool = _f(False, "Allow writing into an output directory that already holds a run.")
    max_prompt_length: Optional[int] = _f(
        None, "Drop dataset prompts longer than this many tokens; none = keep all.", ge=1
    )
    num_generations: int = _f(8, "Completions sampled per prompt (the GRPO group size).", ge=2)
    gradient_accumulation_steps: int = _f(1, "Micro-batches accumulated per optimizer step.", ge=1)
    num_train_epochs: float = _f(1.0, "Epochs over the dataset when max_steps is -1.", gt=0.0)
    num_iterations: int = _f(1, "Optimisation passes per generated batch (GRPO's mu).", ge=1)
    loss_type: str = _f("dapo", "GRPO loss aggregation.", choices=LOSS_TYPES)
    importance_sampling_level: str = _f(
        "token",
        "Importance ratio per token or per sequence (GSPO); luspo needs 'sequence'.",
        choices=("token", "sequence"),
    )
    scale_rewards: str = _f(
        "group",
        "Advantage scaling: by the group's std, the batch's std, or none (Dr. GRPO).",
        choices=("group", "batch", "none"),
    )
    beta: float = _f(0.0, "KL coefficient; 0 = no reference model is loaded.", ge=0.0)
    epsilon: float = _f(0.2, "Lower clipping bound of the importance ratio.", gt=0.0)
    epsilon_high: Optional[float] = _f(
        0.28, "Upper clipping bound (DAPO's clip-higher); none = same as epsilon.", gt=0.0
    )
    mask_truncated_completions: bool = _f(False, "Exclude completions cut at max_completion_length from the loss.")
    temperature: float = _f(1.0, "Sampling temperature of the rollouts.", gt=0.0)
    top_p: float = _f(1.0, "Nucleus sampling mass, in (0, 1].", gt=0.0, le=1.0)
    top_k: int = _f(0, "Top-k sampling; 0 = disabled.", ge=0)
    generation_kwargs: Optional[dict] = _f(None, "Extra keyword arguments of the generation config (YAML mapping).")
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
        "no",
        "When to write checkpoints: no, every save_steps steps, or each epoch.",
        choices=("no", "steps", "epoch"),
    )
    save_steps: int = _f(100, "Write a checkpoint every N optimizer steps (save_strategy=steps).", ge=1)
    save_total_limit: Optional[int] = _f(None, "Keep only the N newest checkpoints; none = keep all.", ge=1)
    report_to: list[str] = _f(["none"], "Experiment loggers (e.g. tensorboard, wandb); none = no logger.")
    use_vllm: bool = _f(False, "Generate rollouts with vLLM (GPU only; needs vllm installed).")
    vllm_mode: str = _f(
        "colocate",
        "vLLM in the training process (colocate) or a separate `trl vllm-serve` (server).",
        choices=("colocate", "server"),
    )
    vllm_gpu_memory_utilization: float = _f(0.3, "colocate vLLM: fraction of GPU memory it may take.", gt=0.0, le=1.0)
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    bf16: Optional[bool] = _f(None, "bfloat16 mixed precision; none = on exactly when the model dtype is bfloat16.")
    dataloader_num_workers: int = _f(0, "Worker processes of the data loader.", ge=0)

    def to_grpo_kwargs(self) -> dict[str, Any]:
        """This section's keyword arguments for `trl.GRPOConfig` (see `_training_grpo_kwargs`).

        ``bf16=None`` is passed as None (TRL then turns it on unless fp16 is set); the module
        function `to_grpo_kwargs(cfg)` also sets ``seed`` and resolves ``bf16`` from the model dtype.
        """
        from perl.config.grpo import _training_grpo_kwargs  # note: grpo imports this module

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
        0.5,
        "A tuned singular vector is an intruder when its largest |cosine| with the base's is below this.",
        gt=0.0,
        lt=1.0,
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
