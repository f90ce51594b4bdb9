"""AdaLoRA's rank allocator, driven from the Trainer.

AdaLoRA parametrises each update as ``P diag(E) Q`` and prunes the entries of ``E`` (triplets) by an
importance score until the average rank falls from ``init_r`` to ``target_r``. The pruning only
happens when ``model.base_model.update_and_allocate(step)`` is called after backward and before
``zero_grad`` at every optimizer step, and neither the transformers Trainer nor TRL calls it.
:class:`AdaLoraAllocatorCallback` does, from ``on_optimizer_step`` (after ``optimizer.step()``, before
``zero_grad``, exactly where peft's docs put the call): masking ``E`` after the step means the masked
entries stay zero in the next forward instead of being moved again by Adam's momentum.

Note: AdaLoRA's orthogonality regulariser is added by ``AdaLoraModel.forward`` only to a loss the
model computes itself from ``labels``; GRPO computes its own loss, so it does not apply under GRPO.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import TrainerCallback

logger = logging.getLogger("perl")


def fit_adalora_schedule(
    total_steps: int, tinit: int = 0, tfinal: int = 0, delta_t: int = 1
) -> tuple[int, int, int, str]:
    """Fit AdaLoRA's ``(tinit, tfinal, deltaT)`` to a run of ``total_steps`` so that the budget moves.

    peft allocates at steps ``t`` with ``tinit < t < total_steps - tfinal`` and ``t % deltaT == 0``, and
    once more at ``t = total_steps - tfinal``; the Trainer's steps are ``0 .. total_steps - 1``. When the
    configured values leave no such step (a short debug run with a schedule meant for a long one),
    ``tinit`` and ``tfinal`` are scaled by the same factor to fit half the run (or set to 0), and
    ``deltaT`` to 1 when no multiple of it falls in the budgeting phase. The returned note says what
    changed ("" when nothing did). A run of one step cannot move the budget.

    Args:
        total_steps (`int`): optimizer steps of the run (AdaLoRA's ``total_step``).
        tinit (`int`, defaults to 0): warm-up steps with the full budget.
        tfinal (`int`, defaults to 0): final steps with the final allocation fixed.
        delta_t (`int`, defaults to 1): steps between two allocations.

    Returns:
        ``(tinit, tfinal, deltaT, note)``.
    """
    if total_steps < 1:
        raise ValueError(f"AdaLoRA needs total_steps >= 1, got {total_steps}")
    if tinit < 0 or tfinal < 0 or delta_t < 1:
        raise ValueError(f"AdaLoRA needs tinit >= 0, tfinal >= 0, deltaT >= 1; got {tinit}, {tfinal}, {delta_t}")

    def moves(ti: int, tf: int) -> bool:
        return ti + max(tf, 1) <= total_steps - 1

    given = (tinit, tfinal, delta_t)
    if not moves(tinit, tfinal):
        factor = (total_steps // 2) / max(tinit + tfinal, 1)
        tinit, tfinal = math.floor(tinit * factor), math.floor(tfinal * factor)
        if not moves(tinit, tfinal):
            tinit, tfinal = 0, 0
    if tfinal == 0 and not any(t % delta_t == 0 for t in range(tinit + 1, total_steps)):
        delta_t = 1
    note = ""
    if (tinit, tfinal, delta_t) != given:
        note = (
            f" (configured tinit={given[0]}, tfinal={given[1]}, deltaT={given[2]} leave no allocation step in a run "
            f"of {total_steps} steps; fitted)"
        )
    return tinit, tfinal, delta_t, note


def find_adalora_model(model):
    """The ``AdaLoraModel`` inside ``model`` (a PeftModel, possibly wrapped by DDP / accelerate), or None."""
    from accelerate.utils import extract_model_from_parallel
    from peft.tuners.adalora import AdaLoraModel

    if model is None:
        return None
    model = extract_model_from_parallel(model)
    for candidate in (model, getattr(model, "base_model", None)):
        if isinstance(candidate, AdaLoraModel):
            return candidate
    return None


def _has_gradient_signal(adalora_model, adapter_name: str) -> bool:
    for name, param in adalora_model.model.named_parameters():
        if "lora_" in name and adapter_name in name and param.grad is not None and torch.any(param.grad != 0):
            return True
    return False


def allocate(adalora_model, global_step: int) -> bool:
    """Call ``update_and_allocate(global_step)`` unless there is nothing to allocate from; True when called.

    Skipped, with the budget kept as it is, when (a) in the budgeting phase every AdaLoRA gradient is
    exactly zero (a GRPO batch whose groups all had equal rewards: the importance scores would all be
    zero, and peft's threshold ``score <= k-th smallest`` would then mask *every* triplet), or (b) at or
    after ``total_step - tfinal`` the allocator never saw a gradient (after a resume, its importance
    averages are not saved) so there is no allocation to finalise or re-apply.
    """
    name = adalora_model.trainable_adapter_name
    cfg = adalora_model.peft_config[name]
    boundary = cfg.total_step - cfg.tfinal
    allocator = adalora_model.rankallocator
    if global_step < boundary:
        if not _has_gradient_signal(adalora_model, name):
            return False
    elif global_step == boundary:
        if not allocator.exp_avg_ipt:
            return False
    elif cfg.rank_pattern is None:
        return False
    adalora_model.update_and_allocate(global_step)
    return True


class AdaLoraAllocatorCallback(TrainerCallback):
    """Runs AdaLoRA's rank allocation at every optimizer step of a transformers / TRL Trainer.

    Usage:
    ```python
    trainer = GRPOTrainer(model=peft_model, ..., callbacks=[AdaLoraAllocatorCallback()])
    ```

    The model comes from the event's ``kwargs["model"]`` and is unwrapped (DDP / accelerate). The
    step passed to peft is ``state.global_step`` as it is during ``on_optimizer_step``: the number of
    optimizer steps finished before this one (0 at the first step), matching peft's loop index and an
    AdaLoRA ``total_step`` equal to the run's ``max_steps``. Under DeepSpeed the engine steps and zeroes
    gradients inside backward, so peft's importance scores (``p * grad``) are not available here.

    Args:
        model (*optional*): a fallback model used when an event carries none (tests, custom loops).

    Attributes:
        allocations (`int`): optimizer steps at which ``update_and_allocate`` ran.
        skipped (`int`): optimizer steps skipped for want of a gradient signal (see :func:`allocate`).
    """

    def __init__(self, model=None):
        self._model = model
        self.allocations = 0
        self.skipped = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        model = kwargs.get("model")
        adalora_model = find_adalora_model(self._model if model is None else model)
        if adalora_model is None:
            raise ValueError(
                "AdaLoraAllocatorCallback was given a model without an AdaLoRA adapter; "
                "add it only when peft.type is 'adalora'"
            )
        if allocate(adalora_model, int(state.global_step)):
            self.allocations += 1
        else:
            self.skipped += 1
            if self.skipped == 1:
                logger.info(
                    "AdaLoRA: step %d carried no gradient signal; rank allocation skipped (budget kept)",
                    state.global_step,
                )
