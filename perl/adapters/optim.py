"""Optimizers of LoRA+ and LoRA-FA, built with ``peft.optimizers`` from the Trainer's arguments.

Both methods are plain LoRA adapters trained by a different optimizer, so the registry hands
``perl.train`` an *optimizer factory* ``(model, training_args) -> torch.optim.Optimizer`` that it calls
once the Trainer exists (``trainer.optimizer = factory(trainer.model, args)``); the Trainer then builds
its learning-rate scheduler around it as usual.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

OptimizerFactory = Callable[[torch.nn.Module, object], torch.optim.Optimizer]


def _unwrap(model):
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def loraplus_optimizer_factory(loraplus_lr_ratio: float, loraplus_lr_embedding: float = 1e-6) -> OptimizerFactory:
    """LoRA+ (Hayou et al., 2024): AdamW with ``lr_B = loraplus_lr_ratio * lr_A``.

    Usage:
    ```python
    trainer.optimizer = loraplus_optimizer_factory(16.0)(trainer.model, trainer.args)
    ```

    Args:
        loraplus_lr_ratio (`float`): ``lr_B / lr_A``; the paper suggests 16 (>= 1).
        loraplus_lr_embedding (`float`, defaults to 1e-6): learning rate of adapted embedding layers.

    The factory reads ``learning_rate``, ``weight_decay``, ``adam_beta1``, ``adam_beta2`` and
    ``adam_epsilon`` from the training arguments. peft puts B matrices and every 1-d trainable tensor
    in the fast group (``lr * ratio``), A matrices in the slow one (``lr``).
    """
    if not loraplus_lr_ratio > 0:
        raise ValueError(f"loraplus_lr_ratio must be > 0 (the paper uses 16), got {loraplus_lr_ratio}")

    def factory(model, args) -> torch.optim.Optimizer:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            model=_unwrap(model),
            optimizer_cls=torch.optim.AdamW,
            lr=float(args.learning_rate),
            loraplus_lr_ratio=float(loraplus_lr_ratio),
            loraplus_weight_decay=float(getattr(args, "weight_decay", 0.0)),
            loraplus_lr_embedding=float(loraplus_lr_embedding),
            betas=(float(getattr(args, "adam_beta1", 0.9)), float(getattr(args, "adam_beta2", 0.999))),
            eps=float(getattr(args, "adam_epsilon", 1e-8)),
        )

    return factory


def lorafa_optimizer_factory(r: int, lora_alpha: float) -> OptimizerFactory:
    """LoRA-FA (Zhang et al., 2023): A frozen at its random init, B trained with a projected AdamW.

    Usage:
    ```python
    trainer.optimizer = lorafa_optimizer_factory(8, 16)(trainer.model, trainer.args)
    ```

    Args:
        r (`int`): the LoRA rank (peft's helper wants it; the per-layer scaling is read from the model).
        lora_alpha (`float`): the LoRA alpha.

    The registry already froze every ``lora_A`` when it built the model, so the trainable-parameter
    count and the gradient trackers see LoRA-FA as it is; ``create_lorafa_optimizer`` freezes them again.
    It reads ``learning_rate`` and ``weight_decay`` from the training arguments (peft fixes betas).
    """

    def factory(model, args) -> torch.optim.Optimizer:
        from peft.optimizers import create_lorafa_optimizer

        return create_lorafa_optimizer(
            model=_unwrap(model),
            r=int(r),
            lora_alpha=lora_alpha,
            lr=float(args.learning_rate),
            weight_decay=float(getattr(args, "weight_decay", 0.0)),
        )

    return factory


def freeze_lora_A(model) -> int:
    """Set ``requires_grad=False`` on every ``lora_A`` parameter; return how many tensors were frozen."""
    n = 0
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)
            n += 1
    return n
