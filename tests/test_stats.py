"""perl.stats on planted data: intervals cover the true mean at their stated rate, tests reject a
planted difference and keep their level when there is none.

Coverage and rejection rates are estimated over many simulated "sweeps" (a few seeds each, drawn
from a known distribution with a fixed numpy seed, so the test is deterministic). A rate from N
draws has a binomial standard error sqrt(p (1 - p) / N); the tolerances are about 3.5 of those,
so a correct implementation fails with a probability far below 0.1% and a wrong one (a z quantile
instead of t, ddof=0, a one-sided p-value) fails for sure.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from perl import stats


def rate_tolerance(p: float, n: int) -> float:
    return 3.5 * math.sqrt(p * (1 - p) / n)


# ------------------------------------------------------------------------------ the t distribution
@pytest.mark.parametrize(
    ("q", "df", "expected"),
    [
        # values of the standard t table (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2)
        (0.975, 1, 12.706),
        (0.975, 2, 4.303),
        (0.975, 4, 2.776),
        (0.975, 30, 2.042),
        (0.995, 10, 3.169),
        (0.95, 5, 2.015),
    ],
)
def test_t_quantiles_match_the_table(q, df, expected):
    assert stats.t_ppf(q, df) == pytest.approx(expected, abs=1e-3)
    assert stats.t_ppf(1 - q, df) == pytest.approx(-expected, abs=1e-3)
    assert stats.t_cdf(stats.t_ppf(q, df), df) == pytest.approx(q, abs=1e-9)


def test_t_cdf_against_the_cauchy_and_the_normal_limit():
    # df = 1 is the Cauchy distribution: F(t) = 1/2 + atan(t)/pi
    for t in (-3.0, -0.5, 0.0, 1.0, 7.0):
        assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    # large df: the normal CDF
    for t in (-1.96, 0.3, 2.5):
        assert stats.t_cdf(t, 1e7) == pytest.approx(0.5 * (1 + math.erf(t / math.sqrt(2))), abs=1e-6)


# ------------------------------------------------------------------------------ intervals
def test_t_interval_by_hand():
    x = [0.21, 0.25, 0.19]
    iv = stats.t_interval(x, 0.95)
    mean, sd = np.mean(x), np.std(x, ddof=1)
    assert (iv.mean, iv.std, iv.n, iv.method) == (pytest.approx(mean), pytest.approx(sd), 3, "t")
    assert iv.low == pytest.approx(mean - 4.302653 * sd / math.sqrt(3), abs=1e-6)
    assert iv.high == pytest.approx(mean + 4.302653 * sd / math.sqrt(3), abs=1e-6)


def test_interval_edge_cases_are_defined():
    one = stats.t_interval([0.3, float("nan")])
    assert one.n == 1 and one.mean == pytest.approx(0.3) and math.isnan(one.low) and math.isnan(one.std)
    none = stats.t_interval([])
    assert none.n == 0 and math.isnan(none.mean)
    flat = stats.t_interval([0.5, 0.5, 0.5])
    assert (flat.low, flat.high, flat.std) == (0.5, 0.5, 0.0)
    with pytest.raises(ValueError, match="level must be in"):
        stats.t_interval([1, 2], level=95)
    with pytest.raises(ValueError, match="unknown interval method"):
        stats.mean_interval([1, 2], method="wald")


@pytest.mark.parametrize(
    ("n", "level", "draw"),
    [
        (3, 0.95, lambda rng, size: rng.normal(0.2, 0.05, size)),  # three seeds, as the shipped sweep
        (5, 0.90, lambda rng, size: rng.normal(-1.0, 3.0, size)),
        (8, 0.95, lambda rng, size: rng.uniform(0.0, 1.0, size)),  # not normal: t is still close
    ],
)
def test_t_interval_covers_the_true_mean_at_its_level(n, level, draw):
    rng = np.random.default_rng(1234)
    trials = 3000
    samples = draw(rng, (trials, n))
    true_mean = float(np.mean(draw(np.random.default_rng(99), 2_000_000)))  # the distribution's mean
    covered = 0
    for row in samples:
        iv = stats.t_interval(row, level)
        covered += iv.low <= true_mean <= iv.high
    rate = covered / trials
    assert abs(rate - level) < rate_tolerance(level, trials), f"coverage {rate:.3f}, stated {level}"


def test_normal_quantile_instead_of_t_would_undercover():
    """The check above has power: a 1.96 interval with 3 seeds covers far less than 95%."""
    rng = np.random.default_rng(5)
    samples = rng.normal(0.0, 1.0, (3000, 3))
    half = 1.96 * samples.std(axis=1, ddof=1) / math.sqrt(3)
    rate = float(np.mean(np.abs(samples.mean(axis=1)) <= half))
    assert rate < 0.95 - rate_tolerance(0.95, 3000)


def test_bootstrap_interval_covers_with_enough_seeds_and_undercovers_with_three():
    rng = np.random.default_rng(7)
    trials = 600
    covered = sum(
        (iv := stats.bootstrap_interval(rng.normal(5.0, 2.0, 40), 0.95, n_resamples=2000, seed=rng)).low
        <= 5.0
        <= iv.high
        for _ in range(trials)
    )
    # note: the percentile bootstrap is slightly narrow at n=40 (about 0.94)
    assert abs(covered / trials - 0.95) < rate_tolerance(0.95, trials) + 0.01
    # three seeds: the bootstrap mean never leaves the values' range, so it covers far less than stated
    covered3 = sum(
        (iv := stats.bootstrap_interval(rng.normal(5.0, 2.0, 3), 0.95, n_resamples=2000, seed=rng)).low
        <= 5.0
        <= iv.high
        for _ in range(trials)
    )
    assert covered3 / trials < 0.85
    assert stats.bootstrap_interval([1.0, 2.0, 4.0], seed=3) == stats.bootstrap_interval([1.0, 2.0, 4.0], seed=3)


# ------------------------------------------------------------------------------ tests of a difference
def test_welch_by_hand():
    a, b = np.array([0.21, 0.25, 0.19]), np.array([0.12, 0.09, 0.15, 0.11])
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 4
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    r = stats.welch_test(a, b)
    assert r.statistic == pytest.approx(t) and r.df == pytest.approx(df)
    assert r.pvalue == pytest.approx(2 * (1 - stats.t_cdf(abs(t), df)), rel=1e-9)
    half = stats.t_ppf(0.975, df) * math.sqrt(va + vb)
    assert (r.low, r.high) == (pytest.approx(r.diff - half), pytest.approx(r.diff + half))
    assert r.name == "Welch's unequal-variance t-test over seeds (two-sided)"


def test_permutation_test_exact_by_enumeration():
    a, b = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]
    r = stats.permutation_test(a, b)
    # of the 20 splits of {1..6} into 3 + 3, only {1,2,3} and {4,5,6} are as extreme as observed
    assert r.pvalue == pytest.approx(2 / 20) and r.min_pvalue == pytest.approx(0.1)
    assert not r.significant(0.05)  # with 3 + 3 seeds it cannot reach 0.05, and says so
    same = stats.permutation_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same.pvalue == pytest.approx(1.0)


def test_paired_t_by_hand_and_pairs_with_nan_dropped():
    a, b = [0.3, 0.5, 0.4, float("nan")], [0.2, 0.35, 0.3, 0.1]
    d = np.array([0.1, 0.15, 0.1])
    r = stats.paired_t_test(a, b)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    assert (r.n_a, r.df, r.statistic) == (3, 2.0, pytest.approx(t))
    assert r.pvalue == pytest.approx(2 * (1 - stats.t_cdf(t, 2)))
    with pytest.raises(ValueError, match="one value of each side per seed"):
        stats.paired_t_test([1, 2], [1, 2, 3])


@pytest.mark.parametrize(
    ("test", "n", "alpha"), [("welch", 3, 0.05), ("welch", 5, 0.10), ("permutation", 6, 0.05), ("paired_t", 4, 0.05)]
)
def test_no_difference_is_rejected_at_most_at_the_stated_level(test, n, alpha):
    rng = np.random.default_rng(2024)
    trials = 1500
    rejected = 0
    for _ in range(trials):
        a, b = rng.normal(0.3, 0.05, n), rng.normal(0.3, 0.05, n)
        rejected += stats.compare(a, b, test=test).pvalue < alpha
    rate = rejected / trials
    assert rate < alpha + rate_tolerance(alpha, trials), f"{test}: false positives {rate:.3f} at alpha {alpha}"
    if test != "permutation":  # note: the exact permutation test is conservative by construction
        assert rate > alpha - rate_tolerance(alpha, trials), f"{test}: level {rate:.3f}, far below {alpha}"


@pytest.mark.parametrize(
    ("test", "n", "shift"), [("welch", 3, 4.0), ("welch", 5, 2.5), ("permutation", 6, 2.5), ("paired_t", 4, 4.0)]
)
def test_a_planted_difference_is_detected(test, n, shift):
    """A shift of ``shift`` standard deviations between configurations: rejected in most draws."""
    rng = np.random.default_rng(11)
    trials = 400
    detected = sum(
        stats.compare(rng.normal(shift, 1.0, n), rng.normal(0.0, 1.0, n), test=test).pvalue < 0.05
        for _ in range(trials)
    )
    assert detected / trials > 0.8


def test_undefined_tests_are_nan_not_errors():
    assert math.isnan(stats.welch_test([0.1], [0.2, 0.3]).pvalue)
    assert math.isnan(stats.welch_test([0.5, 0.5], [0.5, 0.5]).pvalue)
    assert math.isnan(stats.permutation_test([], [0.1, 0.2]).pvalue)
    with pytest.raises(ValueError, match="unknown test"):
        stats.compare([1, 2], [3, 4], test="mannwhitney")


def test_holm_by_hand_and_family_wise_error():
    assert np.allclose(stats.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    adjusted = stats.holm([0.02, float("nan"), 0.001])
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.002)
    # 14 comparisons against one reference (the shipped sweep: 15 methods), none real: any false
    # rejection in at most alpha of the families after Holm; without it, in about half
    rng = np.random.default_rng(3)
    trials, any_raw, any_holm = 200, 0, 0
    for _ in range(trials):
        ref = rng.normal(0, 1, 3)
        p = [stats.welch_test(rng.normal(0, 1, 3), ref).pvalue for _ in range(14)]
        any_raw += min(p) < 0.05
        any_holm += np.nanmin(stats.holm(p)) < 0.05
    assert any_holm / trials < 0.05 + rate_tolerance(0.05, trials)
    assert any_raw / trials > 0.25
