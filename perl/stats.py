"""Uncertainty over seeds: the confidence interval of a configuration's mean, and whether two
configurations differ by more than their seed-to-seed spread.

An RL run is one draw from a noisy process (data order, sampling, adapter initialisation all follow
the seed), so a number from one seed says little. Here each configuration has a handful of values,
one per seed, and these functions say what they support.

Intervals of a mean (`mean_interval`):

- ``"t"`` (default): Student t, ``mean +- t_{(1+level)/2, n-1} * s / sqrt(n)`` with ``s`` the sample
  standard deviation (ddof=1). Exact coverage when the seeds' values are normal, close to it for
  mildly skewed ones; with 3 seeds it is wide on purpose (t_{0.975, 2} = 4.30).
- ``"bootstrap"``: percentile bootstrap over seeds. Needs no normality but under-covers badly with
  few seeds (with 3 it cannot be wider than the range of the values); use it from about 10 seeds.

Tests of a difference of means between configurations A and B (`compare`), all two-sided:

- ``"welch"`` (default): Welch's unequal-variance t-test, with the Welch-Satterthwaite degrees of
  freedom and a confidence interval of the difference. Assumes roughly normal values per seed.
- ``"permutation"``: exact two-sample permutation test of the difference of means (every split of
  the pooled values when there are at most ``max_exact`` of them, else ``n_resamples`` random ones).
  Assumption-free, but its smallest possible p-value is ``2 / C(n_a + n_b, n_a)`` for a two-sided
  test: 0.1 with 3 + 3 seeds, so it *cannot* reach 0.05 there; ``TestResult.min_pvalue`` says so.
- ``"paired_t"``: paired t-test of the per-seed differences, for runs that share a seed (same data
  order and sampling stream); only seeds present in both count.

Several comparisons at once (every method against LoRA) inflate false positives; `holm` adjusts
their p-values (Holm-Bonferroni, controls the family-wise error rate).

The t distribution's CDF is the regularized incomplete beta function of ``mpmath`` (installed with
torch through sympy); no SciPy is needed.

Usage:
    from perl import stats
    stats.mean_interval([0.21, 0.25, 0.19])                  # Interval(mean=0.2167, low=0.1408, high=0.2926, ...)
    stats.compare([0.21, 0.25, 0.19], [0.12, 0.09, 0.15])    # TestResult(test='welch', pvalue=0.0174, ...)
    stats.holm([0.01, 0.04, 0.03])                           # [0.03, 0.06, 0.06]
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CI_METHODS",
    "TESTS",
    "Interval",
    "TestResult",
    "bootstrap_interval",
    "compare",
    "holm",
    "mean_interval",
    "paired_t_test",
    "permutation_test",
    "t_cdf",
    "t_interval",
    "t_ppf",
    "welch_test",
]

CI_METHODS = {
    "t": "Student t interval over seeds: mean +- t_{(1+level)/2, n-1} * std / sqrt(n), std with ddof=1",
    "bootstrap": "percentile bootstrap over seeds (resampling the per-seed values with replacement)",
}
TESTS = {
    "welch": "Welch's unequal-variance t-test over seeds (two-sided)",
    "permutation": "exact two-sample permutation test of the difference of means over seeds (two-sided)",
    "paired_t": "paired t-test over the seeds both configurations ran (two-sided)",
}


@dataclass(frozen=True)
class Interval:
    """A mean over seeds with its spread and confidence interval.

    Args:
        mean (float): mean of the finite values (NaN when there are none).
        std (float): sample standard deviation, ddof=1 (NaN for fewer than 2 values).
        low, high (float): the confidence interval (NaN for fewer than 2 values).
        n (int): finite values used (NaN values are dropped, not counted).
        level (float): confidence level, e.g. 0.95.
        method (str): ``"t"`` or ``"bootstrap"`` (see `CI_METHODS`).
    """

    mean: float
    std: float
    low: float
    high: float
    n: int
    level: float
    method: str


@dataclass(frozen=True)
class TestResult:
    """A two-sided test of mean(a) - mean(b) over seeds.

    Args:
        test (str): the test's key in `TESTS`; ``name`` is its full name.
        diff (float): mean(a) - mean(b) (paired_t: the mean of the per-seed differences).
        low, high (float): confidence interval of ``diff`` (Welch / paired t; NaN for permutation).
        statistic (float): t statistic (permutation: the observed difference of means).
        df (float): degrees of freedom (NaN for permutation).
        pvalue (float): two-sided p-value; NaN when the test is undefined (too few values, no spread).
        n_a, n_b (int): values used from each side.
        min_pvalue (float): the smallest p-value this test can give with these n (permutation: the
            resolution of the exact test; t tests: 0).
        level (float): the level of ``low``/``high``.
    """

    test: str
    diff: float
    low: float
    high: float
    statistic: float
    df: float
    pvalue: float
    n_a: int
    n_b: int
    min_pvalue: float
    level: float

    @property
    def name(self) -> str:
        return TESTS[self.test]

    def significant(self, alpha: float = 0.05) -> bool:
        """True when ``pvalue < alpha`` (False for an undefined test)."""
        return bool(np.isfinite(self.pvalue) and self.pvalue < alpha)


# ====================================================================================== t distribution
def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom (regularized incomplete beta, mpmath)."""
    tail = 0.5 * _two_sided_p(t, df)  # P(T > |t|); NaN stays NaN
    return 1.0 - tail if t > 0 else tail


def _two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|): the regularized incomplete beta I_x(df/2, 1/2) at x = df / (df + t^2)."""
    import mpmath

    if not (df > 0) or math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return float(mpmath.betainc(df / 2.0, 0.5, 0, df / (df + t * t), regularized=True))


@functools.lru_cache(maxsize=512)
def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (bisection on `t_cdf`)."""
    if not (0.0 < q < 1.0) or not (df > 0):
        return math.nan
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:  # note: df=1 (Cauchy) at q=0.9995 needs hi ~ 640; doubling gets there fast
        lo, hi = hi, hi * 2.0
    # Newton steps on the CDF (its derivative is the density), bisection when a step leaves the bracket
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    t = 0.5 * (lo + hi)
    for _ in range(100):
        err = t_cdf(t, df) - q
        if err < 0:
            lo = t
        else:
            hi = t
        density = math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))
        step = t - err / density if density > 0 else math.nan
        t_next = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(t_next - t) <= 1e-13 * max(1.0, abs(t)) or hi - lo <= 1e-13 * max(1.0, hi):
            return t_next
        t = t_next
    return t


# ====================================================================================== intervals
def _finite(values) -> np.ndarray:
    arr = np.asarray(values, dtype=float).ravel()
    return arr[np.isfinite(arr)]


def _check_level(level: float) -> None:
    if not (0.0 < level < 1.0):
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, got {level!r}.")


def _seed_values(values: Sequence[float], level: float, method: str) -> tuple[np.ndarray, Interval | None]:
    """The finite values, and the interval to return as it is when fewer than two remain (else None)."""
    _check_level(level)
    x = _finite(values)
    n = int(x.size)
    if n >= 2:
        return x, None
    return x, Interval(float(x.mean()) if n else math.nan, math.nan, math.nan, math.nan, n, level, method)


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Student t confidence interval of the mean of ``values`` (NaN dropped).

    Args:
        values (sequence of float): one value per seed.
        level (float, default 0.95): confidence level.
    """
    x, too_few = _seed_values(values, level, "t")
    if too_few is not None:
        return too_few
    n, mean = int(x.size), float(x.mean())
    std = float(x.std(ddof=1))
    half = t_ppf(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)
    return Interval(mean, std, mean - half, mean + half, n, level, "t")


def bootstrap_interval(
    values: Sequence[float], level: float = 0.95, n_resamples: int = 10000, seed: int | np.random.Generator | None = 0
) -> Interval:
    """Percentile bootstrap confidence interval of the mean of ``values`` (NaN dropped).

    With few seeds it is too narrow (3 seeds: never wider than their range); prefer `t_interval`.

    Args:
        values (sequence of float): one value per seed.
        level (float, default 0.95): confidence level.
        n_resamples (int, default 10000): bootstrap resamples.
        seed (int | np.random.Generator | None, default 0): randomness of the resampling; the
            default makes the interval reproducible.
    """
    x, too_few = _seed_values(values, level, "bootstrap")
    if too_few is not None:
        return too_few
    n, mean = int(x.size), float(x.mean())
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    means = x[rng.integers(0, n, size=(int(n_resamples), n))].mean(axis=1)
    low, high = np.quantile(means, [0.5 - level / 2.0, 0.5 + level / 2.0])
    return Interval(mean, float(x.std(ddof=1)), float(low), float(high), n, level, "bootstrap")


def mean_interval(values: Sequence[float], level: float = 0.95, method: str = "t", **kwargs) -> Interval:
    """The confidence interval of the mean of ``values`` by ``method`` (``"t"`` or ``"bootstrap"``).

    Usage:
        >>> round(mean_interval([0.21, 0.25, 0.19]).low, 4)
        0.1408
    """
    if method == "t":
        return t_interval(values, level)
    if method == "bootstrap":
        return bootstrap_interval(values, level, **kwargs)
    raise ValueError(f"unknown interval method {method!r}; use one of {', '.join(CI_METHODS)}.")


# ====================================================================================== tests
def welch_test(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> TestResult:
    """Welch's two-sided t-test of mean(a) - mean(b), with its confidence interval (NaN dropped).

    Undefined (NaN p-value) with fewer than 2 values on a side, or when neither side varies.
    """
    _check_level(level)
    x, y = _finite(a), _finite(b)
    na, nb = int(x.size), int(y.size)
    diff = float(x.mean() - y.mean()) if na and nb else math.nan
    if na < 2 or nb < 2:
        return TestResult("welch", diff, math.nan, math.nan, math.nan, math.nan, math.nan, na, nb, 0.0, level)
    va, vb = float(x.var(ddof=1)) / na, float(y.var(ddof=1)) / nb
    se2 = va + vb
    if not se2 > 0:
        return TestResult("welch", diff, diff, diff, math.nan, math.nan, math.nan, na, nb, 0.0, level)
    se = math.sqrt(se2)
    df = float(se2 * se2 / (va * va / (na - 1) + vb * vb / (nb - 1)))
    t = diff / se
    half = t_ppf(0.5 + level / 2.0, df) * se
    return TestResult("welch", diff, diff - half, diff + half, t, df, _two_sided_p(t, df), na, nb, 0.0, level)


def paired_t_test(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> TestResult:
    """Two-sided paired t-test: ``a[i]`` and ``b[i]`` are the same seed (pairs with a NaN are dropped)."""
    _check_level(level)
    x, y = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"a paired test needs one value of each side per seed; got {x.size} and {y.size} values.")
    keep = np.isfinite(x) & np.isfinite(y)
    d = x[keep] - y[keep]
    n = int(d.size)
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return TestResult("paired_t", mean, math.nan, math.nan, math.nan, math.nan, math.nan, n, n, 0.0, level)
    sd = float(d.std(ddof=1))
    if not sd > 0:
        return TestResult("paired_t", mean, mean, mean, math.nan, float(n - 1), math.nan, n, n, 0.0, level)
    se = sd / math.sqrt(n)
    t = mean / se
    half = t_ppf(0.5 + level / 2.0, n - 1) * se
    return TestResult(
        "paired_t", mean, mean - half, mean + half, t, float(n - 1), _two_sided_p(t, n - 1), n, n, 0.0, level
    )


def permutation_test(
    a: Sequence[float],
    b: Sequence[float],
    n_resamples: int = 20000,
    max_exact: int = 20000,
    seed: int | np.random.Generator | None = 0,
    level: float = 0.95,
) -> TestResult:
    """Two-sided two-sample permutation test of mean(a) - mean(b) (NaN dropped).

    Exact (every way of splitting the pooled values into groups of n_a and n_b) when there are at
    most ``max_exact`` splits; otherwise ``n_resamples`` random splits with p = (1 + hits) / (1 + n)
    (never 0). ``min_pvalue`` is the smallest p-value the exact test can give: with 3 + 3 seeds,
    0.1; the test then cannot reject at 0.05 however different the values are.
    """
    _check_level(level)
    x, y = _finite(a), _finite(b)
    na, nb = int(x.size), int(y.size)
    diff = float(x.mean() - y.mean()) if na and nb else math.nan
    if na < 1 or nb < 1 or na + nb < 3:
        return TestResult("permutation", diff, math.nan, math.nan, diff, math.nan, math.nan, na, nb, math.nan, level)
    pooled = np.concatenate([x, y])
    n = na + nb
    total = pooled.sum()
    splits = math.comb(n, na)
    # note: a two-sided exact test counts the observed split and its mirror image (when n_a = n_b)
    min_p = min(1.0, 2.0 / splits) if na == nb else 1.0 / splits
    # note: relative tolerance so that the observed split always counts as "at least as extreme"
    eps = 1e-12 * max(1.0, float(np.abs(pooled).max()))
    if splits <= max_exact:
        index = np.array(list(itertools.combinations(range(n), na)), dtype=np.int64)
        sum_a = pooled[index].sum(axis=1)
        stats = sum_a / na - (total - sum_a) / nb
        pvalue = float(np.mean(np.abs(stats) >= abs(diff) - eps))
    else:
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        perms = rng.permuted(np.broadcast_to(pooled, (int(n_resamples), n)), axis=1)
        sum_a = perms[:, :na].sum(axis=1)
        stats = sum_a / na - (total - sum_a) / nb
        pvalue = float((1 + np.sum(np.abs(stats) >= abs(diff) - eps)) / (1 + int(n_resamples)))
        min_p = 1.0 / (1 + int(n_resamples))
    return TestResult("permutation", diff, math.nan, math.nan, diff, math.nan, pvalue, na, nb, min_p, level)


def compare(a: Sequence[float], b: Sequence[float], test: str = "welch", level: float = 0.95, **kwargs) -> TestResult:
    """Test mean(a) - mean(b) over seeds with ``test`` (``"welch"``, ``"permutation"``, ``"paired_t"``).

    Usage:
        >>> round(compare([0.21, 0.25, 0.19], [0.12, 0.09, 0.15]).pvalue, 4)
        0.0174
    """
    if test == "welch":
        return welch_test(a, b, level)
    if test == "permutation":
        return permutation_test(a, b, level=level, **kwargs)
    if test == "paired_t":
        return paired_t_test(a, b, level)
    raise ValueError(f"unknown test {test!r}; use one of {', '.join(TESTS)}.")


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (same order; NaN stays NaN and does not count as a test).

    Reject where the adjusted p-value is below alpha: the chance of any false rejection among the
    family is then at most alpha.
    """
    p = np.asarray(pvalues, dtype=float).ravel()
    out = np.full(p.shape, math.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out[order] = adjusted
    return out
