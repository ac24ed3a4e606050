"""The report's one-sentence answers: each algorithm against the baseline, per noise setting and
per robustness AUC, with the equivalence test against a margin, withheld where a validity gate
fails (`reports.validity.gated`)."""
from __future__ import annotations

import math

from reports import analysis, validity
from reports.analysis import SuiteReport
from reports.format import DASH, fmt_p, is_missing

VERDICT_SCORES = ("ID AVG", "OOD AVG")


def _signed_points(x: float) -> str:
    return f"{100 * x:+.1f}"


def verdict(algo: str, baseline: str, where: str, what: str, diff: float, low: float, high: float, n: str,
            p: float, adjusted: float, m: int, test: str) -> str:
    """'dfpo vs ppo under flip0.2: +3.1 points ID AVG [95% CI -0.4, +6.6] (paired by seed, 10 seeds),
    not significant after Holm (paired t p = 0.081, adjusted 0.650 over 16 comparisons).' (p below
    0.001 prints as 'p < 0.001')."""
    head = f"{algo} vs {baseline} {where}: "
    if is_missing(diff):
        return head + f"no {what} to compare (a side has no finished seed with every benchmark)."
    ci = "" if is_missing(low) else f" [95% CI {_signed_points(low)}, {_signed_points(high)}]"
    text = f"{head}{_signed_points(diff)} points {what}{ci} ({n})"
    if is_missing(p):
        return text + ", no test possible (it needs 2 seeds a side and some variance)."
    word = "significant" if adjusted < analysis.ALPHA else "not significant"
    family = f"{int(m)} comparison" + ("" if int(m) == 1 else "s")
    p_text = f"p {fmt_p(p)}" if p < 0.001 else f"p = {fmt_p(p)}"
    adj_text = f"adjusted {fmt_p(adjusted)}"
    return text + f", {word} after Holm ({test} {p_text}, {adj_text} over {family})."


def _ci_pct(alpha: float) -> str:
    return f"{100 * (1 - 2 * alpha):g}%"


def equivalence_clause(row, seeds: str) -> str:
    """' Against a margin of +-2.3 points: equivalent within the margin (90% CI -1.2, +0.8; TOST p = 0.012).'
    from a row's eq_* fields (``analysis.equivalence``); ``seeds`` names the seed count ('4 seeds').
    An undefined test is a dash; an inconclusive one says how many seeds would decide it."""
    margin = getattr(row, "eq_margin", math.nan)
    if is_missing(margin):
        return ""
    head = f" Against a margin of ±{100 * margin:.1f} points: "
    verdict = row.eq_verdict
    if verdict == "undefined" or is_missing(row.eq_low):
        return head + f"equivalence test {DASH} (it needs 2 seeds a side and some variance)."
    ci = f"{_ci_pct(analysis.ALPHA)} CI {_signed_points(row.eq_low)}, {_signed_points(row.eq_high)}"
    p_text = lambda p: f"p {fmt_p(p)}" if p < 0.001 else f"p = {fmt_p(p)}"  # noqa: E731
    if verdict == "better":
        return head + f"better by at least the margin ({ci}; one-sided {p_text(row.eq_p_better)})."
    if verdict == "worse":
        return head + f"worse by at least the margin ({ci}; one-sided {p_text(row.eq_p_worse)})."
    if verdict == "equivalent":
        return head + f"equivalent within the margin ({ci}; TOST {p_text(row.eq_p)})."
    need = ("more than 1000 seeds would be needed to decide at the observed difference and spread"
            if is_missing(row.eq_seeds) else
            f"about {int(row.eq_seeds)} seeds{'' if row.eq_paired else ' a side'} would decide it (80% power at the "
            f"observed difference and spread)")
    return head + f"inconclusive at {seeds} ({ci}; TOST {p_text(row.eq_p)}); {need}."


def verdicts(r: SuiteReport, baseline: str) -> list[str]:
    """One sentence per comparison: each algorithm against the baseline at each noise setting for
    VERDICT_SCORES, then per robustness AUC. Paired by seed where both have >= 2 seeds in common,
    else Welch over independent groups."""
    out = []
    df = r.significance
    for score in VERDICT_SCORES if not df.empty else ():
        for row in df[df["score"] == score].itertuples():
            if row.n_pairs >= 2:
                args = (row.pair_diff, row.pair_low, row.pair_high, f"paired by seed, {row.n_pairs} seeds",
                        row.pair_p, row.pair_p_holm, row.pair_p_m, "paired t")
                seeds = f"{row.n_pairs} seeds"
            else:
                args = (row.diff, row.diff_low, row.diff_high, f"unpaired, {row.n_algo} vs {row.n_base} seeds",
                        row.welch_p, row.welch_p_holm, row.welch_p_m, "Welch")
                seeds = f"{row.n_algo} vs {row.n_base} seeds"
            sentence = verdict(row.algo, baseline, f"under {row.noise}", score, *args)
            out.append(sentence + ("" if is_missing(args[0]) else equivalence_clause(row, seeds)))
    auc = r.robustness
    if "base_p_holm" in auc:
        for row in auc[(auc["algo"] != baseline) & auc["score"].isin(VERDICT_SCORES)].itertuples():
            sentence = verdict(row.algo, baseline, f"over {row.family} rates {row.rates.replace(' ', ', ')}",
                               f"{row.score} robustness AUC", row.base_diff, row.base_low, row.base_high,
                               f"paired by seed, {row.n_pairs} seeds", row.base_p, row.base_p_holm, row.base_p_m,
                               "paired t")
            out.append(sentence + ("" if is_missing(row.base_diff) else equivalence_clause(row, f"{row.n_pairs} seeds")))
    return out


ANSWERS_NOTE = (
    "One sentence per comparison with the baseline: the paired-by-seed difference where the two algorithms share "
    "at least 2 seeds (else the unpaired one), its 95% interval, and the test Holm-adjusted over the comparisons of "
    "its table (every algorithm x noise setting for that score; for AUCs, every algorithm for that family and score). "
    "Then the equivalence test against a margin (default ±2.3 points, the smallest gain over PPO the DVPO/DFPO papers "
    "claim on an average score; `harness report --margin`): two one-sided t-tests (TOST) on the same differences, "
    "with their 90% interval, per comparison (not adjusted for multiplicity). Better / worse by at least the margin: the "
    "interval lies beyond +margin / -margin; equivalent: it lies inside ±margin; otherwise inconclusive at this many "
    "seeds, with the seed count at which the decision the observed difference and spread point to has 80% power."
)


def answers(reports: list[SuiteReport], baseline: str) -> list[tuple[str, list[str]]]:
    """(suite, sentences) per suite that has the baseline."""
    return [(r.suite.name, validity.gated(r.validity, verdicts(r, baseline))) for r in reports if not r.significance.empty]
