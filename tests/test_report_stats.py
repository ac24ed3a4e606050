"""Report statistics against hand-computed values and scipy."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from reports import stats
from reports.analysis import noise_rate


def test_bootstrap_resamples_seeds_whole_hand_case():
    # One column [0, 1]: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the
    # 2.5 % and 97.5 % percentiles of 2000 replicates are 0 and 1.
    assert stats.bootstrap_ci(np.array([0.0, 1.0]), min_seeds=2) == (0.5, 0.0, 1.0)
    # Two benchmarks of the same two seeds: seed 0 scores (0, 5), seed 1 (1, 5). A replicate draws
    # seeds with all their benchmarks: the mean is 2.5, 2.75 or 3 -> the same interval as one column.
    point, low, high = stats.bootstrap_ci(np.array([[0.0, 5.0], [1.0, 5.0]]), min_seeds=2)
    assert (point, low, high) == (2.75, 2.5, 3.0)
    # Identical series on two benchmarks: the interval of their average is the single one's.
    x = np.array([0.1, 0.4, 0.35, 0.8, 0.5, 0.2, 0.6, 0.9, 0.3, 0.45])
    assert stats.bootstrap_ci(np.stack([x, x], axis=1), key="k") == pytest.approx(stats.bootstrap_ci(x, key="k"))
    # Below BOOTSTRAP_MIN_SEEDS seeds: no interval.
    point, low, high = stats.bootstrap_ci(x[:9])
    assert point == pytest.approx(x[:9].mean()) and math.isnan(low) and math.isnan(high)


def test_bootstrap_reproducible_under_seed():
    x = np.array([[0.1, 0.2], [0.4, 0.9], [0.35, 0.6], [0.8, 0.1], [0.5, 0.5]])
    a = stats.bootstrap_ci(x, seed=3, key="cell", min_seeds=2)
    assert a == stats.bootstrap_ci(x, seed=3, key="cell", min_seeds=2)
    assert a != stats.bootstrap_ci(x, seed=4, key="cell", min_seeds=2)
    assert a != stats.bootstrap_ci(x, seed=3, key="other cell", min_seeds=2)
    assert a[0] == pytest.approx(x.mean()) and a[1] < a[0] < a[2]


def test_t_interval_against_hand_formula():
    v = np.array([0.5, 0.6, 0.7])  # mean 0.6, sd 0.1, t_{0.975, 2} = 4.302653
    mean, low, high = stats.t_interval(v)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert mean == pytest.approx(0.6) and (low, high) == pytest.approx((0.6 - half, 0.6 + half))
    assert all(math.isnan(x) for x in stats.t_interval([0.4])[1:])  # one seed: no interval
    assert all(math.isnan(x) for x in stats.t_interval([0.41 - 0.40, 0.46 - 0.45])[1:])  # no spread
    assert all(math.isnan(x) for x in stats.t_interval([]))


def test_welch_against_hand_formula():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0, 7.0])
    va, vb = 1.0 / 3, (5.0 / 3) / 4  # sample variances / n
    t = (2.0 - 5.5) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    p = 2 * sps.t.sf(abs(t), df)
    got_t, got_p = stats.welch_test(a, b)
    assert got_t == pytest.approx(t) and got_p == pytest.approx(p)
    diff, low, high = stats.welch_interval(a, b)
    half = sps.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert diff == -3.5 and (low, high) == pytest.approx((-3.5 - half, -3.5 + half))
    # Undefined: one seed a side, or zero variance on both sides (whatever the means).
    assert all(math.isnan(v) for v in stats.welch_test(a, np.array([4.0])))
    assert all(math.isnan(v) for v in stats.welch_test(np.ones(3), np.zeros(3)))
    assert stats.welch_interval(np.ones(3), np.zeros(3))[0] == 1.0
    assert all(math.isnan(v) for v in stats.welch_interval(np.ones(3), np.zeros(3))[1:])


def test_paired_t_test():
    a, b = np.array([0.5, 0.7, 0.6, 0.65]), np.array([0.45, 0.6, 0.58, 0.6])
    assert stats.paired_t_test(a - b) == pytest.approx(tuple(sps.ttest_rel(a, b)))
    assert all(math.isnan(v) for v in stats.paired_t_test([0.1]))
    assert all(math.isnan(v) for v in stats.paired_t_test([0.01, 0.01, 0.01]))


def test_mann_whitney_exact_hand_cases():
    # a entirely below b: U = 0; two-sided exact p = 2 / C(6, 3) = 0.1.
    u, p = stats.mann_whitney(np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0]))
    assert u == 0 and p == pytest.approx(0.1)
    # Ties: [1, 1, 1] vs [0, 0, 0]. Of the C(6, 3) = 20 ways to pick a's three values, only
    # "all ones" and "all zeros" are as extreme: p = 2 / 20 = 0.1 (the normal approximation says 0.047).
    u, p = stats.mann_whitney(np.ones(3), np.zeros(3))
    assert u == 9 and p == pytest.approx(0.1)
    # [1, 1, 2] vs [0, 1, 0]: midranks 4, 4, 6 | 1.5, 4, 1.5; rank sum 14, E = 10.5. Sums >= 14
    # (6 with two of the three 4s: 3 ways) and <= 7 (both 1.5s with a 4: 3 ways): p = 6 / 20.
    assert stats.mann_whitney(np.array([1.0, 1.0, 2.0]), np.array([0.0, 1.0, 0.0]))[1] == pytest.approx(0.3)
    # Undefined: one seed a side, or every value equal.
    assert all(math.isnan(v) for v in stats.mann_whitney(np.ones(3), np.ones(3)))
    assert all(math.isnan(v) for v in stats.mann_whitney(np.array([0.2]), np.array([0.1, 0.3])))


def test_mann_whitney_matches_scipy_permutation_test_with_ties():
    gen = np.random.default_rng(0)
    for na, nb in ((3, 3), (4, 5), (6, 4)):
        a = gen.integers(0, 4, size=na) / 4  # accuracies on a coarse grid: many ties
        b = gen.integers(0, 4, size=nb) / 4
        ref = sps.permutation_test((a, b), lambda x, y, axis: sps.mannwhitneyu(x, y, axis=axis).statistic,
                                   permutation_type="independent", vectorized=True, n_resamples=np.inf)
        u, p = stats.mann_whitney(a, b)
        assert u == sps.mannwhitneyu(a, b).statistic and p == pytest.approx(ref.pvalue)
    a, b = gen.normal(size=5), gen.normal(size=6)  # no ties: scipy's exact distribution
    assert stats.mann_whitney(a, b)[1] == pytest.approx(sps.mannwhitneyu(a, b, method="exact").pvalue)


def test_iqm_hand_case_and_scipy():
    x = np.arange(1.0, 9.0)  # 1..8: drop 1, 2 and 7, 8 -> mean(3, 4, 5, 6) = 4.5
    assert stats.iqm(x[None, :, None])[0] == 4.5
    y = np.array([[0.3, 0.1], [0.9, 0.5], [0.45, 0.2], [0.05, 0.7]])  # runs x benchmarks pooled
    assert stats.iqm(y[None])[0] == pytest.approx(sps.trim_mean(y.ravel(), 0.25))


def test_probability_of_improvement_hand_case():
    # a = [3, 5, 5], b = [2, 5]: 3>2 (1), 3<5 (0), 5>2 (1), 5=5 (1/2), twice -> 4 / 6.
    a, b = np.array([3.0, 5.0, 5.0]), np.array([2.0, 5.0])
    point, low, high = stats.prob_improvement(a, b)
    assert point == pytest.approx(4 / 6)
    assert point == pytest.approx(sps.mannwhitneyu(a, b).statistic / 6)
    assert math.isnan(low) and math.isnan(high)  # 3 and 2 seeds: no bootstrap interval (not 1.00 [1.00, 1.00])
    # Mean over benchmarks: a second benchmark (column) where a always wins.
    two_a, two_b = np.stack([a, [9.0, 9.0, 9.0]], axis=1), np.stack([b, [1.0, 2.0]], axis=1)
    assert stats.prob_improvement(two_a, two_b)[0] == pytest.approx((4 / 6 + 1) / 2)
    gen = np.random.default_rng(1)
    x, y = gen.normal(0.5, 0.1, size=10), gen.normal(0.45, 0.1, size=12)
    point, low, high = stats.prob_improvement(x, y)
    assert 0 <= low <= point <= high <= 1 and low < high


def test_holm_known_pvalues():
    # Sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 -> max(0.06, 0.04) = 0.06.
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adj = stats.holm([0.01, math.nan, 0.02])  # nan does not count: m = 2
    assert adj[0] == pytest.approx(0.02) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.02)
    assert list(stats.holm([0.6, 0.7])) == [1.0, 1.0]


def test_paired_bootstrap_over_problems():
    d, low, high, p, bound = stats.paired_bootstrap([np.zeros(5)])
    assert (d, low, high, p, bound) == (0.0, 0.0, 0.0, 1.0, False)
    # Every problem better by 1/4 or 1/2: no replicate reaches 0 -> p is only known to be < 1/B.
    d, low, high, p, bound = stats.paired_bootstrap([np.array([0.25, 0.5, 0.25, 0.5]), np.array([0.5])], reps=500)
    assert d == pytest.approx((0.375 + 0.5) / 2) and (p, bound) == (1 / 500, True) and 0.25 <= low <= high <= 0.5


def test_two_level_bootstrap_counts_the_seed_variance():
    # Two seeds a side whose per-problem scores differ by seed (a seed effect of +-0.2) around the same
    # mean: problems alone say nothing varies (every problem ties after averaging seeds), the
    # two-level bootstrap sees the seeds.
    a = [np.array([[0.7] * 20, [0.3] * 20])]
    b = [np.array([[0.5] * 20, [0.5] * 20])]
    point, low, high, p, _ = stats.two_level_bootstrap(a, b, key="k")
    assert point == pytest.approx(0.0) and low < -0.1 and high > 0.1 and p > 0.5
    paired = stats.paired_bootstrap([a[0].mean(axis=0) - b[0].mean(axis=0)], key="k")
    assert paired[1:3] == pytest.approx((0.0, 0.0))
    # Problems vary, seeds do not: as wide as the paired bootstrap over problems (same problems drawn).
    gen = np.random.default_rng(0)
    scores = gen.integers(0, 2, size=30).astype(float)
    two = stats.two_level_bootstrap([np.stack([scores, scores])], [np.zeros((3, 30))], key="k")
    one = stats.paired_bootstrap([scores], key="k")
    assert two[0] == one[0] and abs((two[2] - two[1]) - (one[2] - one[1])) < 0.05


def test_normalised_auc_hand_case():
    # Trapezoids 0.2 * (0.6 + 0.5) / 2 + 0.2 * (0.5 + 0.2) / 2 = 0.18, over width 0.4 -> 0.45.
    assert stats.normalised_auc([0.0, 0.2, 0.4], [0.6, 0.5, 0.2]) == pytest.approx(0.45)
    assert stats.normalised_auc([0.4, 0.0, 0.2], [0.2, 0.6, 0.5]) == pytest.approx(0.45)
    assert math.isnan(stats.normalised_auc([0.2], [0.5]))
    # Weights of rates 0, 0.1, 0.2, 0.3: (0.05, 0.1, 0.1, 0.05) / 0.3, in the order given.
    assert stats.auc_weights([0.0, 0.1, 0.2, 0.3]) == pytest.approx([1 / 6, 1 / 3, 1 / 3, 1 / 6])
    assert stats.auc_weights([0.3, 0.0, 0.2, 0.1]) == pytest.approx([1 / 6, 1 / 6, 1 / 3, 1 / 3])


# ---- coverage of the report's intervals under a shared seed effect --------------------------
# Simulated scores: seed effect u ~ N(0, 0.05) shared by the seed's benchmarks, plus noise
# e ~ N(0, 0.03) per (seed, benchmark), around benchmark means 0.4 and 0.6 (true ALL AVG 0.5).
# Tolerance: 2000 datasets give a Monte-Carlo standard error of 0.5 points at 95 % coverage; the
# t-intervals must cover within +-2 points (4 standard errors) of 95 %.

def simulate(gen, datasets: int, n: int, shift: float = 0.0) -> np.ndarray:
    u = gen.normal(0, 0.05, size=(datasets, n, 1))
    e = gen.normal(0, 0.03, size=(datasets, n, 2))
    return np.array([0.4, 0.6]) + shift + u + e  # [datasets, seeds, benchmarks]


@pytest.mark.parametrize("n", [5, 10])
def test_t_intervals_cover_95_percent_with_a_shared_seed_effect(n):
    gen = np.random.default_rng(n)
    data = simulate(gen, 2000, n)
    mean_cover = np.mean([lo <= 0.5 <= hi for _, lo, hi in (stats.t_interval(x.mean(axis=1)) for x in data)])
    assert abs(mean_cover - 0.95) <= 0.02
    other = simulate(gen, 2000, n, shift=0.05)  # a second algorithm, independent seeds: true difference 0.05
    diff_cover = np.mean([lo <= 0.05 <= hi for _, lo, hi in
                          (stats.welch_interval(y.mean(axis=1), x.mean(axis=1)) for x, y in zip(data, other))])
    assert abs(diff_cover - 0.95) <= 0.02


def test_percentile_bootstrap_coverage_justifies_its_seed_minimum():
    # The seed bootstrap of the mean covers about 92-93 % at 10 seeds (BOOTSTRAP_MIN_SEEDS), about
    # 82 % at 5: below 10 the report gives no bootstrap interval. 400 datasets (standard error
    # about 1.5 points): at 10 seeds within [0.88, 0.97], at 5 seeds below 0.88.
    assert stats.BOOTSTRAP_MIN_SEEDS == 10
    gen = np.random.default_rng(7)
    cover = {}
    for n in (5, 10):
        data = simulate(gen, 400, n)
        cover[n] = np.mean([lo <= 0.5 <= hi for lo, hi in
                            (stats.bootstrap_ci(x, reps=1000, key=str(i), min_seeds=1)[1:] for i, x in enumerate(data))])
    assert 0.88 <= cover[10] <= 0.97 and cover[5] < 0.88


def test_power_and_seed_count_against_known_values():
    # Textbook sample sizes for 80 % power at alpha 0.05, effect size delta / sd = 1: a paired
    # t-test needs 10 pairs (power 0.803), two independent groups 17 seeds each (0.807).
    assert stats.seeds_for_power(1.0, 1.0) == 10 and stats.t_test_power(10, 1.0, 1.0, 0.05) == pytest.approx(0.803, abs=1e-3)
    assert stats.seeds_for_power(1.0, 1.0, paired=False) == 17
    assert stats.t_test_power(17, 1.0, 1.0, 0.05, paired=False) == pytest.approx(0.807, abs=1e-3)
    # Holm over m comparisons: designed at alpha / m, more seeds.
    assert stats.seeds_for_power(1.0, 1.0, m=16) > stats.seeds_for_power(1.0, 1.0)
    gen = np.random.default_rng(3)  # and by simulation: the paired t-test at n = 10, d = 1
    d = gen.normal(1.0, 1.0, size=(4000, 10))
    rejected = np.mean([stats.paired_t_test(x)[1] < 0.05 for x in d])
    assert abs(rejected - 0.803) < 0.025


def test_max_drawdown():
    assert stats.max_drawdown([0.1, 0.5, 0.3, 0.6, 0.2, 0.4]) == pytest.approx(0.4)
    assert stats.max_drawdown([0.1, 0.2, 0.3]) == 0.0


def test_noise_rate():
    assert noise_rate("none") == ("none", 0.0)
    assert noise_rate("flip0.2") == ("flip", 0.2)
    assert noise_rate("flip1") == ("flip", 1.0)
    assert noise_rate("pseudo8") is None
    assert noise_rate("fn0.3+gauss0.1") is None
