"""The gradient store's schema: display orders, the layer convention and the attributes (units,
descriptions) of its variables. The quantities themselves are explained in :mod:`.gradient`."""

from __future__ import annotations

# display order; components outside this list (extra trainable tensors) follow in order of appearance
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COMPONENT_ORDER = (
    "A",
    "B",
    "magnitude",
    "E",
    "lambda_b",
    "lambda_d",
    "ia3",
    "ln",
    "miss",
    "u",
    "slice",
    "weight",
    "bias",
)

LAYER_CONVENTION = "transformer block index; -1: tensors outside the numbered blocks (embeddings, final norm, lm_head)"

_VARIABLE_ATTRS = {
    "grad_norm": {
        "long_name": "L2 norm of the accumulated pre-clip gradient",
        "units": "1",
        "description": "||g||_2 of the gradient summed over gradient-accumulation micro-batches, before "
        "max_grad_norm clipping (post-clip norm / clip_coef); several tensors in one cell "
        "(e.g. LayerNorm weight and bias) are combined as the norm of their concatenation. "
        "NaN: cell not tracked, no gradient, or pre-clip value unrecoverable (non-finite total).",
    },
    "weight_norm": {
        "long_name": "L2 norm of the parameter before the optimizer step",
        "units": "1",
        "description": "||p||_2 at which the gradient was taken",
    },
    "grad_to_weight_ratio": {
        "long_name": "gradient-to-weight ratio",
        "units": "1",
        "description": "grad_norm / weight_norm; +inf where the weight is exactly 0 (LoRA's B at init) and the "
        "gradient is not, NaN for 0/0",
    },
    "update_ratio": {
        "long_name": "relative update size",
        "units": "1",
        "description": "||p_after - p_before||_2 / weight_norm, measured after optimizer.step() and the "
        "on_optimizer_step callbacks registered before the tracker (AdaLoRA's allocator masks E "
        "there); +inf/NaN conventions as grad_to_weight_ratio; NaN when not measured",
    },
    "numel": {
        "long_name": "number of scalar parameters in the cell",
        "units": "1",
        "description": "0 where the cell is not tracked",
    },
    "total_grad_norm": {
        "long_name": "total pre-clip gradient norm",
        "units": "1",
        "description": "L2 norm of the accumulated gradient over all trainable parameters before clipping; "
        "the Trainer's logged grad_norm",
    },
    "clip_coef": {
        "long_name": "clip coefficient applied",
        "units": "1",
        "description": "min(1, max_grad_norm / (total_grad_norm + 1e-6)); 1 when not clipped",
    },
    "post_clip_grad_norm": {
        "long_name": "total gradient norm after clipping",
        "units": "1",
        "description": "L2 norm over all trainable parameters of the gradients the optimizer received, measured",
    },
}
