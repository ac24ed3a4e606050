"""Statistics for the report: pure functions over numpy arrays.

Scores of one group (an algorithm at one noise setting) are *strata*: a list with one 1-D array
per task (a benchmark, or a (noise rate, benchmark) pair), holding one value per seed. The
stratified bootstrap (Agarwal et al. 2021, "Deep RL at the edge of the statistical precipice")
resamples seeds with replacement independently inside each stratum, recomputes the statistic, and
takes the percentile interval of the replicates.

A statistic takes a list of arrays ``[reps, n_s]`` (one per stratum) and returns ``[reps]``; the
point estimate is the same statistic on the original data (``reps = 1``).

Random streams: ``rng(seed, key)`` derives one generator per (seed, key string), so a cell's
interval does not depend on which other cells the report holds or in which order they are done.
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Sequence

import numpy as np
from scipy import stats as sps

Strata = Sequence[np.ndarray]
Statistic = Callable[[list[np.ndarray]], np.ndarray]

IQM_MIN_SEEDS = 4  # below this many seeds the IQM (25 % trimmed each side) is not reported
CI_MIN_SEEDS = 2   # a bootstrap over one seed has zero width: not reported


def rng(seed: int, key: str) -> np.random.Generator:
    """Generator for one named computation: the same (seed, key) gives the same stream."""
    return np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])


def mean_of_means(xs: list[np.ndarray]) -> np.ndarray:
    """[reps, n_s] per stratum -> [reps]: mean over strata of the per-stratum mean (every
    benchmark counts once however many seeds it has)."""
    return np.mean([x.mean(axis=1) for x in xs], axis=0)


def iqm(xs: list[np.ndarray]) -> np.ndarray:
    """[reps, n_s] per stratum -> [reps]: interquartile mean of all values pooled (scipy's
    trim_mean with 25 % cut from each end, as rliable defines it)."""
    return sps.trim_mean(np.concatenate(xs, axis=1), 0.25, axis=1)


def _resample(strata: Strata, reps: int, gen: np.random.Generator) -> list[np.ndarray]:
    out = []
    for s in strata:
        s = np.asarray(s, dtype=float)
        out.append(s[gen.integers(0, len(s), size=(reps, len(s)))])
    return out


def _percentile(values: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def bootstrap_ci(strata: Strata, statistic: Statistic = mean_of_means, *, reps: int = 2000,
                 seed: int = 0, key: str = "", alpha: float = 0.05) -> tuple[float, float, float]:
    """(point, low, high): the statistic and its (1 - alpha) stratified-bootstrap percentile
    interval. Low and high are nan when any stratum has fewer than CI_MIN_SEEDS values."""
    strata = [np.asarray(s, dtype=float) for s in strata]
    point = float(statistic([s[None, :] for s in strata])[0])
    if min(len(s) for s in strata) < CI_MIN_SEEDS:
        return point, math.nan, math.nan
    reps_values = statistic(_resample(strata, reps, rng(seed, key)))
    return (point, *_percentile(reps_values, alpha))


def difference_ci(a: Strata, b: Strata, statistic: Statistic = mean_of_means, *, reps: int = 2000,
                  seed: int = 0, key: str = "", alpha: float = 0.05) -> tuple[float, float, float]:
    """(statistic(a) - statistic(b), low, high): the two groups are resampled independently
    (different seeds of different runs are not paired)."""
    a = [np.asarray(s, dtype=float) for s in a]
    b = [np.asarray(s, dtype=float) for s in b]
    point = float(statistic([s[None, :] for s in a])[0] - statistic([s[None, :] for s in b])[0])
    if min(len(s) for s in (*a, *b)) < CI_MIN_SEEDS:
        return point, math.nan, math.nan
    gen = rng(seed, key)
    diffs = statistic(_resample(a, reps, gen)) - statistic(_resample(b, reps, gen))
    return (point, *_percentile(diffs, alpha))


def prob_improvement_stat(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """P(X > Y) + 0.5 P(X = Y), X from a and Y from b of the same stratum, averaged over strata.

    a, b: per stratum [reps, n_a] and [reps, n_b] -> [reps]. This is the Mann-Whitney U statistic
    of a over b divided by n_a n_b.
    """
    per_stratum = []
    for x, y in zip(a, b):
        gt = (x[:, :, None] > y[:, None, :]).mean(axis=(1, 2))
        eq = (x[:, :, None] == y[:, None, :]).mean(axis=(1, 2))
        per_stratum.append(gt + 0.5 * eq)
    return np.mean(per_stratum, axis=0)


def prob_improvement(a: Strata, b: Strata, *, reps: int = 2000, seed: int = 0, key: str = "",
                     alpha: float = 0.05) -> tuple[float, float, float]:
    """(P(a > b), low, high) with a stratified-bootstrap interval (nan below CI_MIN_SEEDS)."""
    a = [np.asarray(s, dtype=float) for s in a]
    b = [np.asarray(s, dtype=float) for s in b]
    point = float(prob_improvement_stat([s[None, :] for s in a], [s[None, :] for s in b])[0])
    if min(len(s) for s in (*a, *b)) < CI_MIN_SEEDS:
        return point, math.nan, math.nan
    gen = rng(seed, key)
    values = prob_improvement_stat(_resample(a, reps, gen), _resample(b, reps, gen))
    return (point, *_percentile(values, alpha))


def welch_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(t, two-sided p) of Welch's unequal-variance t-test; nan with fewer than 2 values a side,
    or when both sides have zero variance and equal means (nothing to test); (+-inf, 0) when both
    have zero variance and different means."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    if np.ptp(a) == 0 and np.ptp(b) == 0:  # scipy would warn; the limit of the test statistic
        diff = a[0] - b[0]
        return (math.nan, math.nan) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    res = sps.ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.pvalue)


def mann_whitney(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(U of a, two-sided p) of the Mann-Whitney U test (exact for small samples without ties,
    normal approximation otherwise); nan when a side is empty or every value is the same."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0 or np.ptp(np.concatenate([a, b])) == 0:
        return math.nan, math.nan
    res = sps.mannwhitneyu(a, b, alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input order. nan entries stay nan and do not
    count among the m tests. Sorted ascending p_(1) <= ... <= p_(m):
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


def paired_bootstrap(diffs: Strata, *, reps: int = 2000, seed: int = 0, key: str = "",
                     alpha: float = 0.05) -> tuple[float, float, float, float]:
    """Paired bootstrap over problems. diffs: per benchmark, the per-problem score difference
    (a - b, each side already averaged over its seeds) on the problems both sides evaluated.

    Returns (mean difference, low, high, p): the mean over benchmarks of the mean difference,
    its percentile interval from resampling problems within each benchmark, and the two-sided
    bootstrap p-value 2 min(P*(d <= 0), P*(d >= 0)), capped at 1.
    """
    diffs = [np.asarray(d, dtype=float) for d in diffs]
    point = float(mean_of_means([d[None, :] for d in diffs])[0])
    values = mean_of_means(_resample(diffs, reps, rng(seed, key)))
    p = min(1.0, 2 * min(float(np.mean(values <= 0)), float(np.mean(values >= 0))))
    return (point, *_percentile(values, alpha), p)


def normalised_auc(rates: Sequence[float], scores: Sequence[float]) -> float:
    """Trapezoid area under score(rate) divided by the width of the rate range: the average
    score over the noise range, in the units of the score. Needs >= 2 distinct rates."""
    r = np.asarray(rates, dtype=float)
    s = np.asarray(scores, dtype=float)
    order = np.argsort(r)
    r, s = r[order], s[order]
    if len(r) < 2 or r[-1] == r[0]:
        return math.nan
    return float(np.sum((r[1:] - r[:-1]) * (s[1:] + s[:-1]) / 2) / (r[-1] - r[0]))


def auc_statistic(rates: Sequence[float], groups: Sequence[int]) -> Statistic:
    """Statistic for ``bootstrap_ci`` over strata that are (rate, benchmark) pairs: groups[i] is
    the index into ``rates`` of stratum i. The curve's point at a rate is the mean over its
    benchmarks of the per-benchmark means; the result is its normalised_auc, per replicate."""
    r = np.asarray(rates, dtype=float)
    order = np.argsort(r)
    r = r[order]
    groups = list(groups)

    def statistic(xs: list[np.ndarray]) -> np.ndarray:
        means = [x.mean(axis=1) for x in xs]
        curve = np.stack([np.mean([m for m, g in zip(means, groups) if g == k], axis=0)
                          for k in order], axis=1)  # [reps, n_rates], rates ascending
        area = np.sum((r[1:] - r[:-1]) * (curve[:, 1:] + curve[:, :-1]) / 2, axis=1)
        return area / (r[-1] - r[0])

    return statistic


def max_drawdown(values: Sequence[float]) -> float:
    """Largest drop from a running best: max over t of (max_{s <= t} v_s) - v_t; 0 if never down."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return math.nan
    return float(np.max(np.maximum.accumulate(v) - v))
