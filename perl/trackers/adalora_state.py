"""AdaLoRA's allocator state read from a live peft model: the rank each module keeps, and the
importance scores peft's RankAllocator ranks triplets by (the spectral tracker stores both)."""

from __future__ import annotations

import torch
from torch import nn

from .discovery import AdapterModule, peft_config_of

__all__ = ["adalora_rank_budget", "adalora_importance_scores"]


def _tuner(model: nn.Module):
    model = getattr(model, "module", model)
    return getattr(model, "base_model", model)


def adalora_rank_budget(model: nn.Module, am: AdapterModule) -> float:
    """Ranks AdaLoRA currently keeps for this module: the unmasked triplets of the allocator's
    latest ``rank_pattern`` (peft_config), or r before the first masking."""
    config = peft_config_of(model).get(am.adapter)
    pattern = getattr(config, "rank_pattern", None)
    if pattern:
        for key in (f"{am.name}.lora_E.{am.adapter}", f"{am.name}.lora_E"):
            if key in pattern:
                return float(sum(bool(v) for v in pattern[key]))
        suffix = (f".{am.name.split('.', 1)[-1]}.lora_E", f".{am.name.split('.', 1)[-1]}.lora_E.{am.adapter}")
        for key, value in pattern.items():
            if key.endswith(suffix):
                return float(sum(bool(v) for v in value))
    return float(am.rank)


def adalora_importance_scores(model: nn.Module, am: AdapterModule) -> torch.Tensor | None:
    """Per-triplet importance that peft's RankAllocator ranks by (its ``mask_to_budget`` formula):
    s(E_i) + mean_j s(A_ij) + mean_k s(B_ki), with s = exp_avg_ipt * exp_avg_unc.
    None until the allocator has scored (before the first ``update_and_allocate``)."""
    allocator = getattr(_tuner(model), "rankallocator", None)
    if allocator is None or not getattr(allocator, "exp_avg_ipt", None):
        return None
    keys = {}
    for part in ("lora_A", "lora_B", "lora_E"):
        tail = f"{am.name}.{part}.{am.adapter}"
        key = next((k for k in allocator.exp_avg_ipt if k == tail or k.endswith("." + tail)), None)
        if key is None or key not in allocator.exp_avg_unc:
            return None
        keys[part] = key

    def score(part):
        return allocator.exp_avg_ipt[keys[part]] * allocator.exp_avg_unc[keys[part]]

    return (score("lora_E").reshape(-1) + score("lora_A").mean(dim=1) + score("lora_B").mean(dim=0)).detach()
