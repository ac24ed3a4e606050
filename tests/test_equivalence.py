"""Equivalence tests (reports.stats TOST) against hand-computed values and by simulation (error rates at
the margin), the seeds needed to decide, and the report's one-sentence answers built from them."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from harness.cli import main
from harness.errors import HarnessError
from reports import stats, write_report
from tests.test_report import final, make_cell

MARGIN = 0.023


# ---- the test itself ----


def test_tost_paired_hand_computed():
    d = [0.01, 0.02, -0.01, 0.0, 0.015]
    # mean .007; deviations .003 .013 -.017 -.007 .008; squares sum 5.8e-4; var 1.45e-4; se = sqrt(1.45e-4 / 5)
    mean, se, df = 0.007, math.sqrt(1.45e-4 / 5), 4
    t = stats.tost_paired(d, MARGIN)
    assert t["mean"] == pytest.approx(mean)
    assert t["p_low"] == pytest.approx(sps.t.sf((mean + MARGIN) / se, df))      # t = 5.571
    assert t["p_high"] == pytest.approx(sps.t.cdf((mean - MARGIN) / se, df))    # t = -2.971
    assert t["p"] == pytest.approx(t["p_high"]) and t["p"] == pytest.approx(0.02055, abs=5e-5)
    half = sps.t.ppf(0.95, df) * se  # 2.1318 * .0053852 = .011481
    assert (t["low"], t["high"]) == pytest.approx((mean - half, mean + half))
    assert (t["low"], t["high"]) == pytest.approx((-0.004481, 0.018481), abs=1e-6)
    assert t["verdict"] == "equivalent"
    # The same as two one-sided one-sample t-tests of scipy against -margin and +margin
    assert t["p_low"] == pytest.approx(sps.ttest_1samp(d, -MARGIN, alternative="greater").pvalue)
    assert t["p_high"] == pytest.approx(sps.ttest_1samp(d, MARGIN, alternative="less").pvalue)
    assert t["p_better"] == pytest.approx(sps.ttest_1samp(d, MARGIN, alternative="greater").pvalue)
    assert t["p_worse"] == pytest.approx(sps.ttest_1samp(d, -MARGIN, alternative="less").pvalue)
    # at alpha .1 the interval is the 80% one
    wide = stats.tost_paired(d, MARGIN, alpha=0.1)
    assert wide["high"] == pytest.approx(mean + sps.t.ppf(0.9, df) * se)


def test_tost_welch_hand_computed():
    a, b = np.array([0.5, 0.52, 0.55, 0.49]), np.array([0.47, 0.5, 0.46])
    va, vb = a.var(ddof=1) / 4, b.var(ddof=1) / 3
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    t = stats.tost_welch(a, b, 0.05)
    diff = a.mean() - b.mean()
    assert t["p_low"] == pytest.approx(sps.t.sf((diff + 0.05) / se, df))
    assert t["p_high"] == pytest.approx(sps.t.cdf((diff - 0.05) / se, df))
    assert t["low"] == pytest.approx(diff - sps.t.ppf(0.95, df) * se)


@pytest.mark.parametrize("diffs, verdict", [
    ([0.10, 0.11, 0.09, 0.10], "better"),
    ([-0.10, -0.11, -0.09, -0.10], "worse"),
    ([0.001, -0.002, 0.0, 0.002], "equivalent"),
    ([0.05, -0.04, 0.03, -0.02], "inconclusive"),
    ([0.03, 0.02, 0.035, 0.025], "inconclusive"),  # above 0 for sure, but not surely beyond the margin
    ([0.05], "undefined"),
    ([0.05, 0.05, 0.05], "undefined"),  # no variance: no test, never p = 0
])
def test_tost_verdicts(diffs, verdict):
    t = stats.tost_paired(diffs, MARGIN)
    assert t["verdict"] == verdict
    if verdict == "undefined":
        assert all(math.isnan(t[k]) for k in ("p", "low", "high", "p_better", "p_worse"))
    elif verdict == "better":
        assert t["low"] > MARGIN and t["p_better"] < 0.05
    elif verdict == "worse":
        assert t["high"] < -MARGIN and t["p_worse"] < 0.05
    elif verdict == "equivalent":
        assert t["p"] < 0.05
    else:
        assert t["p"] >= 0.05 and t["p_better"] >= 0.05 and t["p_worse"] >= 0.05


def test_tost_refuses_a_margin_that_is_not_positive():
    with pytest.raises(ValueError, match="margin must be positive"):
        stats.tost_paired([0.1, 0.2], 0.0)


# ---- error rates by simulation ----


def simulate(delta: float, sd: float, n: int, reps: int = 20000, seed: int = 0) -> np.ndarray:
    """Verdicts of `reps` paired studies of n seeds with normal differences N(delta, sd^2), vectorised."""
    d = np.random.default_rng(seed).normal(delta, sd, size=(reps, n))
    return stats.tost_from(d.mean(1), d.std(1, ddof=1) / math.sqrt(n), n - 1, MARGIN)["verdict"]


@pytest.mark.parametrize("delta, wrong", [(MARGIN, ("equivalent", "better")), (-MARGIN, ("equivalent", "worse"))])
def test_error_rates_at_the_margin_are_alpha(delta, wrong):
    # At a true difference equal to the margin, neither "equivalent" nor "beyond the margin" is true:
    # each is declared about alpha = 5% of the time (se small against the margin, so the test is not
    # conservative there). 3 sds of a binomial rate over 20000 studies: 0.0046.
    verdicts = simulate(delta, 0.02, 30)
    for verdict in wrong:
        assert abs(np.mean(verdicts == verdict) - 0.05) < 0.0046, verdict


def test_tost_never_exceeds_alpha_inside_and_gains_power():
    # With few seeds and a wide interval TOST is conservative at the margin (below alpha) ...
    assert np.mean(simulate(MARGIN, 0.05, 5) == "equivalent") < 0.05
    # ... and at a true difference inside the margin its power matches `decision_power` (a lower bound
    # that is tight where the power is high)
    for n in (10, 20):
        rate = np.mean(simulate(0.005, 0.03, n) == "equivalent")
        power = stats.decision_power(n, 0.005, 0.03, MARGIN)
        assert power - 0.01 < rate < power + 0.03, (n, rate, power)
    rate = np.mean(simulate(0.06, 0.03, 8) == "better")
    assert rate == pytest.approx(stats.decision_power(8, 0.06, 0.03, MARGIN), abs=0.015)


def test_seeds_to_decide():
    for delta, sd in ((0.0, 0.05), (0.01, 0.03), (0.06, 0.05), (-0.05, 0.02)):
        n = stats.seeds_to_decide(delta, sd, MARGIN)
        assert stats.decision_power(n, delta, sd, MARGIN) >= 0.8 > stats.decision_power(n - 1, delta, sd, MARGIN)
    # more spread, more seeds; a difference on the margin is never decided
    assert stats.seeds_to_decide(0.0, 0.06, MARGIN) > stats.seeds_to_decide(0.0, 0.03, MARGIN)
    assert stats.seeds_to_decide(MARGIN, 0.03, MARGIN) is None
    assert stats.seeds_to_decide(0.0, math.nan, MARGIN) is None
    # the simulated decision rate at the returned count is at least about 80%
    n = stats.seeds_to_decide(0.0, 0.03, MARGIN)
    assert np.mean(simulate(0.0, 0.03, n) == "equivalent") > 0.78


# ---- the report's answers ----

BASE = [0.50, 0.52, 0.48, 0.51]
CASES = {  # per-seed difference against the baseline
    "better": [0.10, 0.11, 0.09, 0.10],
    "equiv": [0.001, -0.002, 0.0, 0.002],
    "worse": [-0.10, -0.11, -0.09, -0.10],
    "unsure": [0.05, -0.04, 0.03, -0.02],
}


def equivalence_store(root):
    for seed, value in enumerate(BASE):
        make_cell(root, "arith", "ppo", "flip0.2", seed, rows=final(100, {"arith_id": value}))
        for algo, diffs in CASES.items():
            make_cell(root, "arith", algo, "flip0.2", seed, rows=final(100, {"arith_id": value + diffs[seed]}))
    make_cell(root, "arith", "lonely", "flip0.2", 0, rows=final(100, {"arith_id": 0.6}))
    return root


def test_answers_say_better_equivalent_worse_or_inconclusive(tmp_path):
    out = write_report(equivalence_store(tmp_path / "runs"), tmp_path / "rep", formats="md,csv,tex")
    md = (out / "report.md").read_text(encoding="utf-8")
    assert r"Against a margin of $\pm$2.3 points: better by at least the margin" in (out / "report.tex").read_text()
    sig = pd.read_csv(out / "csv" / "significance.csv")
    sig = sig[sig["score"] == "ID AVG"].set_index("algo")
    t = stats.tost_paired(CASES["equiv"], MARGIN)
    assert sig.loc["equiv", "eq_low"] == pytest.approx(t["low"]) and sig.loc["equiv", "eq_p"] == pytest.approx(t["p"])
    assert sig.loc["equiv", "eq_verdict"] == "equivalent" and sig.loc["worse", "eq_verdict"] == "worse"
    head = "vs ppo under flip0.2: "
    assert head.join(["- better ", ""]) in md
    line = {algo: next(x for x in md.splitlines() if x.startswith(f"- {algo} {head}") and "ID AVG" in x)
            for algo in (*CASES, "lonely")}
    margin = " Against a margin of ±2.3 points: "
    # better: mean .10, sd sqrt(2e-4 / 3) = .008165, se .0040825, t_{.95, 3} = 2.3534: half-width .0096
    assert (margin + "better by at least the margin (90% CI +9.0, +11.0; one-sided p < 0.001).") in line["better"]
    assert (margin + "worse by at least the margin (90% CI -11.0, -9.0; one-sided p < 0.001).") in line["worse"]
    assert (margin + f"equivalent within the margin (90% CI {100 * t['low']:+.1f}, {100 * t['high']:+.1f}; "
            f"TOST p < 0.001).") in line["equiv"]
    d = np.array(CASES["unsure"])
    n = stats.seeds_to_decide(d.mean(), d.std(ddof=1), MARGIN)
    assert margin + "inconclusive at 4 seeds (90% CI" in line["unsure"]
    assert line["unsure"].endswith(f"about {n} seeds would decide it (80% power at the observed difference and spread).")
    # one seed: the Welch comparison is undefined, and so is its equivalence test: a dash, never p = 0
    assert line["lonely"].endswith(margin + "equivalence test – (it needs 2 seeds a side and some variance).")
    assert "p = 0.000" not in md and "p = 0 " not in md and "p = 0)" not in md


def test_the_margin_is_a_report_option(tmp_path, capsys):
    runs = equivalence_store(tmp_path / "runs")
    out = write_report(runs, tmp_path / "rep", formats="md", margin=0.2)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "- better vs ppo under flip0.2: +10.0 points ID AVG" in md
    assert "Against a margin of ±20.0 points: equivalent within the margin" in md
    with pytest.raises(HarnessError, match="margin must be a number of points between 0 and 100"):
        write_report(runs, tmp_path / "rep2", formats="md", margin=0.0)
    assert main(["report", "--runs", str(runs), "--out", str(tmp_path / "rep3"), "--format", "md", "--margin", "20"]) == 0
    assert "Against a margin of ±20.0 points" in (tmp_path / "rep3" / "report.md").read_text(encoding="utf-8")
    capsys.readouterr()
    for bad in ("0", "-1", "100", "abc", "nan"):
        assert main(["report", "--runs", str(runs), "--out", str(tmp_path / "rep4"), "--margin", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"harness: error: --margin takes percentage points between 0 and 100 (exclusive), e.g. 2.3; got {bad!r}"]
    assert not (tmp_path / "rep4").exists()
