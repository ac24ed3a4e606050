"""The report's numbers as pandas frames, from a ``RunStore``.

Scores (fractions in [0, 1]) of a finished cell over its final window (its last ``eval.final_evals``
evaluations, ``reports.load``), per benchmark, and
averaged: ``ID AVG`` / ``OOD AVG`` = mean over the suite's ID / OOD benchmarks, ``ALL AVG`` = mean
over ALL the suite's benchmarks (not the mean of ID AVG and OOD AVG). An average needs every
benchmark of its set; a group that lacks one gets no value (a dash in the tables).

The unit of every interval and test is a seed: one trained policy with all its benchmarks (see
``reports.stats``). A number over a set of benchmarks uses the seeds that have every one of them
(``n_seeds`` says how many). Means, gains, differences and robustness AUCs get t-intervals (Welch's
for two independent groups); the IQM and P(improve) get a percentile bootstrap over seeds (``REPS``
replicates, a seeded stream per number) from ``stats.BOOTSTRAP_MIN_SEEDS`` seeds a side.

Cells of one seed share the warm start, the data order and the noise draws, so algorithms are also
compared paired by seed: per-seed differences over the seeds both have, with a t-interval and the
paired t-test. The *gain* of a seed is its final score minus its step-0 evaluation (the initial
model, before any training).

Each comparison with the baseline also gets an equivalence test against a margin (``reports.seeds.DEFAULT_MARGIN``,
or the report's ``--margin``): TOST on the same differences the answers use (paired by seed from 2
common seeds, else Welch), its 1 - 2 ALPHA interval, a verdict (better / worse by at least the
margin, equivalent within it, inconclusive) and, when inconclusive, the seeds that would decide it
(``equivalence``; the ``eq_*`` columns of significance.csv and robustness_auc.csv).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from reports import stats
from reports.load import RunStore, sort_noise
from reports.seeds import ALPHA, DEFAULT_MARGIN, EQ_COLUMNS, Finals, compare_seeds

REPS = 2000
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


def main_table(store: RunStore, suite: Suite, seed: int = 0) -> pd.DataFrame:
    """One row per (algo, noise, score), every algo x noise of the suite (missing -> nan):
    n_finished (finished seeds of the cell), n_seeds (those with every benchmark of the score),
    mean, ci_low, ci_high (t-interval), iqm, iqm_low, iqm_high (IQM from IQM_MIN_SEEDS seeds, its
    bootstrap interval from BOOTSTRAP_MIN_SEEDS), and the gain over step 0: n_gain, gain, gain_low,
    gain_high (t-interval)."""
    finals = Finals(store, suite)
    done = store.done()
    finished = done[done["suite"] == suite.name].groupby(["algo", "noise"]).size()
    nan = math.nan
    rows = []
    for algo in suite.algos:
        for noise in suite.noises:
            for score in suite.scores():
                row = {"suite": suite.name, "algo": algo, "noise": noise, "score": score, "role": suite.role(score),
                       "n_finished": int(finished.get((algo, noise), 0)), "n_seeds": 0, "mean": nan, "ci_low": nan,
                       "ci_high": nan, "iqm": nan, "iqm_low": nan, "iqm_high": nan, "n_gain": 0, "gain": nan,
                       "gain_low": nan, "gain_high": nan}
                m = finals.matrix(algo, noise, score)
                if m is not None and len(m):
                    row["n_seeds"] = len(m)
                    row["mean"], row["ci_low"], row["ci_high"] = stats.t_interval(m.mean(axis=1), ALPHA)
                    if len(m) >= stats.IQM_MIN_SEEDS:
                        row["iqm"], row["iqm_low"], row["iqm_high"] = stats.bootstrap_ci(
                            m.to_numpy(), stats.iqm, reps=REPS, seed=seed, key=f"{suite.name}/{algo}/{noise}/{score}/iqm",
                            alpha=ALPHA)
                gain = finals.per_seed(algo, noise, score, "gain")
                if gain is not None and len(gain):
                    row["n_gain"] = len(gain)
                    row["gain"], row["gain_low"], row["gain_high"] = stats.t_interval(gain, ALPHA)
                rows.append(row)
    return pd.DataFrame(rows)


SEED_TESTS = ("welch_p", "mwu_p", "pair_p")  # tests over seeds; each gets its own Holm family
PROBLEM_TESTS = ("prob_p", "two_p")          # bootstraps over problems (per-problem results needed)


def _problem_matrices(store: RunStore, suite: Suite, algo: str, baseline: str, noise: str, score: str):
    """Per benchmark of the score, per-problem scores [seeds, problems] of each side on the
    problems every seed of both sides evaluated; None without per-problem results."""
    probs = store.final_problems()
    probs = probs[(probs["suite"] == suite.name) & (probs["noise"] == noise)]
    out = []
    for bench in suite.members(score):
        sides = []
        for a in (algo, baseline):
            rows = probs[(probs["algo"] == a) & (probs["benchmark"] == bench)]
            sides.append(rows.pivot_table(index="seed", columns="problem", values="score").dropna(axis=1))
        common = sides[0].columns.intersection(sides[1].columns)
        if len(common) == 0:
            return None
        out.append(tuple(side[common].to_numpy(dtype=float) for side in sides))
    return out or None


def compare_problems(store: RunStore, suite: Suite, algo: str, baseline: str, noise: str, score: str,
                     seed: int) -> dict:
    """Bootstraps over problems, when cells hold per-problem results: the paired bootstrap over
    problems (seeds averaged, fixed: about these checkpoints on this problem set) and the
    two-level bootstrap (seeds, then problems)."""
    nan = math.nan
    row = {"n_problems": 0, "prob_diff": nan, "prob_low": nan, "prob_high": nan, "prob_p": nan, "prob_p_bound": False,
           "two_diff": nan, "two_low": nan, "two_high": nan, "two_p": nan, "two_p_bound": False}
    mats = _problem_matrices(store, suite, algo, baseline, noise, score)
    if mats is None:
        return row
    key = f"{suite.name}/{algo}-{baseline}/{noise}/{score}"
    row["n_problems"] = sum(a.shape[1] for a, _ in mats)
    diffs = [a.mean(axis=0) - b.mean(axis=0) for a, b in mats]
    (row["prob_diff"], row["prob_low"], row["prob_high"], row["prob_p"],
     row["prob_p_bound"]) = stats.paired_bootstrap(diffs, reps=REPS, seed=seed, key=key + "/paired", alpha=ALPHA)
    (row["two_diff"], row["two_low"], row["two_high"], row["two_p"],
     row["two_p_bound"]) = stats.two_level_bootstrap([a for a, _ in mats], [b for _, b in mats], reps=REPS, seed=seed,
                                                     key=key + "/two-level", alpha=ALPHA)
    return row


def add_holm(df: pd.DataFrame, columns, by: list[str]) -> pd.DataFrame:
    """For each p column: ``<col>_holm`` (Holm-Bonferroni over the rows of one ``by`` group where
    the test is defined), ``<col>_m`` (that family's size) and ``<col>_sig`` (adjusted < ALPHA)."""
    for col in columns:
        df[col + "_holm"] = df.groupby(by)[col].transform(lambda p: pd.Series(stats.holm(p.to_numpy()), index=p.index))
        df[col + "_m"] = df.groupby(by)[col].transform(lambda p: int(p.notna().sum())).astype(int)
        df[col + "_sig"] = df[col + "_holm"] < ALPHA
    return df


def significance_table(store: RunStore, suite: Suite, baseline: str, seed: int = 0,
                       margin: float = DEFAULT_MARGIN) -> pd.DataFrame:
    """Each algorithm against the baseline at each noise setting, for ID AVG, OOD AVG and ALL AVG:
    ``compare_seeds`` of final scores, P(improve) with its bootstrap interval, and
    ``compare_problems``. Each test's p-values are Holm-adjusted over the comparisons of one
    (suite, score) table where that test is defined (all algorithms x noise settings)."""
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
                row.update(compare_seeds(finals.per_seed(algo, noise, score), finals.per_seed(baseline, noise, score),
                                         margin))
                ma, mb = finals.matrix(algo, noise, score), finals.matrix(baseline, noise, score)
                row["poi"] = row["poi_low"] = row["poi_high"] = math.nan
                if ma is not None and len(ma) and len(mb):
                    row["poi"], row["poi_low"], row["poi_high"] = stats.prob_improvement(
                        ma.to_numpy(), mb.to_numpy(), reps=REPS, seed=seed,
                        key=f"{suite.name}/{algo}-{baseline}/{noise}/{score}/poi", alpha=ALPHA)
                row.update(compare_problems(store, suite, algo, baseline, noise, score, seed))
                rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    return add_holm(df, SEED_TESTS + PROBLEM_TESTS, ["score"])


def robustness_table(store: RunStore, suite: Suite, main: pd.DataFrame, baseline: str | None = None,
                     seed: int = 0, margin: float = DEFAULT_MARGIN) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(curve, auc). curve: main-table rows of the averages with family and rate columns (rate
    nan for settings without one rate). auc: per (algo, score, family) the normalised area under
    score(rate) over the family's rates (``none`` as rate 0 joins every family), per seed over the
    seeds that have every rate (n_seeds), with its mean and t-interval; nan when no seed has every
    rate or the family has < 2 rates. Against the baseline, paired by seed: base_diff, base_low,
    base_high, base_p (paired t-test), Holm-adjusted over the algorithms of one (family, score), and the
    equivalence test against +-``margin`` (``EQ_COLUMNS``, ``equivalence``)."""
    curve = main[main["score"].isin(AVERAGES)].copy()
    parsed = {n: noise_rate(n) for n in suite.noises}
    curve["rate"] = curve["noise"].map(lambda n: parsed[n][1] if parsed[n] else math.nan)
    families = sorted({p[0] for p in parsed.values() if p and p[0] != "none"})
    finals = Finals(store, suite)
    nan = math.nan
    rows = []
    for family in families:
        settings = {p[1]: n for n, p in parsed.items() if p and p[0] == family}
        if "none" in parsed and 0.0 not in settings:
            settings[0.0] = "none"
        rates = sorted(settings)

        def per_seed_auc(algo: str, score: str) -> pd.Series | None:
            if len(rates) < 2:
                return None
            columns = [finals.per_seed(algo, settings[r], score) for r in rates]
            if any(c is None for c in columns):
                return None
            wide = pd.concat(columns, axis=1, join="inner")
            return pd.Series(wide.to_numpy() @ stats.auc_weights(rates), index=wide.index)

        for score in AVERAGES:
            base = per_seed_auc(baseline, score) if baseline in suite.algos else None
            for algo in suite.algos:
                row = {"suite": suite.name, "algo": algo, "score": score, "family": family,
                       "rates": " ".join(f"{r:g}" for r in rates), "n_seeds": 0, "auc": nan, "auc_low": nan,
                       "auc_high": nan, "n_pairs": 0, "base_diff": nan, "base_low": nan, "base_high": nan, "base_p": nan}
                auc = per_seed_auc(algo, score)
                if auc is not None and len(auc):
                    row["n_seeds"] = len(auc)
                    row["auc"], row["auc_low"], row["auc_high"] = stats.t_interval(auc, ALPHA)
                    if base is not None and algo != baseline:
                        c = compare_seeds(auc, base, margin)
                        row.update(n_pairs=c["n_pairs"], base_diff=c["pair_diff"], base_low=c["pair_low"],
                                   base_high=c["pair_high"], base_p=c["pair_p"])
                        row.update({k: v for k, v in c.items() if k.startswith("eq_")})
                rows.append(row)
    columns = ["suite", "algo", "score", "family", "rates", "n_seeds", "auc", "auc_low", "auc_high", "n_pairs",
               "base_diff", "base_low", "base_high", "base_p", *EQ_COLUMNS]
    auc = pd.DataFrame(rows, columns=columns)
    auc = add_holm(auc, ["base_p"], ["family", "score"]) if len(auc) else auc
    return curve, auc


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
    """One suite's analysis: its `Suite` and the frames its report sections computed
    (`reports.sections.SECTIONS`), by name, each also an attribute (`report.main`)."""

    suite: Suite
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)

    def __getattr__(self, name: str) -> pd.DataFrame:
        frames = self.__dict__.get("frames", {})
        if name in frames:
            return frames[name]
        raise AttributeError(f"{type(self).__name__} has no {name!r} (frames: {', '.join(frames)})")
