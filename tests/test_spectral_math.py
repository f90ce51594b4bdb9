"""Spectral math against dense torch.linalg.svd: factored spectra, update since init, metrics' edge cases."""

import math

import pytest
import torch

from perl.trackers import spectral_math as sm


def dense_sv(M):
    return torch.linalg.svdvals(M.double())


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("m,n,k", [(64, 48, 4), (20, 300, 8), (256, 1536, 16), (6, 5, 8)])
def test_factored_matches_dense_svd(m, n, k):
    g = torch.Generator().manual_seed(m + n + k)
    B, A = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    got = sm.factored_singular_values(B, A, 0.37)
    want = dense_sv(0.37 * B.double() @ A.double())
    assert got.shape == (min(m, n, k),) and got.dtype == torch.float64
    assert rel_err(got, want[: got.numel()]) < 1e-12
    assert torch.all(got[:-1] >= got[1:])


def test_batched_equals_one_by_one_and_negative_scale():
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(5, 40, 6, generator=g), torch.randn(5, 6, 30, generator=g)
    scales = torch.tensor([1.0, 2.0, -0.5, 3.0, 1e-3], dtype=torch.float64)
    batched = sm.factored_singular_values(B, A, scales)
    for i in range(5):
        want = dense_sv(scales[i] * B[i].double() @ A[i].double())[:6]
        assert rel_err(batched[i], want) < 1e-12


def test_planted_rank_and_numerical_rank():
    # B has rank 3 of k = 8: exactly 3 nonzero values, the rest at float64 noise, counted as zero
    g = torch.Generator().manual_seed(2)
    B = torch.randn(100, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 8, generator=g, dtype=torch.float64)
    A = torch.randn(8, 70, generator=g, dtype=torch.float64)
    got = sm.factored_singular_values(B, A)
    want = dense_sv(B @ A)[:8]
    assert float((got - want).abs().max()) < 1e-10 * float(want[0])
    assert float(got[3:].max()) < 1e-12 * float(got[0])
    metrics = sm.spectrum_metrics(got)
    assert metrics["numerical_rank"] == 3
    # sigma_min is taken on the numerical support: a finite condition number, not 1e15
    assert math.isclose(float(metrics["condition_number"]), float(want[0] / want[2]), rel_tol=1e-9)
    assert math.isclose(float(metrics["spectral_gap"]), float(want[0] - want[2]), rel_tol=1e-9)


def test_update_since_init_matches_dense_and_is_zero_when_nothing_moved():
    g = torch.Generator().manual_seed(3)
    B0, A0 = torch.randn(50, 4, generator=g), torch.randn(4, 40, generator=g)
    Bt, At = B0 + 1e-3 * torch.randn(50, 4, generator=g), A0 + 1e-3 * torch.randn(4, 40, generator=g)
    got = sm.update_singular_values(Bt, At, B0, A0, 2.0)
    want = dense_sv(2.0 * (Bt.double() @ At.double() - B0.double() @ A0.double()))[:8]
    assert got.shape == (8,) and rel_err(got, want) < 1e-9
    # step 0: exactly zero (differences taken on the factors, no cancellation noise)
    zero = sm.update_singular_values(B0, A0, B0.clone(), A0.clone(), 2.0)
    assert torch.count_nonzero(zero) == 0
    # B_0 = 0 (plain LoRA): the update is the product, padded with exact zeros
    lora = sm.update_singular_values(Bt, At, torch.zeros_like(B0), A0, 2.0)
    assert torch.equal(lora[:4], sm.factored_singular_values(Bt, At, 2.0)) and torch.count_nonzero(lora[4:]) == 0


@pytest.mark.parametrize("m,n,k,move", [(60, 50, 4, 1e-3), (300, 200, 16, 1e-5), (40, 300, 8, 1.0), (7, 40, 4, 1e-3)])
def test_product_and_update_with_reused_init_bases_match_dense(m, n, k, move):
    g = torch.Generator().manual_seed(m * n + k)
    B0, A0 = 0.1 * torch.randn(3, m, k, generator=g), torch.randn(3, k, n, generator=g)
    Bt, At = B0 + move * torch.randn(3, m, k, generator=g), A0 + 0.1 * move * torch.randn(3, k, n, generator=g)
    scales = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):  # float32 QRs: the tracker's 1e-5 of sigma_1
        bases = sm.init_bases(B0, A0, dtype)
        prod, upd = sm.product_and_update_singular_values(Bt, At, B0, A0, scales, bases=bases, dtype=dtype)
        assert prod.shape == (3, min(m, n, k)) and upd.shape == (3, min(m, n, 2 * k)) and upd.dtype == torch.float64
        for i in range(3):
            want_p = dense_sv(scales[i] * Bt[i].double() @ At[i].double())
            want_u = dense_sv(scales[i] * (Bt[i].double() @ At[i].double() - B0[i].double() @ A0[i].double()))
            assert rel_err(prod[i], want_p[: prod.shape[-1]]) < tol, (dtype, "product")
            assert rel_err(upd[i], want_u[: upd.shape[-1]]) < tol, (dtype, "update")
    # nothing moved: the update is exactly zero, in float32 too
    _, zero = sm.product_and_update_singular_values(B0, A0, B0.clone(), A0.clone(), scales, dtype=torch.float32)
    assert torch.count_nonzero(zero) == 0
    # a module whose factors went NaN gives NaN, the others are unaffected
    bad = Bt.clone()
    bad[1, 0, 0] = float("nan")
    prod, upd = sm.product_and_update_singular_values(bad, At, B0, A0, scales, dtype=torch.float32)
    assert torch.isnan(prod[1]).all() and torch.isnan(upd[1]).all() and torch.isfinite(prod[[0, 2]]).all()


def test_float32_qrs_stay_within_1e5_of_sigma1():
    g = torch.Generator().manual_seed(7)
    B, A = torch.randn(4, 1536, 16, generator=g), torch.randn(4, 16, 256, generator=g)
    got = sm.factored_singular_values(B, A, 2.0, dtype=torch.float32)
    want = sm.factored_singular_values(B, A, 2.0)
    assert got.dtype == torch.float64 and rel_err(got, want) < 1e-5


def test_zero_matrix_metrics_are_defined():
    sv = sm.factored_singular_values(torch.zeros(30, 4), torch.randn(4, 20))
    assert torch.count_nonzero(sv) == 0
    m = sm.spectrum_metrics(sv)
    for name in (
        "effective_rank",
        "entropy_effective_rank",
        "stable_rank",
        "nuclear_norm",
        "frobenius_norm",
        "numerical_rank",
        "spectral_gap",
        "spectral_gap_12",
    ):
        assert float(m[name]) == 0.0, name
    for name in ("condition_number", "top1_sv_ratio", "top5_sv_ratio", "top10_sv_ratio"):
        assert math.isnan(float(m[name])), name
    for name in sm.METRIC_NAMES:
        assert "zero_matrix" in sm.METRIC_ATTRS[name]


def test_metrics_against_direct_formulas():
    sv = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.1], dtype=torch.float64)
    m = sm.spectrum_metrics(sv)
    p = sv / sv.sum()
    expected = {
        "effective_rank": sv.sum() ** 2 / (sv**2).sum(),
        "entropy_effective_rank": torch.exp(-(p * p.log()).sum()),
        "stable_rank": (sv**2).sum() / sv[0] ** 2,
        "nuclear_norm": sv.sum(),
        "frobenius_norm": (sv**2).sum().sqrt(),
        "top1_sv_ratio": sv[0] ** 2 / (sv**2).sum(),
        "top5_sv_ratio": (sv[:5] ** 2).sum() / (sv**2).sum(),
        "top10_sv_ratio": torch.tensor(1.0),
        "condition_number": torch.tensor(40.0),
        "spectral_gap": sv[0] - sv[-1],
        "spectral_gap_12": sv[0] - sv[1],
        "numerical_rank": torch.tensor(6.0),
    }
    for name, value in expected.items():
        assert math.isclose(float(m[name]), float(value), rel_tol=1e-12), name


def test_near_zero_matrix_has_scale_free_metrics():
    sv = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    big, tiny = sm.spectrum_metrics(sv), sm.spectrum_metrics(sv * 1e-30)
    for name in (
        "effective_rank",
        "entropy_effective_rank",
        "stable_rank",
        "condition_number",
        "top1_sv_ratio",
        "numerical_rank",
    ):
        assert math.isclose(float(big[name]), float(tiny[name]), rel_tol=1e-12), name
    assert math.isclose(float(tiny["nuclear_norm"]), 6e-30, rel_tol=1e-12)


def test_nan_padding_is_ignored_and_nonfinite_weights_give_nan():
    padded = sm.spectrum_metrics(torch.tensor([[3.0, 1.0, float("nan")], [3.0, 1.0, 0.0]]))
    assert float(padded["numerical_rank"][0]) == 2 and float(padded["effective_rank"][0]) == pytest.approx(1.6)
    assert float(padded["effective_rank"][1]) == pytest.approx(1.6)
    B = torch.randn(3, 20, 4)
    B[1, 0, 0] = float("inf")
    sv = sm.factored_singular_values(B, torch.randn(3, 4, 10))
    assert torch.isnan(sv[1]).all() and torch.isfinite(sv[[0, 2]]).all()
    m = sm.spectrum_metrics(sv)
    assert all(math.isnan(float(v[1])) for v in m.values())


def test_topk_and_randomized_top_values():
    g = torch.Generator().manual_seed(4)
    B, A = torch.randn(80, 16, generator=g), torch.randn(16, 60, generator=g)
    assert torch.equal(sm.topk_singular_values(B, A, 1.5, k=5), sm.factored_singular_values(B, A, 1.5)[:5])
    # a DoRA-like effective change: a low-rank part plus a small full-rank row rescaling of W0
    W0 = torch.randn(300, 200, generator=g, dtype=torch.float64)
    low = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 200, generator=g, dtype=torch.float64)
    change = 1e-2 * torch.randn(300, 1, generator=g, dtype=torch.float64) * W0 + low
    got = sm.top_singular_values(change, 6)
    assert rel_err(got, dense_sv(change)[:6]) < 1e-8


def test_dora_metrics_against_dense_construction():
    g = torch.Generator().manual_seed(5)
    W0 = torch.randn(40, 30, generator=g)
    B, A = 0.1 * torch.randn(40, 4, generator=g), torch.randn(4, 30, generator=g)
    m = torch.linalg.norm(W0, dim=1) * (1 + 0.05 * torch.randn(40, generator=g))
    out = sm.dora_metrics(W0, B, A, 2.0, m, k=4)
    V = W0.double() + 2.0 * B.double() @ A.double()
    effective = (m.double() / torch.linalg.norm(V, dim=1)).unsqueeze(1) * V
    assert rel_err(out["effective_update_singular_values"], dense_sv(effective - W0.double())[:4]) < 1e-6
    assert math.isclose(float(out["direction_norm"]), float(torch.linalg.norm(V)), rel_tol=1e-6)
    assert math.isclose(float(out["magnitude_norm"]), float(torch.linalg.norm(m.double())), rel_tol=1e-12)
    # at init (B = 0, m = row norms of W0) DoRA's weight is W0: zero change, ratio 1
    init = sm.dora_metrics(W0, torch.zeros_like(B), A, 2.0, torch.linalg.norm(W0, dim=1), k=4)
    assert torch.count_nonzero(init["effective_update_singular_values"]) == 0
    assert float(init["magnitude_direction_ratio"]) == pytest.approx(1.0, abs=1e-12)


def test_vector_metrics():
    v0 = torch.ones(10)
    v = v0 + torch.arange(10.0) * 0.1
    out = sm.vector_metrics(v, v0)
    assert float(out["vector_norm"]) == pytest.approx(float(torch.linalg.norm(v.double())))
    assert float(out["vector_distance_from_init"]) == pytest.approx(float(torch.linalg.norm(torch.arange(10.0) * 0.1)))


def test_spectral_gap_12_of_a_rank_one_matrix_is_sigma_1():
    """sigma_2 below the numerical support is zero: the usual gap of a rank-1 update is sigma_1."""
    m = sm.spectrum_metrics(torch.tensor([3.0, 1e-9, 0.0], dtype=torch.float64))
    assert float(m["spectral_gap_12"]) == 3.0 and float(m["spectral_gap"]) == 0.0
