"""The spectral store's schema: the attributes (units, formulas) of its variables and its conventions."""

from __future__ import annotations

FULL_SVD_NITER = 6
FULL_SVD_SEED = 0
FULL_SVD_FORMULA = (
    f"torch.svd_lowrank(W_t - W_0, q=k+max(k,8), niter={FULL_SVD_NITER}) in float32 on the "
    f"weights' device, start block seeded ({FULL_SVD_SEED}); exact dense SVD when q >= min(m, n)"
)
STEP_CONVENTION = (
    "step = optimizer steps done (the Trainer's global_step); the snapshot at step s "
    "describes the weights after s optimizer steps; step 0 is before the first update"
)

SPECTRUM_ATTRS = {
    "singular_values": {
        "long_name": "singular values of the scaled adapter product s*B*A",
        "units": "weight units",
        "formula": "svd(R_b R_a^T) * |s| with B = Q_b R_b, A^T = Q_a R_a (never the dense product)",
        "description": "descending; NaN past the module's rank (padding) or where the module is not adapted",
    },
    "update_singular_values": {
        "long_name": "singular values of the update since init s*(B_t A_t - B_0 A_0)",
        "units": "weight units",
        "formula": "factored as [B_t - B_0, B_0] @ [A_t; A_t - A_0], rank <= 2r",
        "description": "what learning changed; exactly 0 at step 0; for PiSSA/MiLoRA differs from the product",
    },
}
EXTRA_ATTRS = {
    "magnitude_norm": {"long_name": "DoRA magnitude norm ||m||", "units": "weight units", "formula": "||m||_2"},
    "direction_norm": {
        "long_name": "DoRA direction norm ||W0 + s B A||_F",
        "units": "weight units",
        "formula": "||V||_F, V = W0 + s*B*A (the normalised direction V/||V||_row has norm sqrt(out))",
    },
    "magnitude_direction_ratio": {
        "long_name": "DoRA magnitude / direction norm",
        "units": "1",
        "formula": "||m|| / ||W0 + s B A||_F (1 at init)",
    },
    "dora_update_singular_values": {
        "long_name": "top singular values of DoRA's effective weight change W' - W0",
        "units": "weight units",
        "formula": "W' = diag(m / ||W0 + sBA||_row) (W0 + sBA); dense, top-k by randomized subspace iteration",
        "description": "full rank once m moves: only the top len(sv) values are stored",
    },
    "rank_budget": {
        "long_name": "AdaLoRA rank budget",
        "units": "1",
        "formula": "triplets kept by peft's latest rank_pattern (r before the first masking)",
    },
    "importance_scores": {
        "long_name": "AdaLoRA triplet importance",
        "units": "1",
        "formula": "s(E_i) + mean_j s(A_ij) + mean_k s(B_ki), s = exp_avg_ipt * exp_avg_unc (peft RankAllocator)",
        "description": "NaN before the allocator has scored; index = triplet, not sorted",
    },
    "vector_norm": {"long_name": "adapter vector norm (IA3 / LayerNorm tuning)", "units": "1", "formula": "||v||_2"},
    "vector_distance_from_init": {
        "long_name": "adapter vector distance from init",
        "units": "1",
        "formula": "||v_t - v_0||_2",
    },
    "scale": {
        "long_name": "adapter scale s",
        "units": "1",
        "formula": "delta W = s*B*A; alpha/r (LoRA), alpha/sqrt(r) (rsLoRA), scaling/ranknum (AdaLoRA), "
        "1 (VeRA, MiSS, HRA, SliceFine, full)",
    },
    "rank": {"long_name": "configured adapter rank r", "units": "1"},
}

# display order of the module coordinate; other modules follow by name
MODULE_ORDER = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "input_layernorm",
    "post_attention_layernorm",
    "norm",
)


def store_grid(adapters) -> tuple[list[int], list[str], dict[str, tuple[int, int]]]:
    """The (layer, module) coordinates of a store of ``adapters`` (spectral and alignment alike):
    layers sorted, modules in `MODULE_ORDER` then by name, and each adapter's (layer, module) index."""
    layers = sorted({a.layer for a in adapters})
    present = {a.module for a in adapters}
    modules = [m for m in MODULE_ORDER if m in present] + sorted(present - set(MODULE_ORDER))
    return layers, modules, {a.name: (layers.index(a.layer), modules.index(a.module)) for a in adapters}
