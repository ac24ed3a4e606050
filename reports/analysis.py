"""The report's numbers as pandas frames, from a ``RunStore``.

Scores (fractions in [0, 1]) of a finished cell at its last evaluation step, per benchmark, and
averaged: ``ID AVG`` / ``OOD AVG`` = mean over the suite's ID / OOD benchmarks, ``ALL AVG`` = mean
over ALL the suite's benchmarks (not the mean of ID AVG and OOD AVG). An average needs every
benchmark of its set; a group that lacks one gets no value (a dash in the tables).

Every interval is a 95 % percentile interval of a stratified bootstrap over seeds (strata =
benchmarks; see ``reports.stats``) with ``REPS`` replicates and a seeded stream per number.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from reports import stats
from reports.load import RunStore, sort_noise

REPS = 2000
ALPHA = 0.05
AVERAGES = ("ID AVG", "OOD AVG", "ALL AVG")
LAST_K = 3  # stability: spread of the last LAST_K evaluations
CURVE_METRICS = [  # (label, source, key): eval scores come from eval.jsonl (with step 0)
    ("clean training reward", "metrics", "reward/clean_mean"),
    ("noisy training reward", "metrics", "reward/train_mean"),
    ("ID accuracy", "eval", "ID AVG"),
    ("OOD accuracy", "eval", "OOD AVG"),
    ("KL to reference", "metrics", "actor/kl_ref"),
    ("entropy", "metrics", "actor/entropy"),
    ("critic spread", "metrics", "critic/dist_std"),
]
_RATE = re.compile(r"([A-Za-z_]+)(\d+(?:\.\d+)?)")


def noise_rate(name: str) -> tuple[str, float] | None:
    """(injector family, rate) of a single-injector setting whose parameter lies in [0, 1]:
    'flip0.2' -> ('flip', 0.2); 'none' -> ('none', 0.0); None for settings without one rate
    ('fn0.3+gauss0.1', 'pseudo8')."""
    if name == "none":
        return ("none", 0.0)
    m = _RATE.fullmatch(name)
    if not m or not 0.0 <= float(m.group(2)) <= 1.0:
        return None
    return (m.group(1), float(m.group(2)))


@dataclass
class Suite:
    name: str
    algos: list[str]
    noises: list[str]
    benchmarks: dict[str, list[str]]  # role -> benchmark names ("ID", "OOD")

    def members(self, score: str) -> list[str]:
        """Benchmarks whose mean is the score."""
        if score == "ID AVG":
            return self.benchmarks["ID"]
        if score == "OOD AVG":
            return self.benchmarks["OOD"]
        if score == "ALL AVG":
            return self.benchmarks["ID"] + self.benchmarks["OOD"]
        return [score]

    def scores(self) -> list[str]:
        return self.benchmarks["ID"] + self.benchmarks["OOD"] + list(AVERAGES)

    def role(self, score: str) -> str:
        if score in AVERAGES:
            return score.split()[0]
        return "ID" if score in self.benchmarks["ID"] else "OOD"


def suites(store: RunStore, baseline: str | None = None) -> list[Suite]:
    out = []
    for name, cells in store.cells.groupby("suite", sort=True):
        evals = store.evals[store.evals["suite"] == name]
        algos = sorted(set(cells["algo"]), key=lambda a: (a != baseline, a))
        benchmarks = {role: sorted(set(evals.loc[evals["role"] == role, "benchmark"])) for role in ("ID", "OOD")}
        out.append(Suite(name, algos, sort_noise(cells["noise"]), benchmarks))
    return out


class Finals:
    """Final per-seed scores of one suite: strata(algo, noise, score) -> list of per-benchmark
    arrays over seeds, or None when a benchmark of the score has no finished seed."""

    def __init__(self, store: RunStore, suite: Suite):
        df = store.final_scores()
        df = df[df["suite"] == suite.name]
        self.table = {key: g.set_index("seed")["value"].sort_index()
                      for key, g in df.groupby(["algo", "noise", "benchmark"])}
        self.suite = suite

    def strata(self, algo: str, noise: str, score: str) -> list[np.ndarray] | None:
        out = []
        for bench in self.suite.members(score):
            values = self.table.get((algo, noise, bench))
            if values is None or len(values) == 0:
                return None
            out.append(values.to_numpy(dtype=float))
        return out or None

    def per_seed(self, algo: str, noise: str, score: str) -> np.ndarray | None:
        """The score of each seed that has every benchmark of it (for the tests over seeds)."""
        columns = []
        for bench in self.suite.members(score):
            values = self.table.get((algo, noise, bench))
            if values is None:
                return None
            columns.append(values.rename(bench))
        if not columns:
            return None
        return pd.concat(columns, axis=1).dropna().mean(axis=1).to_numpy(dtype=float)


def main_table(store: RunStore, suite: Suite, seed: int = 0) -> pd.DataFrame:
    """One row per (algo, noise, score), every algo x noise of the suite (missing -> nan):
    n_finished (finished seeds of the cell), n_seeds (those with every benchmark of the score), mean, ci_low, ci_high, iqm, iqm_low, iqm_high (IQM only with >= IQM_MIN_SEEDS)."""
    finals = Finals(store, suite)
    done = store.done()
    finished = done[done["suite"] == suite.name].groupby(["algo", "noise"]).size()
    rows = []
    for algo in suite.algos:
        for noise in suite.noises:
            for score in suite.scores():
                strata = finals.strata(algo, noise, score)
                row = {"suite": suite.name, "algo": algo, "noise": noise, "score": score,
                       "role": suite.role(score), "n_finished": int(finished.get((algo, noise), 0)), "n_seeds": 0, "mean": math.nan, "ci_low": math.nan,
                       "ci_high": math.nan, "iqm": math.nan, "iqm_low": math.nan, "iqm_high": math.nan}
                if strata is not None:
                    key = f"{suite.name}/{algo}/{noise}/{score}"
                    n = min(len(s) for s in strata)
                    row["n_seeds"] = n
                    row["mean"], row["ci_low"], row["ci_high"] = stats.bootstrap_ci(
                        strata, stats.mean_of_means, reps=REPS, seed=seed, key=key, alpha=ALPHA)
                    if n >= stats.IQM_MIN_SEEDS:
                        row["iqm"], row["iqm_low"], row["iqm_high"] = stats.bootstrap_ci(
                            strata, stats.iqm, reps=REPS, seed=seed, key=key + "/iqm", alpha=ALPHA)
                rows.append(row)
    return pd.DataFrame(rows)


def _paired(store: RunStore, suite: Suite, algo: str, baseline: str, noise: str, score: str, seed: int):
    """Paired bootstrap over problems, or None without per-problem results on both sides."""
    probs = store.final_problems()
    probs = probs[(probs["suite"] == suite.name) & (probs["noise"] == noise)]
    diffs = []
    for bench in suite.members(score):
        sides = []
        for a in (algo, baseline):
            rows = probs[(probs["algo"] == a) & (probs["benchmark"] == bench)]
            sides.append(rows.groupby("problem")["score"].mean())  # mean over seeds
        common = sides[0].index.intersection(sides[1].index)
        if len(common) == 0:
            return None
        diffs.append((sides[0][common] - sides[1][common]).to_numpy(dtype=float))
    if not diffs:
        return None
    key = f"{suite.name}/{algo}-{baseline}/{noise}/{score}/paired"
    return (sum(len(d) for d in diffs), *stats.paired_bootstrap(diffs, reps=REPS, seed=seed, key=key, alpha=ALPHA))


def significance_table(store: RunStore, suite: Suite, baseline: str, seed: int = 0) -> pd.DataFrame:
    """Each algorithm against the baseline at each noise setting, for ID AVG, OOD AVG and ALL AVG.
    Holm-Bonferroni runs over the comparisons of one (suite, score) table, separately for the
    Welch, Mann-Whitney and paired-bootstrap p-values; ``significant`` = Holm-adjusted Welch
    p < ALPHA."""
    if baseline not in suite.algos:
        return pd.DataFrame()
    finals = Finals(store, suite)
    rows = []
    for score in AVERAGES:
        for noise in suite.noises:
            for algo in suite.algos:
                if algo == baseline:
                    continue
                row = {"suite": suite.name, "score": score, "noise": noise, "algo": algo, "baseline": baseline}
                a, b = finals.strata(algo, noise, score), finals.strata(baseline, noise, score)
                a_seed, b_seed = finals.per_seed(algo, noise, score), finals.per_seed(baseline, noise, score)
                nan = math.nan
                row.update(n_algo=0 if a_seed is None else len(a_seed), n_base=0 if b_seed is None else len(b_seed),
                           diff=nan, diff_low=nan, diff_high=nan, welch_t=nan, welch_p=nan, mwu_u=nan, mwu_p=nan,
                           poi=nan, poi_low=nan, poi_high=nan, paired_problems=0, paired_diff=nan,
                           paired_low=nan, paired_high=nan, paired_p=nan)
                if a is not None and b is not None:
                    key = f"{suite.name}/{algo}-{baseline}/{noise}/{score}"
                    row["diff"], row["diff_low"], row["diff_high"] = stats.difference_ci(
                        a, b, reps=REPS, seed=seed, key=key, alpha=ALPHA)
                    row["poi"], row["poi_low"], row["poi_high"] = stats.prob_improvement(
                        a, b, reps=REPS, seed=seed, key=key + "/poi", alpha=ALPHA)
                    row["welch_t"], row["welch_p"] = stats.welch_test(a_seed, b_seed)
                    row["mwu_u"], row["mwu_p"] = stats.mann_whitney(a_seed, b_seed)
                paired = _paired(store, suite, algo, baseline, noise, score, seed)
                if paired is not None:
                    (row["paired_problems"], row["paired_diff"], row["paired_low"], row["paired_high"],
                     row["paired_p"]) = paired
                rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for col in ("welch_p", "mwu_p", "paired_p"):
        df[col + "_holm"] = df.groupby("score")[col].transform(lambda p: pd.Series(stats.holm(p.to_numpy()), index=p.index))
    df["significant"] = df["welch_p_holm"] < ALPHA
    df["significant_mwu"] = df["mwu_p_holm"] < ALPHA
    df["significant_paired"] = df["paired_p_holm"] < ALPHA
    return df


def robustness_table(store: RunStore, suite: Suite, main: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(curve, auc). curve: main-table rows of the averages with family and rate columns (rate
    nan for settings without one rate). auc: per (algo, score, family) the normalised area under
    score(rate) over the family's rates (``none`` as rate 0 joins every family), with its
    bootstrap interval; nan when the algorithm misses a rate of the family or it has < 2 rates."""
    curve = main[main["score"].isin(AVERAGES)].copy()
    parsed = {n: noise_rate(n) for n in suite.noises}
    curve["rate"] = curve["noise"].map(lambda n: parsed[n][1] if parsed[n] else math.nan)
    families = sorted({p[0] for p in parsed.values() if p and p[0] != "none"})
    finals = Finals(store, suite)
    rows = []
    for family in families:
        settings = {p[1]: n for n, p in parsed.items() if p and p[0] == family}
        if "none" in parsed and 0.0 not in settings:
            settings[0.0] = "none"
        rates = sorted(settings)
        for algo in suite.algos:
            for score in AVERAGES:
                row = {"suite": suite.name, "algo": algo, "score": score, "family": family,
                       "rates": " ".join(f"{r:g}" for r in rates), "auc": math.nan, "auc_low": math.nan,
                       "auc_high": math.nan}
                strata, groups = [], []
                for k, r in enumerate(rates):
                    s = finals.strata(algo, settings[r], score)
                    if s is None:
                        strata = None
                        break
                    strata += s
                    groups += [k] * len(s)
                if strata is not None and len(rates) >= 2:
                    key = f"{suite.name}/{algo}/{family}/{score}/auc"
                    row["auc"], row["auc_low"], row["auc_high"] = stats.bootstrap_ci(
                        strata, stats.auc_statistic(rates, groups), reps=REPS, seed=seed, key=key, alpha=ALPHA)
                rows.append(row)
    return curve, pd.DataFrame(rows, columns=["suite", "algo", "score", "family", "rates", "auc", "auc_low", "auc_high"])


def eval_curves(store: RunStore, suite: Suite) -> pd.DataFrame:
    """Per finished cell and evaluation step, the averages: algo, noise, seed, step, score, value.
    A step counts for an average only when every benchmark of it was evaluated at that step."""
    done = store.done()[["suite", "algo", "noise", "seed"]]
    ev = store.evals.merge(done[done["suite"] == suite.name], on=["suite", "algo", "noise", "seed"])
    rows = []
    for score in AVERAGES:
        members = suite.members(score)
        if not members:
            continue
        sub = ev[ev["benchmark"].isin(members)]
        g = sub.groupby(["algo", "noise", "seed", "step"])["value"].agg(["mean", "count"]).reset_index()
        g = g[g["count"] == len(members)]
        rows.append(g.assign(score=score).rename(columns={"mean": "value"}).drop(columns="count"))
    if not rows:
        return pd.DataFrame(columns=["algo", "noise", "seed", "step", "score", "value"])
    return pd.concat(rows, ignore_index=True)


def stability_curves(store: RunStore, suite: Suite, curves: pd.DataFrame) -> pd.DataFrame:
    """Mean, min and max over seeds per (noise, algo, metric, step) for CURVE_METRICS present
    in the data: columns noise, algo, metric, key, step, n_seeds, mean, min, max."""
    done = store.done()[["suite", "algo", "noise", "seed"]]
    met = store.metrics.merge(done[done["suite"] == suite.name], on=["suite", "algo", "noise", "seed"])
    parts = []
    for label, source, key in CURVE_METRICS:
        if source == "eval":
            df = curves[curves["score"] == key][["algo", "noise", "seed", "step", "value"]]
        elif key in met:
            df = met[["algo", "noise", "seed", "step", key]].rename(columns={key: "value"}).dropna()
        else:
            continue
        if df.empty:
            continue
        g = df.groupby(["noise", "algo", "step"])["value"].agg(n_seeds="count", mean="mean", min="min", max="max")
        parts.append(g.reset_index().assign(metric=label, key=key))
    if not parts:
        return pd.DataFrame(columns=["noise", "algo", "metric", "key", "step", "n_seeds", "mean", "min", "max"])
    return pd.concat(parts, ignore_index=True)[["noise", "algo", "metric", "key", "step", "n_seeds", "mean", "min", "max"]]


def stability_table(suite: Suite, curves: pd.DataFrame) -> pd.DataFrame:
    """Per (algo, noise, score) over finished seeds: last_std = mean over seeds of the population
    std of the last LAST_K evaluations; max_drop = mean over seeds of the largest drop from a
    running best evaluation; collapsed = number of seeds whose final score is below their step-0
    score (the initial model), out of n_initial seeds that have a step-0 evaluation."""
    rows = []
    for algo in suite.algos:
        for noise in suite.noises:
            for score in AVERAGES:
                df = curves[(curves["algo"] == algo) & (curves["noise"] == noise) & (curves["score"] == score)]
                last_std, drops, collapsed, n_initial = [], [], 0, 0
                for _, g in df.sort_values("step").groupby("seed"):
                    v = g["value"].to_numpy(dtype=float)
                    last_std.append(float(np.std(v[-LAST_K:])))
                    drops.append(stats.max_drawdown(v))
                    if (g["step"] == 0).any():
                        n_initial += 1
                        collapsed += int(v[-1] < float(g.loc[g["step"] == 0, "value"].iloc[0]))
                rows.append({"suite": suite.name, "algo": algo, "noise": noise, "score": score,
                             "n_seeds": len(drops),
                             "last_std": float(np.mean(last_std)) if last_std else math.nan,
                             "max_drop": float(np.mean(drops)) if drops else math.nan,
                             "collapsed": collapsed if n_initial else math.nan, "n_initial": n_initial})
    return pd.DataFrame(rows)


@dataclass
class SuiteReport:
    suite: Suite
    main: pd.DataFrame
    significance: pd.DataFrame
    robustness_curve: pd.DataFrame
    robustness: pd.DataFrame
    curves: pd.DataFrame
    stability_curves: pd.DataFrame
    stability: pd.DataFrame
    unfinished: pd.DataFrame


def analyse(store: RunStore, baseline: str = "ppo", seed: int = 0) -> list[SuiteReport]:
    out = []
    for suite in suites(store, baseline):
        main = main_table(store, suite, seed)
        curve, auc = robustness_table(store, suite, main, seed)
        ev = eval_curves(store, suite)
        cells = store.cells[store.cells["suite"] == suite.name]
        unfinished = cells[~(cells["state"].eq("done") & cells["step"].notna())]
        out.append(SuiteReport(suite, main, significance_table(store, suite, baseline, seed), curve, auc,
                               ev, stability_curves(store, suite, ev), stability_table(suite, ev), unfinished))
    return out
