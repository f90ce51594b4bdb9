"""The alignment store's schema: file names and the attributes (units, formulas) of every variable."""

from __future__ import annotations

ALIGNMENT_DIR = "alignment_logs"
STORE_NAME = "alignment_history.nc"
FINAL_NAME = "alignment_final.nc"
BASE_SVD_NAME = "base_svd.safetensors"
BASE_SVD_FORMAT = "perl-alignment-base-svd-1"

_ZERO = "NaN (0/0) when the update is zero (step 0, or B = 0 at LoRA init) or not finite"
_DW = "dW = s (B_t A_t - B_0 A_0), factored as s [B_t - B_0, B_0] @ [A_t; A_t - A_0] (never the m x n product)"
ALIGNMENT_ATTRS: dict[str, dict[str, str]] = {
    "update_frobenius_norm": {
        "long_name": "Frobenius norm of the update since init",
        "units": "weight units",
        "formula": "||dW||_F, " + _DW,
        "zero_update": "0",
    },
    "update_rank": {
        "long_name": "numerical rank of the update since init",
        "units": "1",
        "formula": "count of sigma_i(dW) > rtol * sigma_1(dW)",
        "zero_update": "0",
    },
    "energy_fraction_top_left": {
        "long_name": "fraction of the update's energy in W0's top-k left singular subspace",
        "units": "1",
        "formula": "||U_k^T dW||_F^2 / ||dW||_F^2 (chance level k/m: chance_energy_fraction_left)",
        "zero_update": _ZERO,
    },
    "energy_fraction_top_right": {
        "long_name": "fraction of the update's energy in W0's top-k right singular subspace",
        "units": "1",
        "formula": "||dW V_k||_F^2 / ||dW||_F^2 (chance level k/n: chance_energy_fraction_right)",
        "zero_update": _ZERO,
    },
    "energy_fraction_bottom_left": {
        "long_name": "fraction of the update's energy in W0's bottom-k left singular subspace",
        "units": "1",
        "formula": "||U_-k^T dW||_F^2 / ||dW||_F^2, U_-k = left vectors of the k smallest of W0's min(m, n) values",
        "zero_update": _ZERO,
        "missing": "NaN where W0's SVD was randomized (no bottom-k)",
    },
    "energy_fraction_bottom_right": {
        "long_name": "fraction of the update's energy in W0's bottom-k right singular subspace",
        "units": "1",
        "formula": "||dW V_-k||_F^2 / ||dW||_F^2, V_-k = right vectors of the k smallest of W0's min(m, n) values",
        "zero_update": _ZERO,
        "missing": "NaN where W0's SVD was randomized (no bottom-k)",
    },
    "principal_angle_cosines": {
        "long_name": "cosines of the principal angles between the update's column space and W0's top-k left subspace",
        "units": "1",
        "formula": "svd(U_k^T U_dW), U_dW = the rank(dW) left singular vectors of dW; descending",
        "zero_update": _ZERO,
        "description": "min(k, rank(dW)) values; NaN past them",
    },
    "amplification_factor": {
        "long_name": "amplification factor (Hu et al. 2021, LoRA, sec. 7.3)",
        "units": "1",
        "formula": "||dW||_F / ||U_dW^T W0 V_dW||_F over dW's rank(dW) singular directions",
        "zero_update": _ZERO,
        "precision": "W0 @ V_dW in float32 (W0's own precision at best), the rest in float64",
    },
    "intruder_dimensions": {
        "long_name": "intruder dimensions (Shuttleworth et al. 2024)",
        "units": "1",
        "formula": "#{j <= k : max_i |<y_j, u_i>| < epsilon}, y_j = top-k left singular vectors of W_base + s B_t A_t "
        "(dense, float64, eigh of the smaller Gram matrix), u_i = all min(m, n) left singular "
        "vectors of W0's thin SVD",
        "zero_update": "0 (the tuned weight is W0)",
        "missing": "NaN at steps without an intruder snapshot and where W0's SVD was randomized",
    },
    "intruder_max_cosine": {
        "long_name": "largest |cosine| of each top singular vector of the tuned weight with W0's left singular vectors",
        "units": "1",
        "formula": "max_i |<y_j, u_i>|, j = intruder_sv (0 = largest singular value of the tuned weight)",
        "zero_update": "1",
        "missing": "NaN at steps without an intruder snapshot and where W0's SVD was randomized",
    },
    "base_singular_values_top": {
        "long_name": "top-k singular values of W0",
        "units": "weight units",
        "formula": "sigma_1 >= ... >= sigma_k of W0 = W_base + s B_0 A_0 (index base_sv: 0 = largest)",
    },
    "base_singular_values_bottom": {
        "long_name": "bottom-k singular values of W0",
        "units": "weight units",
        "formula": "the k smallest of W0's min(m, n) singular values (index base_sv: 0 = smallest)",
        "missing": "NaN where W0's SVD was randomized",
    },
    "alignment_k": {
        "long_name": "k of the top-k / bottom-k subspaces",
        "units": "1",
        "formula": "min(top_k or 2r, min(m, n))",
    },
    "base_svd_randomized": {
        "long_name": "W0's SVD was randomized (torch.svd_lowrank, top-k only)",
        "units": "1",
        "formula": "1 when min(m, n) > full_svd_max_dim, else 0 (full float64 SVD)",
    },
    "chance_energy_fraction_left": {
        "long_name": "expected left energy fraction of a random update",
        "units": "1",
        "formula": "k / m",
    },
    "chance_energy_fraction_right": {
        "long_name": "expected right energy fraction of a random update",
        "units": "1",
        "formula": "k / n",
    },
}
STATIC = (
    "base_singular_values_top",
    "base_singular_values_bottom",
    "alignment_k",
    "base_svd_randomized",
    "chance_energy_fraction_left",
    "chance_energy_fraction_right",
)
EXTRA_DIM = {
    "principal_angle_cosines": "angle",
    "intruder_max_cosine": "intruder_sv",
    "base_singular_values_top": "base_sv",
    "base_singular_values_bottom": "base_sv",
}
INTRUDER_VARS = ("intruder_dimensions", "intruder_max_cosine")
