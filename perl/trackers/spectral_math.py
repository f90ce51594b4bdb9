"""Spectra of adapter weight changes and what they say: pure functions on tensors.

Nothing here knows peft or netCDF. Every function takes factors or matrices and returns float64
tensors; leading batch dimensions (stacked modules of equal shapes) are supported throughout.

The main idea (DESIGN.md): never form the m x n product to take its SVD. With ``B = Q_b R_b`` and
``A^T = Q_a R_a`` (thin QR), ``B @ A = Q_b (R_b R_a^T) Q_a^T``, so the singular values of ``B @ A``
are exactly those of the small core ``R_b R_a^T``: cost O((m + n) k^2) instead of O(m n min(m, n)).
QR and core run in float64: the factors are float32 (or bf16) numbers, so their product is an exact
matrix whose small singular values would be lost to float32 rounding (relative error ~1e-7 * sigma_1
/ sigma_i) but are kept by float64 (~1e-16).

Conventions for the metrics (also stored as variable attrs by the tracker, see METRIC_ATTRS):

- Padding: NaN entries of a spectrum are padding (a module with a smaller rank than the ``sv``
  dimension) and are ignored.
- Undefined: a spectrum with no finite entry, or with an Inf, gives NaN for every metric (the
  weights held NaN/Inf; training may go on and the store shows the NaN).
- Numerical support: values at or below ``rtol * sigma_1`` (``rtol`` = 1e-6 by default) count as
  zero. They are what a rank-deficient factorisation leaves (e.g. the r unused slots of the 2r-slot
  update of a plain LoRA, or AdaLoRA's pruned triplets), not data. ``numerical_rank`` counts the
  values above it; ``sigma_min`` in ``spectral_gap`` and ``condition_number`` is the smallest value
  above it, so the condition number lies in [1, 1/rtol] and never explodes to 1e10.
- Zero matrix (all values exactly 0, e.g. LoRA's B = 0 at step 0, or the update since init at
  step 0): ranks, norms and the gap are 0; ``condition_number`` and the ``top*_sv_ratio`` energy
  ratios are NaN (0/0: undefined).
- Every metric except the norms depends only on sigma / sigma_1, so a tiny matrix (1e-12 after a
  first small step) has the same ranks and ratios as its scaled-up copy: no 1e10 artefacts.
"""

from __future__ import annotations

import contextlib
import math

import torch

__all__ = [
    "factored_singular_values",
    "update_singular_values",
    "update_factors",
    "init_bases",
    "product_and_update_singular_values",
    "topk_singular_values",
    "dense_singular_values",
    "top_singular_values",
    "spectrum_metrics",
    "vector_metrics",
    "dora_metrics",
    "METRIC_NAMES",
    "METRIC_ATTRS",
    "DEFAULT_RTOL",
    "lowrank_singular_values",
    "lowrank_svd",
]

DEFAULT_RTOL = 1e-6

METRIC_ATTRS: dict[str, dict[str, str]] = {
    "spectral_gap": {
        "long_name": "spectral gap to the smallest value (PeRL's definition)",
        "units": "weight units",
        "formula": "sigma_1 - sigma_min, sigma_min = smallest singular value above rtol*sigma_1",
        "description": "the original PeRL trackers' spectral_gap; the usual spectral gap is spectral_gap_12",
        "zero_matrix": "0",
    },
    "spectral_gap_12": {
        "long_name": "spectral gap (sigma_1 - sigma_2)",
        "units": "weight units",
        "formula": "sigma_1 - sigma_2, sigma_2 = 0 when it is at or below rtol*sigma_1 (rank 1)",
        "description": "the usual spectral gap; spectral_gap holds PeRL's sigma_1 - sigma_min",
        "zero_matrix": "0",
    },
    "condition_number": {
        "long_name": "condition number on the numerical support",
        "units": "1",
        "formula": "sigma_1 / sigma_min, sigma_min = smallest singular value above rtol*sigma_1 (in [1, 1/rtol])",
        "zero_matrix": "NaN (0/0 undefined)",
    },
    "effective_rank": {
        "long_name": "effective rank (PeRL)",
        "units": "1",
        "formula": "(sum sigma)^2 / sum sigma^2",
        "zero_matrix": "0",
    },
    "entropy_effective_rank": {
        "long_name": "entropy effective rank (Roy & Vetterli 2007)",
        "units": "1",
        "formula": "exp(-sum p log p), p = sigma / sum sigma",
        "zero_matrix": "0",
    },
    "stable_rank": {
        "long_name": "stable rank",
        "units": "1",
        "formula": "sum sigma^2 / sigma_1^2",
        "zero_matrix": "0",
    },
    "nuclear_norm": {
        "long_name": "nuclear norm",
        "units": "weight units",
        "formula": "sum sigma",
        "zero_matrix": "0",
    },
    "frobenius_norm": {
        "long_name": "Frobenius norm",
        "units": "weight units",
        "formula": "sqrt(sum sigma^2)",
        "zero_matrix": "0",
    },
    "top1_sv_ratio": {
        "long_name": "energy in the top singular value",
        "units": "1",
        "formula": "sigma_1^2 / sum sigma^2",
        "zero_matrix": "NaN (0/0 undefined)",
    },
    "top5_sv_ratio": {
        "long_name": "energy in the top 5 singular values",
        "units": "1",
        "formula": "sum_{i<=5} sigma_i^2 / sum sigma^2 (1 when there are at most 5 values)",
        "zero_matrix": "NaN (0/0 undefined)",
    },
    "top10_sv_ratio": {
        "long_name": "energy in the top 10 singular values",
        "units": "1",
        "formula": "sum_{i<=10} sigma_i^2 / sum sigma^2 (1 when there are at most 10 values)",
        "zero_matrix": "NaN (0/0 undefined)",
    },
    "numerical_rank": {
        "long_name": "numerical rank",
        "units": "1",
        "formula": "count of sigma_i > rtol * sigma_1",
        "zero_matrix": "0",
    },
}
METRIC_NAMES = tuple(METRIC_ATTRS)


# -------------------------------------------------------------------- singular values
def factored_singular_values(
    B: torch.Tensor, A: torch.Tensor, scale: float | torch.Tensor = 1.0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Singular values of ``scale * B @ A`` without forming it, descending, float64.

    Args:
        B (Tensor): (..., m, k).
        A (Tensor): (..., k, n).
        scale (float | Tensor): scalar, or one per batch entry (shape ``(...)``).
        dtype (torch.dtype, defaults to float64): precision of the QRs (the small core is always
            float64). float64 keeps even tiny singular values to ~1e-16 of sigma_1; float32 (for
            float32 or narrower factors) is ~10x faster on a CPU (no float64 copy of the factors)
            and leaves errors ~1e-7 of sigma_1 (measured: benchmarks/spectral_snapshot.py).

    Returns:
        Tensor (..., min(m, n, k)). A batch entry whose factors hold NaN/Inf gives NaN values.
    """
    core, bad, _, _ = factored_core(B, A, dtype)
    sv = torch.linalg.svdvals(core)
    sv = sv * _abs_scale(scale, sv)
    if bad is not None:
        sv[bad] = float("nan")
    return sv


def factored_core(
    B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype = torch.float64, bases: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The small matrix whose SVD is that of ``B @ A``: with ``B = Q_b R_b`` and ``A^T = Q_a R_a``,
    ``B @ A = Q_b (R_b R_a^T) Q_a^T``. The one place the factored SVD is set up (spectra and alignment).

    Args:
        B (Tensor): (..., m, k). A (Tensor): (..., k, n).
        dtype (torch.dtype, defaults to float64): precision of the QRs (see `factored_singular_values`).
        bases (bool, defaults to False): also return Q_b and Q_a (the singular vectors need them).

    Returns:
        ``(core, bad, Q_b, Q_a)``: the float64 core (..., min(m,k), min(n,k)); ``bad``, the batch entries
        whose factors hold NaN/Inf (computed on zeros: LAPACK refuses non-finite input), or None when
        all are finite; Q_b, Q_a or None.
    """
    B, A = B.to(dtype), A.to(dtype)
    if bases:
        # note: the vectors feed later products, so non-finite factors are zeroed before the QR
        B, A, bad = _finite_or_zero(B, A)
        q_b, r_b = torch.linalg.qr(B)
        q_a, r_a = torch.linalg.qr(A.mT)
        return r_b.double() @ r_a.double().mT, bad, q_b, q_a
    r_b = torch.linalg.qr(B, mode="r").R  # (..., min(m,k), k)
    r_a = torch.linalg.qr(A.mT, mode="r").R  # (..., min(n,k), k)
    core = r_b.double() @ r_a.double().mT
    # note: values only: a NaN/Inf anywhere in a factor poisons its R, so checking the small core is
    # enough, and scanning the factors themselves cost ~50 ms a snapshot at 1.5B shapes (measured)
    bad = ~torch.isfinite(core).flatten(-2).all(-1)
    if not bool(bad.any()):
        return core, None, None, None
    return torch.where(bad[..., None, None], 0.0, core), bad, None, None


def _core_singular_values(core: torch.Tensor, scale: float | torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Singular values of small float64 cores (batched) times ``|scale|``, the first ``width`` of them;
    NaN for a core that holds NaN/Inf (LAPACK's SVD refuses non-finite input: it runs on zeros there)."""
    bad = ~torch.isfinite(core).flatten(-2).all(-1)
    if bool(bad.any()):
        core = torch.where(bad[..., None, None], 0.0, core)
    sv = torch.linalg.svdvals(core)[..., :width]
    sv = sv * _abs_scale(scale, sv)
    if bool(bad.any()):
        sv[bad] = float("nan")
    return sv


def update_singular_values(
    B_t: torch.Tensor, A_t: torch.Tensor, B_0: torch.Tensor, A_0: torch.Tensor, scale: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Singular values of the update since init ``scale * (B_t A_t - B_0 A_0)``, rank <= 2k, factored.

    Written as ``[B_t - B_0, B_0] @ [A_t; A_t - A_0]`` (equal to ``[B_t, -B_0] @ [A_t; A_0]``)
    so that the differences are taken on the factors, exactly, before any QR: no cancellation
    noise, and exactly zero when nothing moved (step 0).

    Args:
        B_t, A_t (Tensor): current factors (..., m, k) and (..., k, n).
        B_0, A_0 (Tensor): factors at initialisation, same shapes.
        scale (float | Tensor): as in :func:`factored_singular_values`.

    Returns:
        Tensor (..., min(m, n, 2k)).
    """
    m, k, n = B_t.shape[-2], B_t.shape[-1], A_t.shape[-1]
    width = min(m, n, 2 * k)
    if not B_0.any() or not A_0.any():
        # B_0 A_0 = 0 (plain LoRA, AdaLoRA, MiSS): the update is the product, rank <= k
        sv = factored_singular_values(B_t, A_t, scale)
        return torch.nn.functional.pad(sv, (0, width - sv.shape[-1]))
    return factored_singular_values(*update_factors(B_t, A_t, B_0, A_0), scale)


def update_factors(
    B_t: torch.Tensor, A_t: torch.Tensor, B_0: torch.Tensor | None = None, A_0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` with ``B_t A_t - B_0 A_0 = L @ R``, the differences taken on the factors (float64).

    ``L = [B_t - B_0, B_0]``, ``R = [A_t; A_t - A_0]``; just ``(B_t, A_t)`` when B_0 or A_0 is None.
    """
    if B_0 is None or A_0 is None:
        return B_t.double(), A_t.double()
    B_t, A_t, B_0, A_0 = B_t.double(), A_t.double(), B_0.double(), A_0.double()
    return torch.cat([B_t - B_0, B_0], dim=-1), torch.cat([A_t, A_t - A_0], dim=-2)


def init_bases(B_0: torch.Tensor, A_0: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """Reduced QR factors ``(Q_b, R_b, Q_a, R_a)`` of ``B_0`` and ``A_0^T``: computed once per run and
    reused by :func:`product_and_update_singular_values` at every snapshot."""
    q_b, r_b = torch.linalg.qr(B_0.to(dtype))
    q_a, r_a = torch.linalg.qr(A_0.mT.to(dtype))
    # note: column-major Q (each column contiguous): its transpose is what _split multiplies with
    return q_b.mT.contiguous().mT, r_b, q_a.mT.contiguous().mT, r_a


def product_and_update_singular_values(
    B_t: torch.Tensor,
    A_t: torch.Tensor,
    B_0: torch.Tensor,
    A_0: torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    bases: tuple | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of ``scale * B_t A_t`` and of ``scale * (B_t A_t - B_0 A_0)`` at once.

    Reuses the QR of ``B_0`` (``Q_b R_b``, from :func:`init_bases`): the moved part ``D = B_t - B_0``
    (taken on the factors, exactly) is split into ``Q_b C`` and a remainder ``E`` orthogonal to
    ``Q_b`` (projected twice: "twice is enough" keeps E orthogonal in float32), ``E = Q_e R_e``.
    In the orthonormal basis ``[Q_b, Q_e]``: ``B_0 = [R_b; 0]``, ``D = [C; R_e]``; the same for
    ``A^T``. Both spectra then come from 2k x 2k cores, ``X_t Y_t^T`` and
    ``X_d Y_t^T + X_0 Y_d^T`` (no cancellation: the differences are the factors'), for one
    QR of an m x k matrix per side instead of a QR of m x k plus one of m x 2k as
    :func:`update_singular_values` with :func:`factored_singular_values` cost.

    Needs ``m, n >= 2k`` (the bases [Q_b, Q_e] are then orthonormal); otherwise it falls back to
    the two separate functions.

    Args:
        B_t, A_t (Tensor): current factors (..., m, k) and (..., k, n).
        B_0, A_0 (Tensor): factors at initialisation, same shapes.
        scale (float | Tensor): as in :func:`factored_singular_values`.
        bases (tuple, optional): ``init_bases(B_0, A_0, dtype)``; computed here if not given.
        dtype (torch.dtype, defaults to float64): precision of the tall products and QRs (see
            :func:`factored_singular_values`); the cores are float64.

    Returns:
        (product (..., min(m, n, k)), update (..., min(m, n, 2k))).
    """
    m, k, n = B_t.shape[-2], B_t.shape[-1], A_t.shape[-1]
    if m < 2 * k or n < 2 * k:
        return (factored_singular_values(B_t, A_t, scale, dtype), update_singular_values(B_t, A_t, B_0, A_0, scale))
    q_b, r_b0, q_a, r_a0 = bases if bases is not None else init_bases(B_0, A_0, dtype)
    x_d, x_0 = _split(B_t.to(dtype) - B_0.to(dtype), q_b, r_b0)
    y_d, y_0 = _split(A_t.mT.to(dtype) - A_0.mT.to(dtype), q_a, r_a0)
    y_t = y_0 + y_d
    core_p = (x_0 + x_d) @ y_t.mT
    core_u = x_d @ y_t.mT + x_0 @ y_d.mT
    return _core_singular_values(core_p, scale, min(m, n, k)), _core_singular_values(core_u, scale, min(m, n, 2 * k))


def _split(D: torch.Tensor, Q: torch.Tensor, R0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates of ``D`` and of ``Q R0`` in the orthonormal basis ``[Q, Q_e]`` (float64, (..., 2k, k)).

    Worked on the transposes (k x m rows): with column-major D and Q (as the tracker stacks them)
    these are contiguous, the products are fused multiply-adds, and E^T's transpose is the
    column-major input LAPACK's QR wants.
    """
    batch, (m, k) = D.shape[:-2], D.shape[-2:]
    Dt, Qt = D.mT.reshape(-1, k, m), Q.mT.reshape(-1, Q.shape[-1], m)
    ct = Dt @ Qt.mT
    et = torch.baddbmm(Dt, ct, Qt, alpha=-1)
    c2t = et @ Qt.mT
    et.baddbmm_(c2t, Qt, alpha=-1)
    r_e = torch.linalg.qr(et.mT, mode="r").R.reshape(*batch, -1, k)
    c = (ct + c2t).mT.reshape(*batch, -1, k)
    x_d = torch.cat([c.double(), r_e.double()], dim=-2)
    x_0 = torch.cat([R0.double(), torch.zeros_like(r_e, dtype=torch.float64)], dim=-2)
    return x_d, x_0


def topk_singular_values(
    B: torch.Tensor, A: torch.Tensor, scale: float | torch.Tensor = 1.0, k: int = 8
) -> torch.Tensor:
    """The top ``k`` singular values of ``scale * B @ A`` (``compute_full_svd=False``).

    The factored path costs the same for k values as for all of them (the SVD of the small core
    is negligible next to the QRs), so this is the factored spectrum truncated.
    """
    return factored_singular_values(B, A, scale)[..., :k]


def dense_singular_values(W: torch.Tensor) -> torch.Tensor:
    """All singular values of a dense matrix, float64 (the reference path; O(m n min(m, n)))."""
    W, _, bad = _finite_or_zero(W.double(), W.double())
    sv = torch.linalg.svdvals(W)
    if bad is not None:
        sv[bad] = float("nan")
    return sv


def top_singular_values(
    W: torch.Tensor, k: int, oversample: int | None = None, max_iter: int = 60, tol: float = 1e-10, seed: int = 0
) -> torch.Tensor:
    """Top ``k`` singular values of a dense matrix by randomized subspace iteration (float64).

    Hand-written rather than `lowrank_svd` (which the full fine-tuning spectrum and the alignment
    tracker's W0 basis use) because it needs a stopping rule: svd_lowrank restarts from scratch for
    each number of iterations, and doubling them until the values settle took 23.5 s against this
    loop's 3.6 s for the same 1e-10 tolerance (1536 x 8960, k = 16, a DoRA-like spectrum, 1 thread).

    Converges geometrically at rate sigma_{k+p+1}/sigma_k per iteration and stops once the top k
    estimates move by less than ``tol * sigma_1``; for a spectrum without a gap after the k-th value
    the result after ``max_iter`` iterations is a close lower bound (Rayleigh-Ritz values never
    exceed the true ones). Small matrices go through the dense SVD, which is then cheaper.

    Args:
        W (Tensor): (m, n).
        k (int): how many values.
        oversample (int, optional): extra subspace columns p; default max(k, 8).
        max_iter (int): iteration cap. tol (float): stopping tolerance relative to sigma_1.
        seed (int): seed of the start block (results are reproducible).
    """
    m, n = W.shape
    width = min(k + (max(k, 8) if oversample is None else oversample), m, n)
    if not torch.isfinite(W).all():
        return torch.full((min(k, m, n),), float("nan"), dtype=torch.float64, device=W.device)
    W = W.double()
    if 2 * width >= min(m, n):
        return torch.linalg.svdvals(W)[:k]
    gen = torch.Generator(device=W.device).manual_seed(seed)
    Q = torch.linalg.qr(W @ torch.randn(n, width, generator=gen, dtype=W.dtype, device=W.device)).Q
    previous = None
    for _ in range(max_iter):
        Z = torch.linalg.qr(W.T @ Q).Q
        Y = W @ Z
        estimate = torch.linalg.svdvals(Y)[:k]
        if previous is not None and (estimate - previous).abs().max() <= tol * max(float(estimate[0]), 1e-300):
            break
        previous = estimate
        Q = torch.linalg.qr(Y).Q
    return estimate


def lowrank_svd(
    W: torch.Tensor, k: int, oversample: int | None = None, niter: int = 6, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``k`` singular triplets ``(U, S, V)`` of a dense matrix by ``torch.svd_lowrank``.

    The one fixed-iteration randomized SVD of the package: the full fine-tuning update spectrum
    (`lowrank_singular_values`) and the alignment tracker's W0 basis both come from here.
    Randomized range finder with ``q = k + oversample`` columns and ``niter`` subspace iterations
    (Halko, Martinsson & Tropp 2011): the error of sigma_i shrinks like (sigma_{q+1}/sigma_i)^(2 niter + 1).
    The random start block is drawn from a forked RNG seeded with ``seed``, so the result is
    reproducible and training's random stream is left untouched. When ``q`` reaches min(m, n) the
    exact thin SVD is cheaper and is used instead. Runs in W's dtype and on W's device.

    Args:
        W (Tensor): (m, n), finite.
        k (int): how many triplets, 1 <= k <= min(m, n).
        oversample (int, optional): extra columns; default max(k, 8).
        niter (int, defaults to 6): subspace iterations.
        seed (int, defaults to 0): seed of the start block.

    Returns:
        U (m, k), S (k,) descending, V (n, k).
    """
    m, n = W.shape
    q = k + (max(k, 8) if oversample is None else int(oversample))
    if q >= min(m, n):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k].mT
    devices = [W.device] if W.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(W, q=q, niter=niter)
    return U[:, :k], S[:k], V[:, :k]


def lowrank_singular_values(
    W: torch.Tensor, k: int, oversample: int | None = None, niter: int = 6, seed: int = 0
) -> torch.Tensor:
    """Top ``k`` singular values of a dense matrix by `lowrank_svd`, in float32.

    The full fine-tuning update ``W_t - W_0`` is full rank, so only its top ``k`` values are kept.
    A decaying spectrum comes out to float32 accuracy (~1e-6 sigma_1), while a flat, noise-like one
    (a first Adam step) gives values a little low (measured: <1% for Gaussian noise, 1e-4 on a 2-step
    GRPO run). It runs in float32 (float64 only for float64 input): measured with
    ``benchmarks/full_update_spectrum.py``, float64 is ~10x slower on a CPU, and consumer GPUs run it at
    1/32 speed or less; the exact fallback of small matrices runs in float64.

    Args:
        W (Tensor): (m, n).
        k (int): how many values.
        oversample (int, optional): extra columns; default max(k, 8).
        niter (int, defaults to 6): subspace iterations.
        seed (int, defaults to 0): seed of the start block.

    Returns:
        float64 Tensor (min(k, m, n),), descending; NaN when W holds NaN/Inf.
    """
    m, n = W.shape
    k = min(int(k), m, n)
    if not torch.isfinite(W).all():
        return torch.full((k,), float("nan"), dtype=torch.float64, device=W.device)
    q = k + (max(k, 8) if oversample is None else int(oversample))
    if q >= min(m, n):
        return torch.linalg.svdvals(W.double())[:k]
    W = W if W.dtype == torch.float64 else W.float()
    return lowrank_svd(W, k, oversample, niter, seed)[1].double()


# -------------------------------------------------------------------- metrics
def spectrum_metrics(sv: torch.Tensor, rtol: float = DEFAULT_RTOL) -> dict[str, torch.Tensor]:
    """Every metric of METRIC_NAMES for each spectrum in a batch (conventions: module docstring).

    Args:
        sv (Tensor): (..., k) singular values; NaN entries are padding.
        rtol (float): numerical-support tolerance relative to sigma_1.

    Returns:
        dict name -> float64 Tensor (...).
    """
    sv = sv.double()
    present = ~torch.isnan(sv)
    defined = present.any(-1) & torch.where(present, torch.isfinite(sv), True).all(-1)
    x = torch.where(present & torch.isfinite(sv), sv.abs(), 0.0)
    x = torch.sort(x, dim=-1, descending=True).values
    s1 = x[..., 0] if x.shape[-1] else torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    zero = s1 == 0
    u = x / torch.where(zero, 1.0, s1).unsqueeze(-1)  # relative to sigma_1: scale-free
    sum_u, sum_u2 = u.sum(-1), (u * u).sum(-1)
    safe_u2 = torch.where(zero, 1.0, sum_u2)
    p = u / torch.where(zero, 1.0, sum_u).unsqueeze(-1)
    entropy = -(torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)).sum(-1)
    support = u > rtol
    n_support = support.sum(-1)
    last = (n_support - 1).clamp(min=0).unsqueeze(-1)
    s_min = torch.gather(x, -1, last).squeeze(-1) if x.shape[-1] else s1
    energy = torch.cumsum(u * u, -1) / safe_u2.unsqueeze(-1)

    def top(k):
        return energy[..., min(k, x.shape[-1]) - 1] if x.shape[-1] else torch.zeros_like(s1)

    nan = torch.full_like(s1, float("nan"))
    s2 = torch.where(support[..., 1], x[..., 1], 0.0) if x.shape[-1] > 1 else torch.zeros_like(s1)
    out = {
        "spectral_gap": torch.where(zero, 0.0, s1 - s_min),
        "spectral_gap_12": torch.where(zero, 0.0, s1 - s2),
        "condition_number": torch.where(zero, nan, s1 / torch.where(zero, 1.0, s_min)),
        "effective_rank": torch.where(zero, 0.0, sum_u * sum_u / safe_u2),
        "entropy_effective_rank": torch.where(zero, 0.0, torch.exp(entropy)),
        "stable_rank": torch.where(zero, 0.0, sum_u2),
        "nuclear_norm": s1 * sum_u,
        "frobenius_norm": s1 * torch.sqrt(sum_u2),
        "top1_sv_ratio": torch.where(zero, nan, top(1)),
        "top5_sv_ratio": torch.where(zero, nan, top(5)),
        "top10_sv_ratio": torch.where(zero, nan, top(10)),
        "numerical_rank": n_support.double(),
    }
    return {name: torch.where(defined, value, nan) for name, value in out.items()}


def vector_metrics(v: torch.Tensor, v0: torch.Tensor) -> dict[str, torch.Tensor]:
    """IA3 / LayerNorm tuning: ``vector_norm`` = ||v||, ``vector_distance_from_init`` = ||v - v0||."""
    v, v0 = v.double(), v0.double()
    return {"vector_norm": torch.linalg.vector_norm(v), "vector_distance_from_init": torch.linalg.vector_norm(v - v0)}


def dora_metrics(
    W0: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor,
    k: int,
    full: bool = False,
) -> dict[str, torch.Tensor]:
    """DoRA's magnitude and direction, and the spectrum of its effective weight change.

    DoRA's weight is ``W' = diag(m / n) V`` with the direction ``V = W0 + s B A`` and ``n`` the
    per-output-row norms of V (peft computes n in the weights' dtype and treats it as a constant;
    so does this function, so that W' = W0 exactly at step 0). Returned:

    - ``magnitude_norm`` = ||m||; ``direction_norm`` = ||V||_F (the rows of the normalised direction
      V / n have unit norm, so its own norm is the constant sqrt(out); ||V||_F is what moves);
      ``magnitude_direction_ratio`` = ||m|| / ||V||_F, exactly 1 at init (m = n then).
    - ``effective_update_singular_values``: singular values of ``W' - W0 = (D - 1) W0 + D s B A``
      (D = diag(m / n)). This matrix is full rank once m moves, so there is no factored form: it is
      built densely (O(out*in) memory, what peft's DoRA forward builds anyway at every step) and its
      top ``k`` values come from :func:`top_singular_values` (``full=True``: all values, dense SVD,
      O(out*in*min(out, in))).

    Args:
        W0 (Tensor): base weight, out x in. B, A, scale: the LoRA factors. magnitude (Tensor): m (out,).
        k (int): how many singular values of the effective change.
        full (bool): all singular values by dense SVD instead of the top k.
    """
    dtype = W0.dtype
    lora = (B.to(dtype) @ A.to(dtype)) * scale
    row_norm = torch.linalg.norm(W0 + lora, dim=1)  # as peft's DoraLinearLayer.get_weight_norm
    factor = (magnitude.to(dtype) / row_norm).double()
    change = (factor - 1.0).unsqueeze(1) * W0.double() + factor.unsqueeze(1) * (B.double() @ A.double()) * scale
    magnitude_norm = torch.linalg.vector_norm(magnitude.double())
    direction_norm = torch.linalg.vector_norm(row_norm.double())
    sv = dense_singular_values(change) if full else top_singular_values(change, k)
    return {
        "magnitude_norm": magnitude_norm,
        "direction_norm": direction_norm,
        "magnitude_direction_ratio": magnitude_norm / direction_norm if direction_norm > 0 else torch.tensor(math.nan),
        "effective_update_singular_values": sv,
    }


# -------------------------------------------------------------------- helpers
def _finite_or_zero(B: torch.Tensor, A: torch.Tensor):
    """``B, A`` with non-finite batch entries zeroed (LAPACK may fail on them) + their mask (None: all finite)."""
    finite = torch.isfinite(B).flatten(-2).all(-1) & torch.isfinite(A).flatten(-2).all(-1)
    if bool(finite.all()):
        return B, A, None
    bad = ~finite
    B = torch.where(bad[..., None, None], 0.0, B)
    A = torch.where(bad[..., None, None], 0.0, A)
    return B, A, bad


def _abs_scale(scale, sv: torch.Tensor) -> torch.Tensor:
    scale = torch.as_tensor(scale, dtype=sv.dtype, device=sv.device).abs()
    return scale.unsqueeze(-1) if scale.ndim else scale


@contextlib.contextmanager
def _one_cpu_thread():
    """Run CPU linear algebra on one thread, then restore the setting.

    The snapshot is hundreds of small LAPACK calls (QR of n x r factors): intra-op threads gain
    little on them, and on a shared CPU OpenMP's spin-waiting made them up to 60x slower (measured
    with benchmarks/spectral_snapshot.py: 9.8 s with 2 threads vs 0.16 s with 1 on a loaded 2-core
    machine). GPU work is unaffected.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _column_major(matrices: list[torch.Tensor]) -> torch.Tensor:
    """Stack m x k matrices with each one in column-major order, the layout LAPACK's QR works in:
    2.4x faster QR than the row-major stack of peft's lora_B weights (benchmarks/spectral_snapshot.py)."""
    return torch.stack([x.mT for x in matrices]).mT
