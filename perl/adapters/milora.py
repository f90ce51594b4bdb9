"""MiLoRA and MiLoRA+: LoRA initialised from the *minor* singular components of each target weight.

MiLoRA (Wang et al., 2024, "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM
Finetuning") is PiSSA's mirror image. For a target weight ``W = U S V^T`` (out x in, singular values
descending) take the ``r`` *smallest* triplets ``U_r, S_r, V_r`` and, with ``s`` the LoRA scaling,

    B = U_r sqrt(S_r / s),   A = sqrt(S_r / s) V_r^T,   so that   s * B @ A = U_r S_r V_r^T,

and replace the base weight by the residual ``W - s * B @ A``. The layer computes
``(W - s B A) x + s B A x = W x``: the model's output is unchanged at step 0 (exactly, up to float32
rounding of the residual; with ``lora_dropout > 0`` only in eval mode, since dropout then acts on the
minor component). This mirrors peft's ``pissa_init`` (``peft/tuners/lora/layer.py``), which divides the
singular values by the scaling in the same way.

MiLoRA+ keeps the base weight: ``A = V_r^T`` (the smallest right singular directions, orthonormal rows)
and ``B = 0``, so the adapter starts as an exact no-op that can only grow along the minor input
directions.

The math is two pure functions on tensors; :func:`apply_minor_init` walks a peft LoRA model and
writes the factors in place.
"""

from __future__ import annotations

import torch
from torch import Tensor

MINOR_VARIANTS = ("milora", "milora_plus")


def _minor_svd(weight: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``r`` smallest singular triplets ``(U_r, S_r, Vh_r)`` of ``weight`` (float32, exact SVD)."""
    k = min(weight.shape)
    if not 0 < r <= k:
        raise ValueError(
            f"MiLoRA needs 0 < r <= min(out_features, in_features), got r={r} for a weight of shape "
            f"{tuple(weight.shape)}; lower peft.r or leave this module out of target_modules"
        )
    # note: exact SVD, not svd_lowrank: a randomised range finder resolves the *largest* components,
    # and the smallest are exactly what it gets wrong.
    U, S, Vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    return U[:, k - r :], S[k - r :], Vh[k - r :]


def milora_factors(weight: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """MiLoRA's ``(A, B, residual)`` for one weight: ``s*B@A`` is its minor rank-r part, ``residual + s*B@A = W``.

    Args:
        weight (`Tensor`): the base weight, shape (out_features, in_features).
        r (`int`): the LoRA rank.
        scaling (`float`): the LoRA scaling ``s`` (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA).

    Returns:
        ``A`` (r x in), ``B`` (out x r), all float32, and ``residual`` (out x in) = ``W - s * B @ A`` in float32.
    """
    U_r, S_r, Vh_r = _minor_svd(weight, r)
    root = torch.sqrt(S_r / scaling)
    A = root[:, None] * Vh_r
    B = U_r * root[None, :]
    residual = weight.detach().to(torch.float32) - scaling * (B @ A)
    return A, B, residual


def milora_plus_factors(weight: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """MiLoRA+'s ``(A, B)`` for one weight: ``A = V_r^T`` of the r smallest singular values, ``B = 0`` (float32).

    Args:
        weight (`Tensor`): the base weight, shape (out_features, in_features).
        r (`int`): the LoRA rank.
    """
    _, _, Vh_r = _minor_svd(weight, r)
    return Vh_r.contiguous(), torch.zeros(weight.shape[0], r, dtype=torch.float32, device=weight.device)


@torch.no_grad()
def apply_minor_init(peft_model, variant: str, adapter_name: str = "default") -> list[str]:
    """Re-initialise every LoRA Linear of ``peft_model`` with MiLoRA or MiLoRA+ (in place).

    Usage:
    ```python
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=[...]))
    apply_minor_init(model, "milora")
    ```

    Args:
        peft_model: a peft model holding plain LoRA adapters (``init_lora_weights=True``).
        variant (`str`): ``"milora"`` (moves the base weight to the residual) or ``"milora_plus"`` (base unchanged).
        adapter_name (`str`, defaults to ``"default"``): the adapter to initialise.

    Returns:
        The names of the modules initialised.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer
    from peft.utils.other import transpose

    if variant not in MINOR_VARIANTS:
        raise ValueError(f"unknown minor-component variant {variant!r}; expected one of {MINOR_VARIANTS}")
    done = []
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in getattr(module, "lora_A", {}):
            continue
        if not isinstance(module, LoraLinear):
            raise ValueError(
                f"MiLoRA initialises Linear layers only, but {name} is a {type(module).__name__}; "
                f"remove it from target_modules"
            )
        base = module.get_base_layer()
        # the (out, in) view of the weight: Conv1D-style layers store it transposed (fan_in_fan_out)
        weight = transpose(base.weight, module.fan_in_fan_out)
        r = module.r[adapter_name]
        lora_A = module.lora_A[adapter_name].weight
        lora_B = module.lora_B[adapter_name].weight
        if variant == "milora":
            A, B, residual = milora_factors(weight, r, module.scaling[adapter_name])
            base.weight.data = transpose(residual.to(base.weight.dtype), module.fan_in_fan_out).contiguous()
        else:
            A, B = milora_plus_factors(weight, r)
        lora_A.data = A.to(device=lora_A.device, dtype=lora_A.dtype).contiguous()
        lora_B.data = B.to(device=lora_B.device, dtype=lora_B.dtype).contiguous()
        done.append(name)
    if not done:
        raise ValueError(f"{variant}: the model has no LoRA Linear layers for adapter {adapter_name!r} to initialise")
    return done
