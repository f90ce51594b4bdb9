"""The PEFT method registry: ``peft.type`` name -> a builder that wraps the model with that adapter.

Every builder returns an :class:`AdapterSetup`: the peft model (adapter name ``"default"``), an
optional optimizer factory (LoRA+, LoRA-FA), optional Trainer callbacks (AdaLoRA's allocator) and a
one-line description of what is adapted, which ``perl.train`` logs. Every method targets the
configured ``target_modules`` where the method can; where it cannot (LayerNorm tuning adapts norm
layers; IA3 scales the *input* of its feed-forward modules and the *output* of the others) the
description says what is targeted instead. There are no silent per-method defaults: each knob below
is a field of the ``peft`` config section and its value is in the description.

Config fields read (the ``peft`` section of ``perl.config``; read with ``getattr`` and the defaults
shown, so a config object without a knob still builds):

| field | used by | default |
|---|---|---|
| ``type``, ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules`` | all | required |
| ``loraplus_lr_ratio``, ``loraplus_lr_embedding`` | lora_plus | 16.0, 1e-6 |
| ``pissa_niter`` | pissa: 0 = exact SVD, n > 0 = ``svd_lowrank`` with n iterations | 0 |
| ``init_r``, ``target_r`` | adalora: initial rank, final average rank (``r`` is not used) | 12, 8 |
| ``tinit``, ``tfinal``, ``deltaT`` | adalora: warm-up / final steps, allocation interval (fitted to the run) | 0, 0, 1 |
| ``beta1``, ``beta2``, ``orth_reg_weight`` | adalora | 0.85, 0.85, 0.5 |
| ``vera_d_initial``, ``projection_prng_key`` | vera | 0.1, 0 |
| ``feedforward_modules`` | ia3: None = peft's per-architecture rule (Qwen2: down_proj), within the targets | None |
| ``ln_target_modules`` | layernorm: None = every normalisation layer of the model | None |
| ``miss_init``, ``miss_mini_r`` | miss: ``"balance"`` / ``"bat"`` / ``"mini"``; mini_r for ``"mini"`` | "balance", 1 |
| ``slicefine_mode``, ``slicefine_position`` | slicefine: ``"column"`` / ``"row"`` slice, its first index | "column", 0 |
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from perl.adapters.adalora import AdaLoraAllocatorCallback, fit_adalora_schedule
from perl.adapters.milora import apply_minor_init
from perl.adapters.optim import (
    OptimizerFactory,
    freeze_lora_A,
    lorafa_optimizer_factory,
    loraplus_optimizer_factory,
)
from perl.config.schema import PEFT_TYPES

logger = logging.getLogger("perl")

FULL_FINETUNING = "full"
# note: one list of method names, the config's; the registry below must have a builder for each
PEFT_METHODS: tuple[str, ...] = tuple(t for t in PEFT_TYPES if t != FULL_FINETUNING)
#: every value ``peft.type`` accepts: the fifteen adapters and ``"full"`` (no adapter, all weights train)
ALL_METHODS: tuple[str, ...] = PEFT_METHODS + (FULL_FINETUNING,)

ADAPTER_NAME = "default"
#: the methods built as peft LoRA (one builder): their update is s * B @ A with s = `lora_scaling`
LORA_FAMILY = ("lora", "dora", "pissa", "milora", "milora_plus", "lora_plus", "rslora", "lorafa")
MISS_INITS = {"balance": True, "bat": "bat", "mini": "mini"}


@dataclass
class AdapterSetup:
    """What :func:`build_adapter` hands to the trainer.

    Args:
        model (`nn.Module`): the model to train: a ``PeftModel`` with adapter ``"default"``, or the
            plain model for ``"full"``.
        optimizer_factory (`callable`, *optional*): ``(model, training_args) -> Optimizer`` for methods
            whose point is the optimizer (LoRA+, LoRA-FA); None = the Trainer's default AdamW.
        callbacks (`list[TrainerCallback]`): callbacks the method needs (AdaLoRA's rank allocator).
        description (`str`): one log line saying what is adapted and how.
        method (`str`): the ``peft.type`` this was built for.
    """

    model: nn.Module
    optimizer_factory: OptimizerFactory | None = None
    callbacks: list = field(default_factory=list)
    description: str = ""
    method: str = ""


def lora_scaling(method: str, lora_alpha: float, r: int | None) -> float:
    """``s`` in ``s * B @ A`` of the LoRA family: alpha/r, or alpha/sqrt(r) for rsLoRA; NaN for the other
    methods (AdaLoRA scales by alpha/ranknum per module; VeRA, IA3, LayerNorm tuning, MiSS not at all)."""
    if method not in LORA_FAMILY or not r:
        return float("nan")
    return lora_alpha / (r**0.5 if method == "rslora" else r)


def _knob(cfg, name, default):
    value = getattr(cfg, name, default)
    return default if value is None and default is not None else value


def _choice(cfg, name: str, default: str, choices) -> str:
    """The knob ``name``, which must be one of ``choices`` (listed in the error otherwise)."""
    value = str(_knob(cfg, name, default))
    if value not in choices:
        raise ValueError(f"peft.{name} must be one of {list(choices)}, got {value!r}")
    return value


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def matches_target(module_name: str, target: str) -> bool:
    """peft's rule for a ``target_modules`` list: the module path equals ``target`` or ends with ``.<target>``."""
    return module_name == target or module_name.endswith("." + target)


def resolve_target_modules(model: nn.Module, target_modules) -> list[str]:
    """The configured ``target_modules`` as a list, checked against the model.

    ``"all-linear"`` becomes the leaf names of every ``nn.Linear`` except the output head. A listed
    name that matches no module of the model is an error (peft would silently skip it).
    """
    if target_modules is None or (not isinstance(target_modules, str) and len(target_modules) == 0):
        raise ValueError(
            "peft.target_modules is empty; list the layers to adapt, e.g. "
            "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj], or 'all-linear'"
        )
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            raise ValueError(
                f"peft.target_modules {target_modules!r} is not a list of module names; "
                f"give a list such as [q_proj, v_proj] or the string 'all-linear'"
            )
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        leaves = {_leaf(n) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
        return sorted(leaves)
    targets = [str(t) for t in target_modules]
    missing = [t for t in targets if not any(matches_target(n, t) for n in names)]
    if missing:
        linear = sorted({_leaf(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"peft.target_modules {missing} match no module of the model; its Linear layers are {linear}")
    return targets


def _norm_module_names(model: nn.Module) -> list[str]:
    """Leaf names of every normalisation layer (LayerNorm, RMSNorm, ...) of the model."""
    leaves = set()
    for name, module in model.named_modules():
        cls = type(module).__name__
        if name and (isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or cls.endswith("Norm")):
            leaves.add(_leaf(name))
    return sorted(leaves)


def _param_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable {trainable:,} of {total:,} parameters ({100.0 * trainable / max(total, 1):.3f}%)"


def _targeted(peft_model) -> str:
    names = list(getattr(peft_model.base_model, "targeted_module_names", []))
    leaves = sorted({_leaf(n) for n in names})
    return f"{len(names)} modules ({', '.join(leaves)})"


def _wrapped(model, config, method: str, describe: Callable, callbacks=()) -> AdapterSetup:
    """``get_peft_model`` with adapter ``"default"``; the description is ``describe(peft_model)`` and the
    parameter count."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
    desc = f"{describe(peft_model)}; {_param_summary(peft_model)}"
    return AdapterSetup(peft_model, None, list(callbacks), desc, method)


# ----------------------------------------------------------------------------------------------
# builders: (model, cfg, targets, total_steps) -> AdapterSetup


def _lora_config(cfg, targets, **extra):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=int(cfg.r),
        lora_alpha=cfg.lora_alpha,
        lora_dropout=float(cfg.lora_dropout),
        target_modules=list(targets),
        **extra,
    )


def _lora_family(model, cfg, targets, total_steps) -> AdapterSetup:
    from peft import get_peft_model

    method = cfg.type
    extra, notes = {}, []
    factory = None
    niter = 0
    if method == "dora":
        extra["use_dora"] = True
        notes.append("DoRA: magnitude vector + LoRA direction")
    elif method == "rslora":
        extra["use_rslora"] = True
    elif method == "pissa":
        niter = int(_knob(cfg, "pissa_niter", 0))
        # note: exact SVD by default, so A, B are exactly the principal components and a reload redoes
        # them bit for bit; svd_lowrank is faster on big weights but only approximately principal.
        # Either way the residual is W - sBA of the A, B used, so step 0 reproduces the base model.
        extra["init_lora_weights"] = "pissa" if niter <= 0 else f"pissa_niter_{niter}"
        notes.append(
            "PiSSA init from the r largest singular triplets, base weight replaced by its residual "
            + ("(exact SVD)" if niter <= 0 else f"(randomised SVD, {niter} subspace iterations)")
        )
    if method == "pissa" and niter > 0:
        # note: svd_lowrank draws a random test matrix; a fixed seed makes the residual base reproducible,
        # so load_trained_adapter can rebuild it exactly
        with torch.random.fork_rng():
            torch.manual_seed(0)
            peft_model = get_peft_model(model, _lora_config(cfg, targets, **extra), adapter_name=ADAPTER_NAME)
    else:
        peft_model = get_peft_model(model, _lora_config(cfg, targets, **extra), adapter_name=ADAPTER_NAME)

    if method in ("milora", "milora_plus"):
        apply_minor_init(peft_model, method, ADAPTER_NAME)
        notes.append(
            "MiLoRA init from the r smallest singular triplets, base weight replaced by its residual (exact SVD)"
            if method == "milora"
            else "MiLoRA+ init: A = V_r^T of the r smallest singular values, B = 0, base weight unchanged"
        )
    elif method == "lora_plus":
        ratio = float(_knob(cfg, "loraplus_lr_ratio", 16.0))
        factory = loraplus_optimizer_factory(ratio, float(_knob(cfg, "loraplus_lr_embedding", 1e-6)))
        notes.append(f"LoRA+ optimizer: lr_B = {ratio:g} x lr_A")
    elif method == "lorafa":
        freeze_lora_A(peft_model)
        factory = lorafa_optimizer_factory(int(cfg.r), cfg.lora_alpha)
        notes.append("LoRA-FA: A frozen at its random init, B trained by peft's LoRA-FA optimizer")
    if method in ("pissa", "milora") and float(cfg.lora_dropout) > 0:
        notes.append(
            f"note: lora_dropout={cfg.lora_dropout} acts on the initial component, so the train-mode output "
            "differs from the base model's at step 0 (eval mode is exact)"
        )

    sqrt = method == "rslora"
    scaling = lora_scaling(method, cfg.lora_alpha, cfg.r)
    head = (
        f"{method}: r={cfg.r}, lora_alpha={cfg.lora_alpha}, scaling={'alpha/sqrt(r)' if sqrt else 'alpha/r'}"
        f"={scaling:g}, lora_dropout={cfg.lora_dropout}, on {_targeted(peft_model)}"
    )
    return AdapterSetup(peft_model, factory, [], "; ".join([head, *notes, _param_summary(peft_model)]), method)


def _adalora(model, cfg, targets, total_steps) -> AdapterSetup:
    from peft import AdaLoraConfig, TaskType

    init_r = int(_knob(cfg, "init_r", 12))
    target_r = int(_knob(cfg, "target_r", 8))
    if not 0 < target_r <= init_r:
        raise ValueError(f"peft.target_r must be in [1, init_r={init_r}] for adalora, got {target_r}")
    betas = (float(_knob(cfg, "beta1", 0.85)), float(_knob(cfg, "beta2", 0.85)))
    if not all(0.0 < b < 1.0 for b in betas):
        raise ValueError(f"peft.beta1 and peft.beta2 must be in (0, 1) for adalora, got {betas}")
    tinit, tfinal, delta_t, note = fit_adalora_schedule(
        int(total_steps), int(_knob(cfg, "tinit", 0)), int(_knob(cfg, "tfinal", 0)), int(_knob(cfg, "deltaT", 1))
    )
    orth = float(_knob(cfg, "orth_reg_weight", 0.5))
    config = AdaLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        init_r=init_r,
        target_r=target_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=float(cfg.lora_dropout),
        target_modules=list(targets),
        total_step=int(total_steps),
        tinit=tinit,
        tfinal=tfinal,
        deltaT=delta_t,
        beta1=betas[0],
        beta2=betas[1],
        orth_reg_weight=orth,
    )
    setup = _wrapped(
        model,
        config,
        "adalora",
        lambda peft_model: (
            f"adalora: P diag(E) Q, init_r={init_r} -> target_r={target_r} (average per module), "
            f"lora_alpha={cfg.lora_alpha} (scaling alpha/current rank), lora_dropout={cfg.lora_dropout}, on "
            f"{_targeted(peft_model)}; budget over total_step={total_steps}: tinit={tinit}, tfinal={tfinal}, "
            f"deltaT={delta_t}{note}, allocated after every optimizer step by AdaLoraAllocatorCallback; "
            f"orth_reg_weight={orth:g} acts only on a loss computed from labels, so not under GRPO"
        ),
    )
    setup.callbacks.append(AdaLoraAllocatorCallback(setup.model))
    return setup


def _vera(model, cfg, targets, total_steps) -> AdapterSetup:
    from peft import TaskType, VeraConfig

    d_initial = float(_knob(cfg, "vera_d_initial", 0.1))
    key = int(_knob(cfg, "projection_prng_key", 0))
    config = VeraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=int(cfg.r),
        target_modules=list(targets),
        vera_dropout=float(cfg.lora_dropout),
        d_initial=d_initial,
        projection_prng_key=key,
    )

    def describe(peft_model) -> str:
        in_dim = peft_model.base_model.vera_A[ADAPTER_NAME].shape[1]
        out_dim = peft_model.base_model.vera_B[ADAPTER_NAME].shape[0]
        return (
            f"vera: r={cfg.r} shared frozen random A, B (largest target shape in={in_dim}, out={out_dim}, sliced "
            f"per layer; prng key {key}), trained vectors lambda_b (zeros) and lambda_d (d_initial={d_initial:g}), "
            f"dropout={cfg.lora_dropout}, on {_targeted(peft_model)}; lora_alpha unused"
        )

    return _wrapped(model, config, "vera", describe)


def _ia3(model, cfg, targets, total_steps) -> AdapterSetup:
    from peft import IA3Config, TaskType
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING

    ff = _knob(cfg, "feedforward_modules", None)
    if ff is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        rule = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
        if rule is None:
            raise ValueError(
                f"IA3 has no feed-forward rule for model type {model_type!r}; set peft.feedforward_modules "
                f"to the targets whose input IA3 should scale (e.g. [down_proj])"
            )
        ff = [t for t in targets if _leaf(t) in rule]
        origin = f"peft's rule for {model_type}: {rule}"
    else:
        ff = [str(t) for t in ff]
        bad = [t for t in ff if t not in targets]
        if bad:
            raise ValueError(
                f"peft.feedforward_modules {bad} are not in peft.target_modules {list(targets)}; "
                f"feed-forward modules must be a subset of the targets"
            )
        origin = "configured"
    config = IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=list(targets), feedforward_modules=list(ff))
    others = [t for t in targets if t not in ff]
    return _wrapped(
        model,
        config,
        "ia3",
        lambda peft_model: (
            f"ia3: learned scaling vectors (init 1) on {_targeted(peft_model)}: input scaled on the feed-forward "
            f"modules {ff or 'none'} ({origin}), output scaled on {others or 'none'}; r, lora_alpha, lora_dropout "
            f"unused"
        ),
    )


def _layernorm(model, cfg, targets, total_steps) -> AdapterSetup:
    from peft import LNTuningConfig, TaskType

    ln_targets = _knob(cfg, "ln_target_modules", None)
    origin = "configured peft.ln_target_modules"
    if ln_targets is None:
        ln_targets = _norm_module_names(model)
        origin = "every normalisation layer of the model"
        if not ln_targets:
            raise ValueError("LayerNorm tuning found no normalisation layer in the model; set peft.ln_target_modules")
    ln_targets = resolve_target_modules(model, list(ln_targets))
    config = LNTuningConfig(task_type=TaskType.CAUSAL_LM, target_modules=list(ln_targets))
    return _wrapped(
        model,
        config,
        "layernorm",
        lambda peft_model: (
            f"layernorm: LayerNorm tuning trains a copy of the norm layers' weights on {_targeted(peft_model)} "
            f"({origin}), not the configured target_modules {list(targets)}; r, lora_alpha, lora_dropout unused"
        ),
    )


def _miss(model, cfg, targets, total_steps) -> AdapterSetup:
    from peft import MissConfig, TaskType

    init = _choice(cfg, "miss_init", "balance", MISS_INITS)
    mini_r = int(_knob(cfg, "miss_mini_r", 1))
    config = MissConfig(
        task_type=TaskType.CAUSAL_LM,
        r=int(cfg.r),
        miss_dropout=float(cfg.lora_dropout),
        target_modules=list(targets),
        init_weights=MISS_INITS[init],
        mini_r=mini_r,
    )
    variant = init + (f" (mini_r={mini_r})" if init == "mini" else "")
    return _wrapped(
        model,
        config,
        "miss",
        lambda peft_model: (
            f"miss: shared shard matrix (init zeros) r={cfg.r}, variant {variant}, dropout={cfg.lora_dropout}, "
            f"on {_targeted(peft_model)}; lora_alpha unused"
        ),
    )


def _hra(model, cfg, targets, total_steps) -> AdapterSetup:
    from peft import HRAConfig, TaskType

    r = int(cfg.r)
    if r % 2:
        # note: peft's identity init pairs equal reflections (H_0 = I); an odd r silently falls back to random u
        raise ValueError(f"peft.r must be even for hra (its identity init pairs the r reflections), got {r}")
    config = HRAConfig(task_type=TaskType.CAUSAL_LM, r=r, target_modules=list(targets), init_weights=True)
    return _wrapped(
        model,
        config,
        "hra",
        lambda peft_model: (
            f"hra: W = W0 H, H = product of r Householder reflections I - 2 u u^T/|u|^2 (r={r}, equal pairs so "
            f"H = I at init), on {_targeted(peft_model)}; lora_alpha, lora_dropout unused"
        ),
    )


def _slicefine(model, cfg, targets, total_steps) -> AdapterSetup:
    from perl.adapters.slicefine import SLICE_MODES, SliceFineConfig

    mode = _choice(cfg, "slicefine_mode", "column", SLICE_MODES)
    position = int(_knob(cfg, "slicefine_position", 0))
    config = SliceFineConfig(
        task_type="CAUSAL_LM", r=int(cfg.r), slice_mode=mode, slice_position=position, target_modules=list(targets)
    )
    return _wrapped(
        model,
        config,
        "slicefine",
        lambda peft_model: (
            f"slicefine: {cfg.r} {mode}s of each weight from index {position} trainable (initialised to the base "
            f"values, the slice moved left where it would not fit), the rest frozen, on {_targeted(peft_model)}; "
            f"lora_alpha, lora_dropout unused"
        ),
    )


def _full(model, cfg, targets, total_steps) -> AdapterSetup:
    for p in model.parameters():
        p.requires_grad_(True)
    desc = (
        "full: no adapter, every weight trains; the trackers follow the target_modules "
        f"{', '.join(targets)}; r, lora_alpha, lora_dropout unused; " + _param_summary(model)
    )
    return AdapterSetup(model, None, [], desc, FULL_FINETUNING)


_BUILDERS: dict[str, Callable] = {
    **dict.fromkeys(LORA_FAMILY, _lora_family),
    "adalora": _adalora,
    "vera": _vera,
    "ia3": _ia3,
    "layernorm": _layernorm,
    "miss": _miss,
    "hra": _hra,
    "slicefine": _slicefine,
    FULL_FINETUNING: _full,
}
assert set(_BUILDERS) == set(ALL_METHODS)


def build_adapter(model: nn.Module, peft_cfg, total_steps: int) -> AdapterSetup:
    """Wrap ``model`` with the adapter ``peft_cfg.type`` (in place: the base model's modules are replaced).

    Usage:
    ```python
    setup = build_adapter(model, config.peft, total_steps=config.training.max_steps)
    logger.info("adapter: %s", setup.description)
    trainer = GRPOTrainer(model=setup.model, ..., callbacks=setup.callbacks)
    if setup.optimizer_factory is not None:
        trainer.optimizer = setup.optimizer_factory(trainer.model, trainer.args)
    ```

    Args:
        model (`nn.Module`): a causal LM (transformers ``PreTrainedModel``).
        peft_cfg: the ``peft`` config section (``type``, ``r``, ``lora_alpha``, ``lora_dropout``,
            ``target_modules``, ``loraplus_lr_ratio`` and the method knobs listed in this module's docstring).
        total_steps (`int`): optimizer steps of the run (AdaLoRA's ``total_step``).

    Returns:
        An :class:`AdapterSetup`.
    """
    method = str(getattr(peft_cfg, "type", "")).lower()
    if method not in _BUILDERS:
        raise ValueError(
            f"unknown peft.type {getattr(peft_cfg, 'type', None)!r}; valid types: {', '.join(ALL_METHODS)}"
        )
    if method == FULL_FINETUNING:
        # note: full fine-tuning trains every weight; target_modules only says what the trackers follow
        targets = getattr(peft_cfg, "target_modules", None) or []
        targets = [targets] if isinstance(targets, str) else [str(t) for t in targets]
    else:
        if int(peft_cfg.r) < 1:
            raise ValueError(f"peft.r must be a positive integer, got {peft_cfg.r}")
        if not 0.0 <= float(peft_cfg.lora_dropout) < 1.0:
            raise ValueError(f"peft.lora_dropout must be in [0, 1), got {peft_cfg.lora_dropout}")
        targets = resolve_target_modules(model, getattr(peft_cfg, "target_modules", None))
    setup = _BUILDERS[method](model, _Cfg(peft_cfg, method), targets, total_steps)
    logger.debug("built adapter %s", setup.description)
    return setup


class _Cfg:
    """A read-only view of the peft config section with ``type`` normalised to lower case."""

    def __init__(self, cfg, method: str):
        self._cfg = cfg
        self.type = method

    def __getattr__(self, name):
        return getattr(self._cfg, name)
