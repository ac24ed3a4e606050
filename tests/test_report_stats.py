"""Report statistics against hand-computed values and scipy."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from reports import stats
from reports.analysis import noise_rate


def test_bootstrap_hand_case_and_stratification():
    # One stratum [0, 1]: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4,
    # so the 2.5 % and 97.5 % percentiles of 2000 replicates are 0 and 1.
    assert stats.bootstrap_ci([np.array([0.0, 1.0])]) == (0.5, 0.0, 1.0)
    # Two strata [0, 1] and [5, 5]: the second never varies, the mean of means is (0.5 + 5) / 2.
    point, low, high = stats.bootstrap_ci([np.array([0.0, 1.0]), np.array([5.0, 5.0])])
    assert (point, low, high) == (2.75, 2.5, 3.0)
    # One seed: no interval.
    point, low, high = stats.bootstrap_ci([np.array([0.3])])
    assert point == 0.3 and math.isnan(low) and math.isnan(high)


def test_bootstrap_reproducible_under_seed():
    strata = [np.array([0.1, 0.4, 0.35, 0.8, 0.5]), np.array([0.2, 0.9, 0.6])]
    a = stats.bootstrap_ci(strata, seed=3, key="cell")
    assert a == stats.bootstrap_ci(strata, seed=3, key="cell")
    assert a != stats.bootstrap_ci(strata, seed=4, key="cell")
    assert a != stats.bootstrap_ci(strata, seed=3, key="other cell")
    assert a[0] == pytest.approx((0.43 + 1.7 / 3) / 2)
    assert a[1] < a[0] < a[2]


def test_iqm_hand_case_and_scipy():
    x = np.arange(1.0, 9.0)  # 1..8: drop 1, 2 and 7, 8 -> mean(3, 4, 5, 6) = 4.5
    assert stats.iqm([x[None, :]])[0] == 4.5
    y = np.array([0.3, 0.1, 0.9, 0.5, 0.45, 0.2, 0.05])
    assert stats.iqm([y[None, :]])[0] == pytest.approx(sps.trim_mean(y, 0.25))


def test_welch_against_hand_formula():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0, 7.0])
    va, vb = 1.0 / 3, (5.0 / 3) / 4  # sample variances / n
    t = (2.0 - 5.5) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    p = 2 * sps.t.sf(abs(t), df)
    got_t, got_p = stats.welch_test(a, b)
    assert got_t == pytest.approx(t) and got_p == pytest.approx(p)
    assert all(math.isnan(v) for v in stats.welch_test(a, np.array([4.0])))


def test_mann_whitney_exact_hand_case():
    # a entirely below b: U = 0; two-sided exact p = 2 / C(6, 3) = 0.1.
    u, p = stats.mann_whitney(np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0]))
    assert u == 0 and p == pytest.approx(0.1)
    assert all(math.isnan(v) for v in stats.mann_whitney(np.ones(3), np.ones(3)))


def test_probability_of_improvement_hand_case():
    # a = [3, 5, 5], b = [2, 5]: 3>2 (1), 3<5 (0), 5>2 (1), 5=5 (1/2), twice -> 4 / 6.
    a, b = np.array([3.0, 5.0, 5.0]), np.array([2.0, 5.0])
    point, low, high = stats.prob_improvement([a], [b])
    assert point == pytest.approx(4 / 6)
    assert point == pytest.approx(sps.mannwhitneyu(a, b).statistic / 6)
    assert 0 <= low <= point <= high <= 1
    # Mean over strata: a second stratum where a always wins.
    assert stats.prob_improvement([a, np.array([9.0, 9.0])], [b, np.array([1.0, 2.0])])[0] == pytest.approx((4 / 6 + 1) / 2)


def test_difference_ci():
    assert stats.difference_ci([np.ones(3)], [np.zeros(4)]) == (1.0, 1.0, 1.0)
    point, low, high = stats.difference_ci([np.array([0.5, 0.7, 0.6])], [np.array([0.1, 0.3, 0.2])], key="k")
    assert point == pytest.approx(0.4) and low < point < high
    assert (point, low, high) == stats.difference_ci([np.array([0.5, 0.7, 0.6])], [np.array([0.1, 0.3, 0.2])], key="k")


def test_holm_known_pvalues():
    # Sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 -> max(0.06, 0.04) = 0.06.
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adj = stats.holm([0.01, math.nan, 0.02])  # nan does not count: m = 2
    assert adj[0] == pytest.approx(0.02) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.02)
    assert list(stats.holm([0.6, 0.7])) == [1.0, 1.0]


def test_paired_bootstrap():
    d, low, high, p = stats.paired_bootstrap([np.zeros(5)])
    assert (d, low, high, p) == (0.0, 0.0, 0.0, 1.0)
    # Every problem better by 1/4 or 1/2: every replicate is positive -> p = 0.
    d, low, high, p = stats.paired_bootstrap([np.array([0.25, 0.5, 0.25, 0.5]), np.array([0.5])])
    assert d == pytest.approx((0.375 + 0.5) / 2) and p == 0.0 and 0.25 <= low <= high <= 0.5


def test_normalised_auc_hand_case():
    # Trapezoids 0.2 * (0.6 + 0.5) / 2 + 0.2 * (0.5 + 0.2) / 2 = 0.18, over width 0.4 -> 0.45.
    assert stats.normalised_auc([0.0, 0.2, 0.4], [0.6, 0.5, 0.2]) == pytest.approx(0.45)
    assert stats.normalised_auc([0.4, 0.0, 0.2], [0.2, 0.6, 0.5]) == pytest.approx(0.45)
    assert math.isnan(stats.normalised_auc([0.2], [0.5]))
    # The bootstrap statistic over (rate, benchmark) strata: two benchmarks at rate 0 with means
    # 0.5 and 0.7 -> curve point 0.6; constant values -> a zero-width interval at the point.
    strata = [np.array([0.5, 0.5]), np.array([0.7, 0.7]), np.array([0.5, 0.5]), np.array([0.2, 0.2])]
    result = stats.bootstrap_ci(strata, stats.auc_statistic([0.0, 0.2, 0.4], [0, 0, 1, 2]))
    assert result == pytest.approx((0.45, 0.45, 0.45))


def test_max_drawdown():
    assert stats.max_drawdown([0.1, 0.5, 0.3, 0.6, 0.2, 0.4]) == pytest.approx(0.4)
    assert stats.max_drawdown([0.1, 0.2, 0.3]) == 0.0


def test_noise_rate():
    assert noise_rate("none") == ("none", 0.0)
    assert noise_rate("flip0.2") == ("flip", 0.2)
    assert noise_rate("flip1") == ("flip", 1.0)
    assert noise_rate("pseudo8") is None
    assert noise_rate("fn0.3+gauss0.1") is None
