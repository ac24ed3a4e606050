"""Statistics for the report: pure functions over numpy arrays.

The unit of every interval and test is a *seed*: one trained policy, with all its benchmarks.
Benchmarks of one seed come from the same policy, so they are never resampled apart. A group (an
algorithm at one noise setting) is a matrix ``[n_seeds, n_columns]`` (columns = benchmarks, or
(noise rate, benchmark) pairs, all of the same seeds); its statistics are computed from rows.

Intervals (95 % unless ``alpha`` says otherwise):

* Means, and everything linear in per-seed scores (averages over benchmarks, gains over the
  step-0 evaluation, the normalised robustness AUC, paired differences): Student's t-interval over
  the per-seed values, ``mean +- t_{n-1} s / sqrt(n)``; for a difference of two independent groups
  the Welch interval. Its coverage does not fall at 2-5 seeds as the percentile bootstrap's does
  (48 % at 2 seeds, 76 % at 3, 83 % at 5 for normal data); ``tests/test_report_stats.py``
  simulates it.
* Nonlinear statistics (IQM, probability of improvement): the percentile bootstrap over seeds,
  rows resampled whole, each group's seeds separately; only from ``BOOTSTRAP_MIN_SEEDS`` seeds a
  side, where its simulated coverage of a mean is within 3 points of nominal (about 93 %).

Tests: Welch's t-test, the paired t-test and the Mann-Whitney U test with its exact permutation
p-value (ties handled by midranks; an exact enumeration by dynamic programming). A test that is
undefined (fewer than 2 seeds a side, zero variance on both sides, every value equal) returns nan.

Equivalence: two one-sided t-tests (TOST) against a margin +-delta with the (1 - 2 alpha)
t-interval, paired or Welch (``tost_paired``, ``tost_welch``), each comparison classified "better"
(by at least the margin), "equivalent" (within it), "worse" (by at least the margin) or
"inconclusive"; ``seeds_to_decide`` is the seed count at which that decision has 80 % power.

Random streams: ``rng(seed, key)`` derives one generator per (seed, key string), so a number's
interval does not depend on which other numbers the report holds or in which order they are done.
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Sequence

import numpy as np
from scipy import stats as sps

Statistic = Callable[[np.ndarray], np.ndarray]  # [reps, n_seeds, n_columns] -> [reps]

IQM_MIN_SEEDS = 4          # below this many seeds the IQM (25 % trimmed each side) is not reported
BOOTSTRAP_MIN_SEEDS = 10   # percentile-bootstrap intervals (IQM, P(improve)) from this many seeds a side
T_MIN_SEEDS = 2            # a t-interval needs a variance


def rng(seed: int, key: str) -> np.random.Generator:
    """Generator for one named computation: the same (seed, key) gives the same stream."""
    return np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])


def no_spread(x) -> bool:
    """Every value the same, up to float rounding (0.46 - 0.45 and 0.41 - 0.40 differ in the last
    bits): a variance of zero, where t-intervals and tests are undefined."""
    x = np.asarray(x, dtype=float)
    return bool(np.ptp(x) <= 1e-9 * max(1.0, float(np.abs(x).max()))) if len(x) else True


def _rows(x) -> np.ndarray:
    """A group as a float matrix [n_seeds, n_columns] (a 1-D array is one column)."""
    x = np.asarray(x, dtype=float)
    return x[:, None] if x.ndim == 1 else x


# ---- t-intervals and t-tests --------------------------------------------------------------

def t_interval(values, alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, low, high): Student's t-interval of the mean of per-seed values. Low and high are
    nan below T_MIN_SEEDS values and when every value is the same (no variance to scale by)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if len(v) < T_MIN_SEEDS or no_spread(v):
        return mean, math.nan, math.nan
    half = float(sps.t.ppf(1 - alpha / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


def _welch_parts(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(standard error of mean(a) - mean(b), Welch-Satterthwaite degrees of freedom)."""
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return se, df


def _defined_two_sample(a: np.ndarray, b: np.ndarray) -> bool:
    return len(a) >= 2 and len(b) >= 2 and not (no_spread(a) and no_spread(b))


def welch_interval(a, b, alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean(a) - mean(b), low, high): Welch's interval for two independent groups of seeds.
    No interval (nan) with fewer than 2 seeds a side or zero variance on both sides."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0:
        return math.nan, math.nan, math.nan
    diff = float(a.mean() - b.mean())
    if not _defined_two_sample(a, b):
        return diff, math.nan, math.nan
    se, df = _welch_parts(a, b)
    half = float(sps.t.ppf(1 - alpha / 2, df) * se)
    return diff, diff - half, diff + half


def welch_test(a, b) -> tuple[float, float]:
    """(t, two-sided p) of Welch's unequal-variance t-test; nan when undefined: fewer than 2
    seeds a side, or zero variance on both sides (whatever the means)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not _defined_two_sample(a, b):
        return math.nan, math.nan
    res = sps.ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.pvalue)


def paired_t_test(diffs) -> tuple[float, float]:
    """(t, two-sided p) of the paired t-test on per-seed differences; nan with fewer than 2
    pairs or when every difference is the same (zero variance: undefined)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2 or no_spread(d):
        return math.nan, math.nan
    res = sps.ttest_1samp(d, 0.0)
    return float(res.statistic), float(res.pvalue)


# ---- Mann-Whitney with the exact permutation p-value ------------------------------------

def _rank_sum_counts(doubled_ranks: np.ndarray, k: int) -> np.ndarray:
    """counts[s] = number of k-subsets of the items whose doubled ranks sum to s (exact DP)."""
    total = int(doubled_ranks.sum())
    dp = np.zeros((k + 1, total + 1))
    dp[0, 0] = 1.0
    for r in doubled_ranks.astype(int):
        dp[1:, r:] = dp[1:, r:] + dp[:-1, :total + 1 - r]  # right side read before the write
    return dp[k]


def mann_whitney(a, b) -> tuple[float, float]:
    """(U of a, two-sided exact p) of the Mann-Whitney U test: the permutation distribution of
    a's rank sum R (midranks for ties) over all C(n_a + n_b, n_a) assignments, counted exactly;
    p = 2 min(P(R >= r), P(R <= r)), capped at 1 (scipy's two-sided convention). nan with fewer
    than 2 seeds a side or every value equal."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    both = np.concatenate([a, b])
    if len(a) < 2 or len(b) < 2 or no_spread(both):
        return math.nan, math.nan
    doubled = np.rint(2 * sps.rankdata(both)).astype(int)  # midranks are multiples of 1/2
    counts = _rank_sum_counts(doubled, len(a))
    sums = np.arange(len(counts))
    observed = int(doubled[:len(a)].sum())
    total = counts.sum()
    upper, lower = counts[sums >= observed].sum() / total, counts[sums <= observed].sum() / total
    u = observed / 2 - len(a) * (len(a) + 1) / 2
    return float(u), float(min(1.0, 2 * min(upper, lower)))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input order. nan entries (undefined tests) stay
    nan and do not count among the m tests. Sorted ascending p_(1) <= ... <= p_(m):
    adj_(i) = max over j <= i of min(1, (m - j + 1) p_(j))."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = len(idx)
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (m - j) * p[i]))
        out[i] = running
    return out


# ---- the bootstrap over seeds ------------------------------------------------------------

def resample_rows(x: np.ndarray, reps: int, gen: np.random.Generator) -> np.ndarray:
    """[n, c] -> [reps, n, c]: seeds drawn with replacement, each with all its columns."""
    return x[gen.integers(0, len(x), size=(reps, len(x)))]


def _percentile(values: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def mean_score(x: np.ndarray) -> np.ndarray:
    """[reps, n, c] -> [reps]: mean over seeds of the per-seed average over columns."""
    return x.mean(axis=(1, 2))


def iqm(x: np.ndarray) -> np.ndarray:
    """[reps, n, c] -> [reps]: interquartile mean of all runs x columns pooled (scipy's trim_mean
    with 25 % cut from each end, as rliable defines it)."""
    return sps.trim_mean(x.reshape(len(x), -1), 0.25, axis=1)


def bootstrap_ci(x, statistic: Statistic = mean_score, *, reps: int = 2000, seed: int = 0, key: str = "",
                 alpha: float = 0.05, min_seeds: int = BOOTSTRAP_MIN_SEEDS) -> tuple[float, float, float]:
    """(point, low, high): the statistic of the group [n_seeds, n_columns] and its percentile
    interval from resampling seeds (rows); low and high are nan below ``min_seeds`` seeds."""
    x = _rows(x)
    point = float(statistic(x[None])[0])
    if len(x) < min_seeds:
        return point, math.nan, math.nan
    return (point, *_percentile(statistic(resample_rows(x, reps, rng(seed, key))), alpha))


def prob_improvement_stat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """P(X > Y) + 0.5 P(X = Y), X a seed of a and Y a seed of b on the same column, averaged over
    columns. a: [reps, n_a, c], b: [reps, n_b, c] -> [reps]. Per column this is the Mann-Whitney
    U of a over b divided by n_a n_b."""
    gt = (a[:, :, None, :] > b[:, None, :, :]).mean(axis=(1, 2))
    eq = (a[:, :, None, :] == b[:, None, :, :]).mean(axis=(1, 2))
    return (gt + 0.5 * eq).mean(axis=1)


def prob_improvement(a, b, *, reps: int = 2000, seed: int = 0, key: str = "", alpha: float = 0.05,
                     min_seeds: int = BOOTSTRAP_MIN_SEEDS) -> tuple[float, float, float]:
    """(P(a > b), low, high); the interval resamples each group's seeds separately and is nan
    unless both groups have ``min_seeds`` seeds."""
    a, b = _rows(a), _rows(b)
    point = float(prob_improvement_stat(a[None], b[None])[0])
    if min(len(a), len(b)) < min_seeds:
        return point, math.nan, math.nan
    gen = rng(seed, key)
    values = prob_improvement_stat(resample_rows(a, reps, gen), resample_rows(b, reps, gen))
    return (point, *_percentile(values, alpha))


# ---- bootstraps over problems ---------------------------------------------------------------

def bootstrap_p(values: np.ndarray) -> tuple[float, bool]:
    """(two-sided p, is_bound) from replicates of a difference: 2 min(P*(d <= 0), P*(d >= 0)),
    capped at 1. When no replicate reaches 0 the estimate is 0, which B replicates cannot tell
    from anything below 1/B: then (1 / B, True), meaning p < 1/B."""
    p = min(1.0, 2 * min(float(np.mean(values <= 0)), float(np.mean(values >= 0))))
    if p == 0.0:
        return 1.0 / len(values), True
    return p, False


def paired_bootstrap(diffs: Sequence[np.ndarray], *, reps: int = 2000, seed: int = 0, key: str = "",
                     alpha: float = 0.05) -> tuple[float, float, float, float, bool]:
    """Paired bootstrap over problems. diffs: per benchmark, the per-problem score difference
    (a - b, each side already averaged over its seeds) on the problems both sides evaluated.

    Returns (mean difference, low, high, p, p_is_bound): the mean over benchmarks of the mean
    difference, its percentile interval from resampling problems within each benchmark, and the
    bootstrap p of ``bootstrap_p``. The seeds are fixed: this is about these checkpoints on this
    problem set, not about training again (``two_level_bootstrap`` resamples seeds too).
    """
    diffs = [np.asarray(d, dtype=float) for d in diffs]
    point = float(np.mean([d.mean() for d in diffs]))
    gen = rng(seed, key)
    values = np.mean([d[gen.integers(0, len(d), size=(reps, len(d)))].mean(axis=1) for d in diffs], axis=0)
    return (point, *_percentile(values, alpha), *bootstrap_p(values))


def two_level_bootstrap(a: Sequence[np.ndarray], b: Sequence[np.ndarray], *, reps: int = 2000, seed: int = 0,
                        key: str = "", alpha: float = 0.05) -> tuple[float, float, float, float, bool]:
    """Two-level bootstrap of mean(a) - mean(b): seeds, then problems. a, b: per benchmark a
    matrix [n_seeds, n_problems] of per-problem scores (the same problems, in the same order, on
    both sides). Each replicate draws each side's seeds with replacement (separately), then the
    problems of each benchmark with replacement (the same draw for both sides: problems pair).
    Returns (point, low, high, p, p_is_bound) as ``paired_bootstrap``; the interval is about
    training again on new seeds and evaluating on new problems from the same distribution."""
    a = [np.asarray(x, dtype=float) for x in a]
    b = [np.asarray(x, dtype=float) for x in b]
    point = float(np.mean([x.mean() - y.mean() for x, y in zip(a, b)]))
    gen = rng(seed, key)
    na, nb = len(a[0]), len(b[0])
    seeds_a = gen.integers(0, na, size=(reps, na))  # one seed draw per replicate for all benchmarks
    seeds_b = gen.integers(0, nb, size=(reps, nb))
    per_bench = []
    for x, y in zip(a, b):
        d = x[seeds_a].mean(axis=1) - y[seeds_b].mean(axis=1)  # [reps, n_problems]
        problems = gen.integers(0, d.shape[1], size=d.shape)
        per_bench.append(np.take_along_axis(d, problems, axis=1).mean(axis=1))
    values = np.mean(per_bench, axis=0)
    return (point, *_percentile(values, alpha), *bootstrap_p(values))


# ---- power: how many seeds a study needs --------------------------------------------------

def t_test_power(n: int, delta: float, sd: float, alpha: float, paired: bool = True) -> float:
    """Power of the two-sided t-test at level ``alpha`` to detect a true difference ``delta``:
    paired (n pairs, ``sd`` = sd of the per-seed differences; df n - 1) or two independent groups
    of n seeds each with per-group sd ``sd`` (df 2n - 2). From the noncentral t distribution."""
    df = n - 1 if paired else 2 * n - 2
    if df < 1:
        return 0.0
    se = sd / math.sqrt(n) if paired else sd * math.sqrt(2 / n)
    ncp = delta / se
    crit = sps.t.ppf(1 - alpha / 2, df)
    return float(sps.nct.sf(crit, df, ncp) + sps.nct.cdf(-crit, df, ncp))


def seeds_for_power(delta: float, sd: float, alpha: float = 0.05, m: int = 1, power: float = 0.8,
                    paired: bool = True, n_max: int = 1000) -> int:
    """Smallest seed count whose t-test reaches ``power`` for ``delta`` at level alpha / m (the
    Bonferroni level: Holm over m comparisons rejects at least what Bonferroni does, so this
    count suffices after Holm too)."""
    for n in range(2, n_max + 1):
        if t_test_power(n, delta, sd, alpha / m, paired) >= power:
            return n
    raise ValueError(f"more than {n_max} seeds needed")


# ---- robustness and stability ----------------------------------------------------------------

def auc_weights(rates: Sequence[float]) -> np.ndarray:
    """Weights w with normalised_auc(rates, s) = sum_k w_k s_k (trapezoids over the rates in the
    given order's sorted positions, divided by the width of the range). Needs >= 2 distinct rates."""
    r = np.asarray(rates, dtype=float)
    order = np.argsort(r)
    rs = r[order]
    if len(rs) < 2 or rs[-1] == rs[0]:
        raise ValueError("the robustness AUC needs at least two distinct rates")
    gaps = np.diff(rs)
    w_sorted = np.zeros(len(rs))
    w_sorted[:-1] += gaps / 2
    w_sorted[1:] += gaps / 2
    w = np.empty(len(rs))
    w[order] = w_sorted / (rs[-1] - rs[0])
    return w


def normalised_auc(rates: Sequence[float], scores: Sequence[float]) -> float:
    """Trapezoid area under score(rate) divided by the width of the rate range: the average
    score over the noise range, in the units of the score. nan without >= 2 distinct rates."""
    try:
        return float(np.dot(auc_weights(rates), np.asarray(scores, dtype=float)))
    except ValueError:
        return math.nan


def max_drawdown(values: Sequence[float]) -> float:
    """Largest drop from a running best: max over t of (max_{s <= t} v_s) - v_t; 0 if never down."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return math.nan
    return float(np.max(np.maximum.accumulate(v) - v))


# ---- equivalence: two one-sided tests against a margin ---------------------------------------

VERDICTS = ("better", "equivalent", "worse", "inconclusive", "undefined")


def tost_from(mean, se, df, margin: float, alpha: float = 0.05) -> dict:
    """Two one-sided t-tests (TOST) of a difference against the margin +-``margin`` (> 0), from its
    estimate ``mean``, standard error ``se`` and degrees of freedom ``df`` (numbers, or arrays of one
    shape: every output is then an array):

    * ``p_low``: H0 mean <= -margin vs mean > -margin, p = P(T_df >= (mean + margin) / se);
    * ``p_high``: H0 mean >= +margin vs mean < +margin, p = P(T_df <= (mean - margin) / se);
    * ``p`` = max(p_low, p_high): equivalence within the margin is shown at level alpha when p < alpha;
    * ``p_better``: H0 mean <= +margin vs mean > +margin, p = P(T_df >= (mean - margin) / se);
      ``p_worse``: H0 mean >= -margin vs mean < -margin, p = P(T_df <= (mean + margin) / se);
    * ``low``, ``high``: the (1 - 2 alpha) t-interval mean +- t_{1-alpha, df} se. p < alpha exactly
      when it lies inside (-margin, +margin), p_better < alpha when low > +margin and p_worse < alpha
      when high < -margin: the interval and the tests always agree.
    * ``verdict``: "better" (low > +margin: better by at least the margin, the one-sided test of
      H0 mean <= +margin rejects at alpha), "worse" (high < -margin), "equivalent" (inside the margin),
      "inconclusive" (none of these), "undefined" (se not positive or df < 1: no test; the p-values and
      the interval are nan).
    """
    if not margin > 0:
        raise ValueError(f"the equivalence margin must be positive, got {margin}")
    mean, se, df = (np.asarray(x, dtype=float) for x in (mean, se, df))
    ok = (se > 0) & (df >= 1) & np.isfinite(mean)
    se_ok, df_ok = np.where(ok, se, 1.0), np.where(ok, df, 1.0)
    p_low = np.where(ok, sps.t.sf((mean + margin) / se_ok, df_ok), np.nan)
    p_high = np.where(ok, sps.t.cdf((mean - margin) / se_ok, df_ok), np.nan)
    p_better = np.where(ok, sps.t.sf((mean - margin) / se_ok, df_ok), np.nan)
    p_worse = np.where(ok, sps.t.cdf((mean + margin) / se_ok, df_ok), np.nan)
    half = np.where(ok, sps.t.ppf(1 - alpha, df_ok) * se_ok, np.nan)
    low, high = mean - half, mean + half
    verdict = np.select([~ok, low > margin, high < -margin, (low > -margin) & (high < margin)],
                        ["undefined", "better", "worse", "equivalent"], "inconclusive")
    out = {"mean": mean, "low": low, "high": high, "p_low": p_low, "p_high": p_high,
           "p": np.maximum(p_low, p_high), "p_better": p_better, "p_worse": p_worse, "verdict": verdict}
    if out["mean"].ndim == 0:
        return {k: (str(v) if k == "verdict" else float(v)) for k, v in out.items()}
    return out


def tost_paired(diffs, margin: float, alpha: float = 0.05) -> dict:
    """TOST on per-seed paired differences (``tost_from`` with se = s / sqrt(n), df = n - 1);
    undefined (nan, verdict "undefined") with fewer than 2 pairs or when every difference is the same."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2 or no_spread(d):
        return tost_from(d.mean() if len(d) else math.nan, math.nan, 0, margin, alpha)
    return tost_from(d.mean(), d.std(ddof=1) / math.sqrt(len(d)), len(d) - 1, margin, alpha)


def tost_welch(a, b, margin: float, alpha: float = 0.05) -> dict:
    """TOST on mean(a) - mean(b) of two independent groups, with Welch's standard error and degrees of
    freedom; undefined (as ``welch_test``) with fewer than 2 seeds a side or no variance on both sides."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = a.mean() - b.mean() if len(a) and len(b) else math.nan
    if not _defined_two_sample(a, b):
        return tost_from(diff, math.nan, 0, margin, alpha)
    se, df = _welch_parts(a, b)
    return tost_from(diff, se, df, margin, alpha)


def decision_power(n: int, delta: float, sd: float, margin: float, alpha: float = 0.05, paired: bool = True) -> float:
    """Power, at a true difference ``delta`` and sd ``sd`` (of the per-seed differences when paired;
    of each group otherwise, n seeds a side), of the TOST decision that is correct there: for
    |delta| < margin, showing equivalence, approximated by P(T1 > t) + P(T2 < -t) - 1 (a lower bound,
    close where the power is high) with T1, T2 noncentral t at (delta +- margin) / se; for
    delta > margin (< -margin), showing "better" ("worse") by at least the margin, the one-sided
    test against +margin (-margin). 0 at |delta| = margin, where no seed count decides."""
    df = n - 1 if paired else 2 * n - 2
    if df < 1 or sd <= 0:
        return 0.0
    se = sd / math.sqrt(n) if paired else sd * math.sqrt(2 / n)
    crit = sps.t.ppf(1 - alpha, df)
    if abs(delta) < margin:
        return max(0.0, float(sps.nct.sf(crit, df, (delta + margin) / se) + sps.nct.cdf(-crit, df, (delta - margin) / se) - 1))
    if abs(delta) == margin:
        return 0.0
    return float(sps.nct.sf(crit, df, (abs(delta) - margin) / se))


def seeds_to_decide(delta: float, sd: float, margin: float, alpha: float = 0.05, power: float = 0.8,
                    paired: bool = True, n_max: int = 1000) -> int | None:
    """Smallest seed count at which the TOST decision (``decision_power``) reaches ``power`` when the true
    difference and sd are ``delta`` and ``sd`` (e.g. the observed ones); None when more than ``n_max``
    seeds would be needed (a difference at the margin itself never is decided) or sd is undefined."""
    if not (math.isfinite(delta) and math.isfinite(sd) and sd > 0):
        return None
    lo, hi = 2, n_max
    if decision_power(hi, delta, sd, margin, alpha, paired) < power:
        return None
    while lo < hi:  # the power grows with n
        mid = (lo + hi) // 2
        if decision_power(mid, delta, sd, margin, alpha, paired) >= power:
            hi = mid
        else:
            lo = mid + 1
    return lo
