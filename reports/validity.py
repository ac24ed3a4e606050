"""Validity gates: whether a suite's run store can answer "is algorithm A more robust than B".

A comparison of critics on a task where no critic can help, or of scores that move more between two
evaluations of one policy than between algorithms, says nothing. Before the report gives a suite's
one-sentence answers it checks, on the cells of that suite:

    positive control   for each noise setting N whose rates are known (flips, fp, fn, form_fn,
                       near_fp), the baseline's mean gain under ``N+corrected`` (the backward-corrected
                       reward, ``noise.correction``) is at least CONTROL_MIN of its clean gain: the
                       testbed and the algorithm recover the signal when the noise is undone
    critic             PPO's critic explained variance (``critic/explained_var`` in metrics.jsonl),
                       the mean over the second half of each clean run, mean over seeds, >= EV_MIN
    frozen critic      PPO beats PPO with its critic frozen at initialisation (``ppo_frozen_critic``)
                       on clean rewards: paired by seed, difference > 0 with paired t p < ALPHA
    headroom           the best clean final score of any algorithm is at least HEADROOM_MIN below
                       the ceiling, the best expected score any policy can reach (the mean of the
                       score's benchmarks' ``ceiling`` in their eval rows; CEILING, 100 %, where they
                       record none): room for a better algorithm to show
    test-retest sd     the sd of one fixed policy's final score over repeated evaluations, read from
                       ``<runs>/<suite>/retest.json`` ({"sd": fraction, "repeats": R}), <= RETEST_MAX
    OOD above floor    on clean runs the initial model scores at least OOD_START_MIN out of domain and
                       some algorithm's mean OOD gain over step 0 is at least OOD_MOVE_MIN in size

Scores are ``SCORE`` (ID AVG) unless the gate says OOD. The testbed gates (critic, frozen critic,
headroom, OOD) read the clean cells (noise ``none``): they are properties of the testbed, not of a
noise setting; the positive control has a row per noise setting. A gate whose cells are not in the
store says "not measured" (the ``validity`` preset runs them all) and withholds nothing; a gate that
fails withholds the suite's one-sentence answers, and the report says which gate failed and by how
much.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from harness.errors import HarnessError
from noise import parse_noise
from reports.load import sort_noise
from reports.seeds import Finals, compare_seeds

CONTROL_MIN = 0.70
EV_MIN = 0.30
HEADROOM_MIN = 0.10
CEILING = 1.0
RETEST_MAX = 0.01
OOD_START_MIN = 0.05
OOD_MOVE_MIN = 0.02
ALPHA = 0.05
SCORE = "ID AVG"
CLEAN = "none"
CONTROL = "+corrected"
CRITIC_ALGO = "ppo"
FROZEN_ALGO = "ppo_frozen_critic"
EV_KEY = "critic/explained_var"
RETEST_FILE = "retest.json"
PASS, FAIL, UNMEASURED = "pass", "FAIL", "not measured"
COLUMNS = ["suite", "gate", "setting", "status", "value", "needs", "detail"]


def _pts(x: float, signed: bool = True) -> str:
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _row(suite: str, gate: str, setting: str, status: str, value: float, needs: str, detail: str) -> dict:
    return {"suite": suite, "gate": gate, "setting": setting, "status": status, "value": value, "needs": needs,
            "detail": detail}


def _mean(series: pd.Series | None) -> float:
    return float(series.mean()) if series is not None and len(series) else math.nan


def has_known_rates(noise: str) -> bool:
    """Whether ``noise+corrected`` parses: every injector of the setting has known rates."""
    try:
        parse_noise(noise + CONTROL)
    except HarnessError:
        return False
    return True


def control_gates(finals, suite, baseline: str) -> list[dict]:
    """One positive-control row per noise setting N studied in the suite (N or N+corrected in its
    store; the clean setting aside)."""
    rows = []
    clean = _mean(finals.per_seed(baseline, CLEAN, SCORE, "gain")) if CLEAN in suite.noises else math.nan
    needs = f">= {CONTROL_MIN:.0%} of the clean gain"
    studied = {n[: -len(CONTROL)] if n.endswith(CONTROL) else n for n in suite.noises} - {CLEAN}
    for noise in sort_noise(studied):
        control = noise + CONTROL
        gain = _mean(finals.per_seed(baseline, control, SCORE, "gain")) if control in suite.noises else math.nan
        if not has_known_rates(noise):
            rows.append(_row(suite.name, "positive control", noise, UNMEASURED, math.nan, needs,
                             f"{noise} has no known rates to correct; its control is the flips' one"))
        elif math.isnan(gain) or math.isnan(clean):
            missing = control if math.isnan(gain) else CLEAN
            rows.append(_row(suite.name, "positive control", noise, UNMEASURED, math.nan, needs,
                             f"no finished {baseline} seeds with a step-0 evaluation under {missing}"))
        elif clean <= 0:
            rows.append(_row(suite.name, "positive control", noise, FAIL, math.nan, needs,
                             f"no clean gain to recover: {baseline} gains {_pts(clean)} points {SCORE} on clean rewards"))
        else:
            ratio = gain / clean
            plain = _mean(finals.per_seed(baseline, noise, SCORE, "gain")) if noise in suite.noises else math.nan
            detail = (f"{baseline} under {control} gains {_pts(gain)} of the clean {_pts(clean)} points {SCORE}: "
                      f"{ratio:.0%} recovered")
            if not math.isnan(plain):
                detail += f" ({noise} uncorrected: {_pts(plain)})"
            if ratio < CONTROL_MIN:
                detail += f"; short of {CONTROL_MIN:.0%} by {100 * (CONTROL_MIN - ratio):.0f} points"
            rows.append(_row(suite.name, "positive control", noise, PASS if ratio >= CONTROL_MIN else FAIL, ratio,
                             needs, detail))
    return rows


def critic_gate(store, suite) -> dict:
    """PPO's critic explained variance over the second half of each clean run."""
    needs = f">= {EV_MIN:.2f}"
    done = store.done()
    cells = done[(done["suite"] == suite.name) & (done["algo"] == CRITIC_ALGO) & (done["noise"] == CLEAN)]
    m = store.metrics
    if EV_KEY not in m or cells.empty:
        return _row(suite.name, "critic explained variance", CLEAN, UNMEASURED, math.nan, needs,
                    f"no finished {CRITIC_ALGO} cells under {CLEAN} with {EV_KEY} in metrics.jsonl")
    m = m.merge(cells[["suite", "algo", "noise", "seed"]], on=["suite", "algo", "noise", "seed"])
    per_seed = []
    for _, g in m.groupby("seed"):
        late = pd.to_numeric(g.loc[g["step"] >= g["step"].max() / 2, EV_KEY], errors="coerce").dropna()
        if len(late):
            per_seed.append(float(late.mean()))
    if not per_seed:
        return _row(suite.name, "critic explained variance", CLEAN, UNMEASURED, math.nan, needs,
                    f"{EV_KEY} is missing or NaN in the second half of every {CRITIC_ALGO} run")
    ev = float(np.mean(per_seed))
    detail = (f"{CRITIC_ALGO}'s critic explains {ev:.2f} of the return variance over the second half of the run "
              f"(mean of {len(per_seed)} seeds)")
    if ev < EV_MIN:
        detail += f"; short of {EV_MIN:.2f} by {EV_MIN - ev:.2f}"
    return _row(suite.name, "critic explained variance", CLEAN, PASS if ev >= EV_MIN else FAIL, ev, needs, detail)


def frozen_gate(finals, suite) -> dict:
    """PPO against PPO with a frozen critic on clean rewards, paired by seed."""
    needs = f"> 0, paired t p < {ALPHA}"
    ppo, frozen = (finals.per_seed(a, CLEAN, SCORE) if a in suite.algos and CLEAN in suite.noises else None
                   for a in (CRITIC_ALGO, FROZEN_ALGO))
    if ppo is None or frozen is None or not len(ppo) or not len(frozen):
        return _row(suite.name, "PPO vs frozen critic", CLEAN, UNMEASURED, math.nan, needs,
                    f"needs finished {CRITIC_ALGO} and {FROZEN_ALGO} cells under {CLEAN}")
    c = compare_seeds(ppo, frozen)
    if c["n_pairs"] < 2 or math.isnan(c["pair_p"]):
        return _row(suite.name, "PPO vs frozen critic", CLEAN, UNMEASURED, c["pair_diff"], needs,
                    f"{c['n_pairs']} paired seed(s) with some variance: a paired test needs 2")
    ok = c["pair_diff"] > 0 and c["pair_p"] < ALPHA
    detail = (f"{CRITIC_ALGO} - {FROZEN_ALGO} = {_pts(c['pair_diff'])} points {SCORE} [95% CI "
              f"{_pts(c['pair_low'])}, {_pts(c['pair_high'])}] (paired, {c['n_pairs']} seeds, p = {c['pair_p']:.3f})")
    if not ok:
        detail += ("; the critic does not help significantly" if c["pair_diff"] > 0 else "; the frozen critic is as good")
    return _row(suite.name, "PPO vs frozen critic", CLEAN, PASS if ok else FAIL, c["pair_diff"], needs, detail)


def headroom_gate(finals, suite) -> dict:
    """The best clean final score of any algorithm against the ceiling."""
    ceiling = finals.ceiling(SCORE)
    needs = f">= {_pts(HEADROOM_MIN, False)} points below {_pts(ceiling, False)} %" + (
        "" if ceiling == CEILING else " (the ceiling: the best any policy can expect)")
    means = {a: _mean(finals.per_seed(a, CLEAN, SCORE)) for a in suite.algos} if CLEAN in suite.noises else {}
    means = {a: v for a, v in means.items() if not math.isnan(v)}
    if not means:
        return _row(suite.name, "headroom", CLEAN, UNMEASURED, math.nan, needs, f"no finished clean cells with {SCORE}")
    best = max(means, key=means.get)
    room = ceiling - means[best]
    detail = f"best clean final score {_pts(means[best], False)} % {SCORE} ({best}): {_pts(room, False)} points of headroom"
    if room < HEADROOM_MIN:
        detail += f"; short of {_pts(HEADROOM_MIN, False)} by {_pts(HEADROOM_MIN - room, False)}"
    return _row(suite.name, "headroom", CLEAN, PASS if room >= HEADROOM_MIN else FAIL, room, needs, detail)


def retest_gate(runs_dir: Path | None, suite) -> dict:
    """The score's test-retest sd from ``<runs>/<suite>/retest.json``."""
    needs = f"<= {_pts(RETEST_MAX, False)} points"
    path = None if runs_dir is None else Path(runs_dir) / suite.name / RETEST_FILE
    if path is None or not path.is_file():
        return _row(suite.name, "test-retest sd", "all", UNMEASURED, math.nan, needs,
                    f"no {suite.name}/{RETEST_FILE} in the run store (harness eval --retest measures it)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        sd = float(record["sd"])
    except (ValueError, KeyError, TypeError, OSError, UnicodeDecodeError) as exc:
        return _row(suite.name, "test-retest sd", "all", UNMEASURED, math.nan, needs,
                    f"{str(path)!r} is unreadable ({type(exc).__name__}): it needs a JSON object with a number 'sd'")
    repeats = record.get("repeats")
    detail = f"one policy's final score has sd {_pts(sd, False)} points over repeated evaluations"
    detail += f" ({repeats} repeats)" if repeats else ""
    if sd > RETEST_MAX:
        detail += f"; above {_pts(RETEST_MAX, False)} by {_pts(sd - RETEST_MAX, False)}"
    return _row(suite.name, "test-retest sd", "all", PASS if sd <= RETEST_MAX else FAIL, sd, needs, detail)


def ood_gate(finals, suite) -> dict:
    """The initial model's OOD score and the largest mean OOD gain of any algorithm, clean runs."""
    needs = f"start >= {_pts(OOD_START_MIN, False)} %, some OOD gain or loss >= {_pts(OOD_MOVE_MIN, False)} points"
    if not suite.benchmarks["OOD"] or CLEAN not in suite.noises:
        return _row(suite.name, "OOD above floor", CLEAN, UNMEASURED, math.nan, needs, "no OOD benchmark or clean cells")
    starts, gains = [], {}
    for algo in suite.algos:
        start = finals.per_seed(algo, CLEAN, "OOD AVG", "initial")
        if start is not None and len(start):
            starts.append(start)
        gain = _mean(finals.per_seed(algo, CLEAN, "OOD AVG", "gain"))
        if not math.isnan(gain):
            gains[algo] = gain
    if not starts or not gains:
        return _row(suite.name, "OOD above floor", CLEAN, UNMEASURED, math.nan, needs,
                    "no clean cells with a step-0 and a final OOD evaluation")
    start = float(pd.concat(starts).groupby(level=0).mean().mean())  # one initial model per seed
    mover = max(gains, key=lambda a: abs(gains[a]))
    detail = (f"the initial model scores {_pts(start, False)} % OOD AVG; the largest mean OOD gain is "
              f"{_pts(gains[mover])} points ({mover})")
    short = []
    if start < OOD_START_MIN:
        short.append(f"start below {_pts(OOD_START_MIN, False)} % by {_pts(OOD_START_MIN - start, False)} points")
    if abs(gains[mover]) < OOD_MOVE_MIN:
        short.append(f"no policy moves {_pts(OOD_MOVE_MIN, False)} points: short by "
                     f"{_pts(OOD_MOVE_MIN - abs(gains[mover]), False)}")
    if short:
        detail += "; " + "; ".join(short)
    return _row(suite.name, "OOD above floor", CLEAN, FAIL if short else PASS, start, needs, detail)


def runs_root(store) -> Path | None:
    """The run store's folder (a cell's path is <runs>/<suite>/<algo>/<noise>/seed<k>)."""
    paths = store.cells["path"] if "path" in store.cells else []
    return Path(paths.iloc[0]).parents[3] if len(paths) else None


def gates(store, suite, baseline: str) -> pd.DataFrame:
    """Every gate of one suite: suite, gate, setting, status (pass / FAIL / not measured), value,
    needs (the threshold, in words), detail (the measurement and, on failure, by how much)."""
    finals = Finals(store, suite)
    rows = control_gates(finals, suite, baseline)
    rows += [critic_gate(store, suite), frozen_gate(finals, suite), headroom_gate(finals, suite),
             retest_gate(runs_root(store), suite), ood_gate(finals, suite)]
    return pd.DataFrame(rows, columns=COLUMNS)


def failures(df: pd.DataFrame | None) -> pd.DataFrame:
    return pd.DataFrame(columns=COLUMNS) if df is None or df.empty else df[df["status"] == FAIL]


def gated(df: pd.DataFrame | None, sentences: list[str]) -> list[str]:
    """The suite's one-sentence answers, or, when a gate failed, one sentence that withholds them
    and says which gates failed and by how much."""
    failed = failures(df)
    if failed.empty:
        return sentences
    reasons = " ".join(f"Failed: {g.gate} ({g.setting}): {g.detail}." for g in failed.itertuples())
    noun = "gate" if len(failed) == 1 else "gates"
    answers = f"{len(sentences)} answer" + ("" if len(sentences) == 1 else "s")
    return [f"Withheld ({answers}): the testbed failed {len(failed)} validity {noun}, so its "
            f"comparisons cannot tell the algorithms apart. {reasons}"]


NOTE = (
    "Each gate checks that this suite's store can answer the question at all; a failed gate withholds the "
    "suite's one-sentence answers. Positive control: the baseline's gain under the backward-corrected reward "
    f"(noise N+corrected) as a share of its clean gain (>= {CONTROL_MIN:.0%}). Critic, frozen critic, headroom "
    f"and OOD read the clean runs: {CRITIC_ALGO}'s critic explained variance over the second half of the run "
    f"(>= {EV_MIN}); {CRITIC_ALGO} minus {FROZEN_ALGO} paired by seed (> 0, p < {ALPHA}); the best final score "
    f"at least {_pts(HEADROOM_MIN, False)} points below the ceiling (the best score any policy can expect; "
    f"{_pts(CEILING, False)} % unless the suite's problems cap it); the initial model at least "
    f"{_pts(OOD_START_MIN, False)} % OOD and some algorithm's OOD moving {_pts(OOD_MOVE_MIN, False)} points. "
    f"Test-retest sd: one policy's final score over repeated evaluations (<= {_pts(RETEST_MAX, False)} point), "
    f"from <runs>/<suite>/{RETEST_FILE}. 'not measured': the store lacks the gate's cells (harness run "
    "--preset validity runs them)."
)


def table(df: pd.DataFrame | None) -> tuple[str, list[str], list[list[str]]]:
    """(caption, header, rows) of the Validity section."""
    rows = [] if df is None else [[g.gate, g.setting, g.status, g.needs, g.detail] for g in df.itertuples()]
    return "Validity", ["gate", "setting", "result", "needs", "measured"], rows
