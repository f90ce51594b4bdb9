"""Where an adapter's update lives relative to the base weight's singular subspaces: pure functions on tensors.

Notation: ``W0`` is the base weight (out x in = m x n) with thin SVD ``W0 = U S V^T`` (p = min(m, n)
singular values, descending); ``U_k``, ``V_k`` are its top-k singular vectors, ``U_-k``, ``V_-k``
its bottom-k (the k smallest of the p values). The update since initialisation is kept factored,

    dW = s (B_t A_t - B_0 A_0) = s L R,   L = [B_t - B_0, B_0] (m x 2r),  R = [A_t; A_t - A_0] (2r x n)

(``L = B_t``, ``R = A_t`` when B_0 A_0 = 0), differences taken on the factors so that dW is
exactly zero when nothing moved. With ``L = Q_L R_L`` and ``R^T = Q_R R_R`` (thin QRs) and the SVD
of the small core ``s R_L R_R^T = P Sigma Q^T``, the compact SVD of dW is
``(Q_L P) Sigma (Q_R Q)^T``: cost O((m + n) r^2), exact, and the m x n product is never formed.

Quantities (all rotation-invariant, so the arbitrary signs of singular vectors do not matter):

- energy fractions ``||U_k^T dW||_F^2 / ||dW||_F^2`` (left) and ``||dW V_k||_F^2 / ||dW||_F^2``
  (right), for the top-k and bottom-k subspaces; in [0, 1]. A random update has expected fraction
  k/m (left) and k/n (right): the "chance" level.
- principal angle cosines between the column space of dW (its numerical rank rho) and span(U_k):
  the singular values of ``U_k^T U_dW``, min(k, rho) of them, descending; 1 = a shared direction.
- amplification factor (Hu et al. 2021, LoRA, section 7.3): ``||dW||_F / ||U_dW^T W0 V_dW||_F``
  with U_dW, V_dW the rho singular directions of dW: how much dW amplifies directions that W0
  itself barely uses.
- intruder dimensions (Shuttleworth et al. 2024, "LoRA vs full fine-tuning: an illusion of
  equivalence"): among the top-k left singular vectors y_j of the tuned weight ``W0 + dW``, those
  whose largest |cosine| with any left singular vector of W0 (all p of the thin SVD) is below
  epsilon (0.5 in the paper). Needs the top-k singular vectors of the dense m x n tuned weight
  (:func:`top_left_singular_vectors`): O(m n p).

Conventions: a zero update (B = 0 at LoRA init, every method at step 0) has no direction: energy
fractions, angles and the amplification factor are NaN (0/0); its intruder count is 0 (the tuned
weight is W0, every vector matches itself). Non-finite factors give NaN everywhere. Numerical rank:
singular values of dW above ``rtol * sigma_1`` (as in :mod:`perl.trackers.spectral_math`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spectral_math import DEFAULT_RTOL, factored_core, lowrank_svd, update_factors

__all__ = [
    "BaseSVD",
    "UpdateSVD",
    "base_svd",
    "full_left_basis",
    "update_factors",
    "factored_update_svd",
    "subspace_energy_fraction",
    "principal_angle_cosines",
    "amplification_factor",
    "intruder_dimensions",
    "top_left_singular_vectors",
    "DEFAULT_EPSILON",
    "DEFAULT_RTOL",
]

DEFAULT_EPSILON = 0.5
_GRAM_RTOL = 1e-8  # sigma_k^2 / sigma_1^2 below which the Gram route hands over to the SVD


# -------------------------------------------------------------------- the base weight
@dataclass
class BaseSVD:
    """Top-k and bottom-k singular triplets of one base weight (float64).

    Attributes:
        U_top (Tensor m x k), S_top (k,), V_top (n x k): largest first.
        U_bottom (Tensor m x k | None), S_bottom (k,) | None, V_bottom (n x k) | None: smallest
            first; None when only the top was computed (randomized SVD).
        U_full (Tensor m x p | None): every left singular vector of the thin SVD (full SVD only,
            when asked for): the reference set of the intruder count.
        randomized (bool): True when the top-k came from the randomized SVD (``lowrank_svd``).
    """

    U_top: torch.Tensor
    S_top: torch.Tensor
    V_top: torch.Tensor
    U_bottom: torch.Tensor | None
    S_bottom: torch.Tensor | None
    V_bottom: torch.Tensor | None
    U_full: torch.Tensor | None
    randomized: bool


def base_svd(
    W: torch.Tensor,
    k: int,
    randomized: bool = False,
    niter: int = 6,
    oversample: int | None = None,
    seed: int = 0,
    keep_full_left: bool = False,
) -> BaseSVD:
    """The top-k and (full SVD only) bottom-k singular triplets of a dense weight.

    Full: ``torch.linalg.svd`` in float64 (O(m n p); wide weights through their transpose); gives
    both ends of the spectrum.
    Randomized: `perl.trackers.spectral_math.lowrank_svd` with ``q = k + oversample`` columns and
    ``niter`` power iterations (seeded; the subspace error decays like (sigma_{q+1}/sigma_k)^(2 niter + 1));
    a randomized range finder resolves only the largest values, so the bottom-k is None then.

    Args:
        W (Tensor): (m, n) base weight.
        k (int): how many triplets at each end, 1 <= k <= min(m, n).
        randomized (bool): use the randomized ``lowrank_svd`` for the top-k only.
        niter (int): power iterations of the randomized SVD. oversample (int, optional): extra
            columns, default max(k, 8). seed (int): seed of the random test matrix.
        keep_full_left (bool): also return every left singular vector (full SVD only).
    """
    m, n = W.shape
    p = min(m, n)
    if not 1 <= k <= p:
        raise ValueError(f"k must be in [1, min(m, n) = {p}] for a {m} x {n} weight, got {k}.")
    W = W.detach().double()
    if randomized:
        U, S, V = lowrank_svd(W, k, oversample, niter, seed)
        return BaseSVD(U, S, V, None, None, None, None, True)
    U, S, V = _thin_svd(W)
    low = slice(p - k, p)
    return BaseSVD(
        U[:, :k],
        S[:k],
        V[:, :k],
        U[:, low].flip(-1),
        S[low].flip(-1),
        V[:, low].flip(-1),
        U if keep_full_left else None,
        False,
    )


def full_left_basis(W: torch.Tensor) -> torch.Tensor:
    """Every left singular vector of the thin SVD of W (m x p, float64): the intruder reference set."""
    return _thin_svd(W.detach().double())[0]


def _thin_svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, V)`` of the thin SVD; a wide matrix goes through its transpose (LAPACK's gesdd is several
    times slower on wide than on tall inputs on CPU: measured 76 s vs 23 s for 1536 x 8960 float64)."""
    if W.shape[0] < W.shape[1]:
        U, S, Vh = torch.linalg.svd(W.mT, full_matrices=False)
        return Vh.mT, S, U
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U, S, Vh.mT


# -------------------------------------------------------------------- the factored update
@dataclass
class UpdateSVD:
    """Compact SVD of a factored update dW = U diag(S) V^T (batched over leading dims, float64).

    Attributes:
        U (Tensor ..., m, w), S (..., w) descending, V (..., n, w): w = min(m, n, width of L).
            Columns past ``rank`` span nothing of dW (their S is below rtol * sigma_1, often 0).
        rank (Tensor ..., int64): numerical rank (0 for a zero update).
        finite (Tensor ..., bool): False where the factors held NaN/Inf (then S is NaN).
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    rank: torch.Tensor
    finite: torch.Tensor

    @property
    def frobenius_norm(self) -> torch.Tensor:
        """||dW||_F = sqrt(sum S^2)."""
        return torch.sqrt((self.S * self.S).sum(-1))


def factored_update_svd(
    L: torch.Tensor, R: torch.Tensor, scale: float | torch.Tensor = 1.0, rtol: float = DEFAULT_RTOL
) -> UpdateSVD:
    """Compact SVD of ``scale * L @ R`` without forming it (see the module docstring).

    Args:
        L (Tensor): (..., m, w). R (Tensor): (..., w, n).
        scale (float | Tensor): scalar, or one per batch entry (shape ``(...)``).
        rtol (float): numerical-rank tolerance relative to sigma_1.
    """
    core, bad, Q_L, Q_R = factored_core(L, R, bases=True)
    finite = torch.ones(core.shape[:-2], dtype=torch.bool, device=core.device) if bad is None else ~bad
    s = torch.as_tensor(scale, dtype=torch.float64, device=core.device)
    core = core * (s[..., None, None] if s.ndim else s)
    P, S, Qh = torch.linalg.svd(core, full_matrices=False)
    U, V = Q_L @ P, Q_R @ Qh.mT
    s1 = S[..., :1]
    rank = ((S > rtol * s1) & (s1 > 0)).sum(-1)
    S = torch.where(finite[..., None], S, float("nan"))
    return UpdateSVD(U, S, V, rank, finite)


# -------------------------------------------------------------------- alignment metrics
def subspace_energy_fraction(basis: torch.Tensor, U: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Fraction of ``dW = U diag(S) V^T``'s energy in span(basis): ``||basis^T dW||_F^2 / ||dW||_F^2``.

    The same function gives the right-side fraction ``||dW V_k||_F^2 / ||dW||_F^2`` when called
    with ``(V_k, V, S)``.

    Args:
        basis (Tensor): (..., m, k) orthonormal columns (e.g. W0's top-k left singular vectors).
        U (Tensor): (..., m, w) singular vectors of dW on the same side. S (Tensor): (..., w).

    Returns:
        Tensor (...): in [0, 1]; NaN for a zero update (0/0) or non-finite S.
    """
    S = S.double()
    proj = basis.double().mT @ U.double()  # (..., k, w)
    energy = (proj * proj * (S * S).unsqueeze(-2)).sum((-2, -1))
    total = (S * S).sum(-1)
    nan = torch.full_like(total, float("nan"))
    return torch.where(total > 0, energy / torch.where(total > 0, total, 1.0), nan)


def principal_angle_cosines(basis: torch.Tensor, U: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(basis) and dW's column space (its first ``rank`` columns of U).

    Args:
        basis (Tensor): (..., m, k) orthonormal. U (Tensor): (..., m, w) left singular vectors of dW.
        rank (Tensor): (...) numerical rank of dW.

    Returns:
        Tensor (..., min(k, w)): descending, in [0, 1]; NaN past min(k, rank) (all NaN for a zero update).
    """
    w = U.shape[-1]
    rank = torch.as_tensor(rank, device=U.device)
    keep = torch.arange(w, device=U.device) < rank.unsqueeze(-1)  # (..., w)
    cos = torch.linalg.svdvals(basis.double().mT @ (U.double() * keep.unsqueeze(-2))).clamp(0.0, 1.0)
    n_valid = torch.minimum(rank, torch.tensor(basis.shape[-1], device=U.device))
    valid = torch.arange(cos.shape[-1], device=U.device) < n_valid.unsqueeze(-1)
    return torch.where(valid, cos, float("nan"))


def amplification_factor(W0V: torch.Tensor, U: torch.Tensor, S: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """The LoRA paper's ``||dW||_F / ||U_dW^T W0 V_dW||_F`` over dW's ``rank`` singular directions.

    Args:
        W0V (Tensor): (..., m, w) the base weight times dW's right singular vectors, ``W0 @ V``
            (the caller forms it: W0 is dense and may be stored in another dtype or as a residual
            plus factors).
        U (Tensor): (..., m, w), S (..., w): dW's left singular vectors and values.
        rank (Tensor): (...) numerical rank of dW.

    Returns:
        Tensor (...): NaN for a zero update; +Inf when dW lies entirely where W0 is zero (e.g. W0's
        null spaces).
    """
    w = U.shape[-1]
    rank = torch.as_tensor(rank, device=U.device)
    keep = (torch.arange(w, device=U.device) < rank.unsqueeze(-1)).double()
    core = U.double().mT @ W0V.double()  # (..., w, w)
    core = core * keep.unsqueeze(-1) * keep.unsqueeze(-2)
    projected = torch.linalg.matrix_norm(core)
    norm = torch.sqrt((S.double() ** 2).sum(-1))
    out = norm / projected  # x/0 -> inf, as documented
    return torch.where((rank > 0) & torch.isfinite(norm), out, float("nan"))


def top_left_singular_vectors(W: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k left singular vectors of a dense matrix (m x k, float64, largest first).

    Through the symmetric eigendecomposition of the smaller Gram matrix (``W W^T`` for a wide W,
    whose eigenvectors are U; ``W^T W`` for a tall one, then ``U_k = W V_k / sigma_k``): exact for the
    top of the spectrum (float64 error ~1e-16 sigma_1^2 / gap) and 4-6x faster than ``torch.linalg.svd``
    on CPU at 1.5B shapes (measured 3.8 s vs 22.6 s for 8960 x 1536). Falls back to the SVD when
    sigma_k <= 1e-4 sigma_1, where the Gram's rounding (~1e-16 sigma_1^2) would show.
    """
    W = W.detach().double()
    m, n = W.shape
    if m <= n:
        evals, evecs = torch.linalg.eigh(W @ W.mT)
        if evals[-1] > 0 and evals[-k] > _GRAM_RTOL * evals[-1]:
            return evecs[:, -k:].flip(-1)
    else:
        evals, evecs = torch.linalg.eigh(W.mT @ W)
        if evals[-1] > 0 and evals[-k] > _GRAM_RTOL * evals[-1]:
            V = evecs[:, -k:].flip(-1)
            return (W @ V) / torch.sqrt(evals[-k:].flip(-1))
    return _thin_svd(W)[0][:, :k]


def intruder_dimensions(
    W_t: torch.Tensor, U0: torch.Tensor, k: int, epsilon: float = DEFAULT_EPSILON
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intruder dimensions of a tuned weight against the base weight's left singular vectors.

    Args:
        W_t (Tensor): (m, n) the tuned weight W0 + dW, dense; its top-k left singular vectors come
            from :func:`top_left_singular_vectors`, O(m n min(m, n)).
        U0 (Tensor): (m, K) W0's reference left singular vectors (all p of the thin SVD for the
            definition of Shuttleworth et al.).
        k (int): how many top singular vectors of W_t to test.
        epsilon (float): a vector is an intruder when its largest |cosine| with U0 is below this.

    Returns:
        ``(count, max_cosine)``: count (float64 scalar; NaN when W_t is not finite) and the (k,)
        largest |cosine| of each of W_t's top-k left singular vectors, largest singular value first.
    """
    if not bool(torch.isfinite(W_t).all()):
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=W_t.device)
        return nan, torch.full((k,), float("nan"), dtype=torch.float64, device=W_t.device)
    Y = top_left_singular_vectors(W_t, k)
    max_cos = (U0.double().mT @ Y).abs().amax(0)
    return (max_cos < epsilon).sum().double(), max_cos
