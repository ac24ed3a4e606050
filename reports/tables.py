"""The report folder: Markdown, LaTeX, CSV and figures, written into a temporary folder that
replaces ``<out>`` only when complete.

    <out>/report.md        tables inline, figures linked             (--format md)
    <out>/report.tex       booktabs tables, figures included         (--format tex)
    <out>/figures/*.png    robustness and stability figures          (--format png)
    <out>/figures/*.pdf    the same as PDF (report.tex includes them) (--format pdf)
    <out>/csv/*.csv        every number of the report                (--format csv)

Scores print in percent; a dash marks a missing cell (no finished seed, or a benchmark missing).
"""
from __future__ import annotations

import math
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pandas as pd

from harness.errors import HarnessError
from reports import analysis, plots, validity
from reports.analysis import AVERAGES, LAST_K, SuiteReport
from reports.load import CORRUPT, RunStore
from reports.stats import BOOTSTRAP_MIN_SEEDS, IQM_MIN_SEEDS

FORMATS = ("md", "tex", "csv", "png", "pdf")
MARKER = ".harness-report"
STALE_TMP_S = 3600  # a temporary report folder this old belongs to a report run that died
DASH = "–"


# ---- cell formatting (neutral text; LaTeX translates it) -------------------------------------

def _isnan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def pct(x: float, signed: bool = False) -> str:
    if _isnan(x):
        return DASH
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def pct_ci(mean: float, low: float, high: float, signed: bool = False, n: int | None = None,
           n_row: int | None = None) -> str:
    """'45.3 [40.1, 50.2]' in percent; the bare mean when there is no interval; a dash if no mean.
    With ``n``: ' (n=3)' appended when it differs from the row's ``n_row``, or always without one."""
    if _isnan(mean):
        return DASH
    text = pct(mean, signed) if _isnan(low) else f"{pct(mean, signed)} [{pct(low, signed)}, {pct(high, signed)}]"
    if n is not None and (n_row is None or int(n) != int(n_row)):
        text += f" (n={int(n)})"
    return text


def fmt_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def pval(p: float, adjusted: float, bound: bool = False, reps: int = analysis.REPS) -> str:
    """'0.031 (0.124)*': p, Holm-adjusted p in brackets, * when the adjusted p < 0.05; a bootstrap
    p with no replicate across 0 prints as '< 1/B'; an undefined test is a dash."""
    if _isnan(p):
        return DASH
    mark = "*" if adjusted < analysis.ALPHA else ""
    if bound:
        return f"< {1 / reps:g} ({fmt_p(adjusted)}){mark}"
    return f"{fmt_p(p)} ({fmt_p(adjusted)}){mark}"


def prob_ci(p: float, low: float, high: float) -> str:
    if _isnan(p):
        return DASH
    return f"{p:.2f}" if _isnan(low) else f"{p:.2f} [{low:.2f}, {high:.2f}]"


# ---- tables as (caption, header, rows) ------------------------------------------------------

Table = tuple[str, list[str], list[list[str]]]


def main_tables(r: SuiteReport) -> list[Table]:
    m = r.main.set_index(["algo", "noise", "score"])
    benches = r.suite.benchmarks["ID"] + r.suite.benchmarks["OOD"]
    avg_rows, gain_rows, bench_rows = [], [], []
    for algo in r.suite.algos:
        for noise in r.suite.noises:
            n = int(m.loc[(algo, noise, "ALL AVG"), "n_finished"])

            def cell(score: str, prefix: str = "", signed: bool = False) -> str:
                row = m.loc[(algo, noise, score)]
                return pct_ci(row[prefix or "mean"], row[f"{prefix or 'ci'}_low"], row[f"{prefix or 'ci'}_high"],
                              signed, row[f"n_{prefix or 'seeds'}"], n)

            iqm = m.loc[(algo, noise, "ALL AVG")]
            avg_rows.append([algo, noise, str(n), *[cell(s) for s in AVERAGES],
                             pct_ci(iqm["iqm"], iqm["iqm_low"], iqm["iqm_high"], n=iqm["n_seeds"], n_row=n)])
            gain_rows.append([algo, noise, str(n), *[cell(s, "gain", signed=True) for s in AVERAGES]])
            bench_rows.append([algo, noise, str(n), *[cell(b) for b in benches]])
    bench_header = [f"{b} ({r.suite.role(b)})" for b in benches]
    return [
        ("Final scores (%): mean [95% t-interval] over seeds", ["algo", "noise", "seeds", *AVERAGES, "IQM (ALL AVG)"],
         avg_rows),
        ("Gain over the step-0 evaluation (pp): final minus initial score per seed, mean [95% t-interval]",
         ["algo", "noise", "seeds", *AVERAGES], gain_rows),
        ("Final scores per benchmark (%): mean [95% t-interval]", ["algo", "noise", "seeds", *bench_header], bench_rows),
    ]


def _family(df: pd.DataFrame, col: str) -> str:
    return f"m={int(df[col + '_m'].max())}" if len(df) else "m=0"


def significance_tables(r: SuiteReport) -> list[Table]:
    df = r.significance
    if df.empty:
        return []
    problems = (df["n_problems"] > 0).any()
    out = []
    for score in AVERAGES:
        sub = df[df["score"] == score]
        rows = []
        for row in sub.itertuples():
            cells = [row.noise, row.algo, f"{row.n_algo}/{row.n_base}",
                     pct_ci(row.diff, row.diff_low, row.diff_high, signed=True),
                     pval(row.welch_p, row.welch_p_holm), pval(row.mwu_p, row.mwu_p_holm),
                     prob_ci(row.poi, row.poi_low, row.poi_high), str(row.n_pairs),
                     pct_ci(row.pair_diff, row.pair_low, row.pair_high, signed=True), pval(row.pair_p, row.pair_p_holm)]
            if problems:
                cells += [str(row.n_problems) if row.n_problems else DASH,
                          pct_ci(row.prob_diff, row.prob_low, row.prob_high, signed=True),
                          pval(row.prob_p, row.prob_p_holm, row.prob_p_bound),
                          pct_ci(row.two_diff, row.two_low, row.two_high, signed=True),
                          pval(row.two_p, row.two_p_holm, row.two_p_bound)]
            rows.append(cells)
        header = ["noise", "algo", "seeds", "Δ (pp) [95% Welch CI]", f"Welch p (Holm, {_family(sub, 'welch_p')})",
                  f"MWU exact p (Holm, {_family(sub, 'mwu_p')})", "P(improve) [95% CI]", "paired seeds",
                  "paired Δ (pp) [95% CI]", f"paired t p (Holm, {_family(sub, 'pair_p')})"]
        if problems:
            header += ["problems", "Δ over problems, seeds fixed (pp) [95% CI]", f"p (Holm, {_family(sub, 'prob_p')})",
                       "two-level Δ: seeds, problems (pp) [95% CI]", f"p (Holm, {_family(sub, 'two_p')})"]
        out.append((f"{score}: each algorithm minus {df['baseline'].iloc[0]}", header, rows))
    return out


def robustness_table(r: SuiteReport, baseline: str) -> Table | None:
    m = r.main.set_index(["algo", "noise", "score"])
    auc = r.robustness
    families = sorted(set(auc["family"]))
    rows = []
    for algo in r.suite.algos:
        for score in AVERAGES:
            cells = [algo, score] + [pct_ci(m.loc[(algo, n, score), "mean"], math.nan, math.nan,
                                            n=m.loc[(algo, n, score), "n_seeds"]) for n in r.suite.noises]
            for fam in families:
                a = auc[(auc["algo"] == algo) & (auc["score"] == score) & (auc["family"] == fam)].iloc[0]
                cells.append(pct_ci(a["auc"], a["auc_low"], a["auc_high"], n=a["n_seeds"]))
                if algo == baseline:
                    cells.append(DASH)
                else:
                    cells.append(pct_ci(a["base_diff"], a["base_low"], a["base_high"], signed=True, n=a["n_pairs"]) +
                                 ("*" if a.get("base_p_sig", False) else ""))
            rows.append(cells)
    header = ["algo", "score", *r.suite.noises]
    for f in families:
        header += [f"AUC {f} [95% CI]", f"AUC Δ vs {baseline}, paired (pp) [95% CI]"]
    return ("Noise robustness (%): final mean score per noise setting (n seeds); AUC = normalised area under "
            "score against noise rate, per seed", header, rows)


def stability_table(r: SuiteReport) -> Table:
    s = r.stability[r.stability["score"] == "ALL AVG"]
    rows = []
    for row in s.itertuples():
        collapsed = DASH if math.isnan(row.collapsed) else f"{int(row.collapsed)}/{row.n_initial}"
        rows.append([row.algo, row.noise, str(row.n_seeds), pct(row.last_std), pct(row.max_drop), collapsed])
    header = ["algo", "noise", "seeds", f"std of last {LAST_K} evals (pp)", "largest drop (pp)", "collapsed"]
    return ("Stability of ALL AVG over evaluations", header, rows)


# ---- the one-sentence answers ---------------------------------------------------------------

VERDICT_SCORES = ("ID AVG", "OOD AVG")


def _signed_points(x: float) -> str:
    return f"{100 * x:+.1f}"


def verdict(algo: str, baseline: str, where: str, what: str, diff: float, low: float, high: float, n: str,
            p: float, adjusted: float, m: int, test: str) -> str:
    """'dfpo vs ppo under flip0.2: +3.1 points ID AVG [95% CI -0.4, +6.6] (paired by seed, 10 seeds),
    not significant after Holm (paired t p = 0.081, adjusted 0.650 over 16 comparisons).' (p below
    0.001 prints as 'p < 0.001')."""
    head = f"{algo} vs {baseline} {where}: "
    if _isnan(diff):
        return head + f"no {what} to compare (a side has no finished seed with every benchmark)."
    ci = "" if _isnan(low) else f" [95% CI {_signed_points(low)}, {_signed_points(high)}]"
    text = f"{head}{_signed_points(diff)} points {what}{ci} ({n})"
    if _isnan(p):
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
    if _isnan(margin):
        return ""
    head = f" Against a margin of ±{100 * margin:.1f} points: "
    verdict = row.eq_verdict
    if verdict == "undefined" or _isnan(row.eq_low):
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
            if _isnan(row.eq_seeds) else
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
            out.append(sentence + ("" if _isnan(args[0]) else equivalence_clause(row, seeds)))
    auc = r.robustness
    if "base_p_holm" in auc:
        for row in auc[(auc["algo"] != baseline) & auc["score"].isin(VERDICT_SCORES)].itertuples():
            sentence = verdict(row.algo, baseline, f"over {row.family} rates {row.rates.replace(' ', ', ')}",
                               f"{row.score} robustness AUC", row.base_diff, row.base_low, row.base_high,
                               f"paired by seed, {row.n_pairs} seeds", row.base_p, row.base_p_holm, row.base_p_m,
                               "paired t")
            out.append(sentence + ("" if _isnan(row.base_diff) else equivalence_clause(row, f"{row.n_pairs} seeds")))
    return out


# ---- Markdown -------------------------------------------------------------------------------

def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    aligns = ["---" if i < 2 else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


METHODS = (
    "Final score = each finished run's primary metric (accuracy, or avg@k) averaged over its last eval.final_evals "
    "evaluations after step 0 (the last evaluation alone when that is 1). "
    "ID AVG / OOD AVG = mean over the suite's ID / OOD benchmarks; ALL AVG = mean over all its benchmarks. "
    "The unit of every interval and test is a seed: one trained policy with all its benchmarks, never "
    "resampled apart. A number over several benchmarks uses the seeds that have all of them; the seeds column "
    "counts finished seeds and a number used by fewer says (n=k). Means, gains and AUCs: 95% Student "
    f"t-intervals over seeds, none with 1 seed or when every seed has the same value. IQM (25% trimmed mean of all runs x benchmarks) from "
    f"{IQM_MIN_SEEDS} seeds; its interval and P(improve)'s are percentile intervals of a bootstrap over seeds "
    f"({analysis.REPS} replicates, seeded), given only with at least {BOOTSTRAP_MIN_SEEDS} seeds a side, because "
    "with fewer the percentile bootstrap covers well below 95%. Gain = final minus the step-0 evaluation (the "
    "initial model) of the same seed. A dash is a missing cell or an undefined test."
)
SIG_NOTE = (
    "Δ = algorithm minus baseline in percentage points over independent groups of seeds, with Welch's 95% interval. "
    "Welch = Welch's t-test; MWU = Mann-Whitney U with its exact permutation p (ties by midranks); paired = the "
    "per-seed differences over the seeds both algorithms have (the cells of one seed share the warm start, the "
    "data order and the noise draws), with a t-interval and the paired t-test. P(improve) = P(algorithm > "
    "baseline) over seed pairs, mean over benchmarks. A test is a dash, and has no mark, when it is undefined "
    "(fewer than 2 seeds a side, or no variance). Holm: each p column is adjusted over its own family, the "
    "comparisons of its table (every algorithm x noise setting against the baseline for this score) where that "
    "test is defined; m is the family's size. * = Holm-adjusted p < 0.05 in that column. The one-sentence "
    "answers use the paired comparison where there are at least 2 common seeds, else Welch."
)
PROBLEM_NOTE = (
    f"Over problems (from per-problem results): the paired bootstrap averages each side over its seeds and "
    f"resamples problems within each benchmark, so it is about these checkpoints on this problem set, not about "
    f"training again; the two-level bootstrap resamples each side's seeds, then the problems, and is about both. "
    f"p = 2 min(P*(Δ <= 0), P*(Δ >= 0)) from {analysis.REPS} replicates; '< {1 / analysis.REPS:g}' = no "
    f"replicate reached 0 (below 1/B)."
)
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


def _why_unfinished(cell) -> str:
    if cell.state == CORRUPT:
        return f"corrupt, skipped: {cell.reason}"
    return cell.state if cell.state != "done" else (cell.issue or "no eval")


def _unfinished_line(r: SuiteReport) -> str | None:
    """The cells left out of the statistics, or scored only in part, each with why."""
    if r.unfinished.empty:
        return None
    names = ", ".join(f"{c.algo}/{c.noise}/seed{c.seed} ({_why_unfinished(c)})" for c in r.unfinished.itertuples())
    noun = "cell" if len(r.unfinished) == 1 else "cells"
    return f"{len(r.unfinished)} {noun} not finished or not fully scored (unscored benchmarks excluded): {names}"


def answers(reports: list[SuiteReport], baseline: str) -> list[tuple[str, list[str]]]:
    """(suite, sentences) per suite that has the baseline."""
    return [(r.suite.name, validity.gated(r.validity, verdicts(r, baseline))) for r in reports if not r.significance.empty]


def render_markdown(reports: list[SuiteReport], baseline: str, figures: dict, fig_ext: str | None) -> str:
    lines = ["# Report", "", "## Answers", "", ANSWERS_NOTE, ""]
    for suite, sentences in answers(reports, baseline):
        lines += [f"**{suite}**", ""] + [f"- {s}" for s in sentences] + [""]
    lines += ["## Methods", "", METHODS, ""]
    for r in reports:
        lines += [f"## {r.suite.name}", ""]
        note = _unfinished_line(r)
        if note:
            lines += [note, ""]
        caption, header, rows = validity.table(r.validity)
        lines += [f"### {caption}", "", validity.NOTE, ""] + md_table(header, rows) + [""]
        for caption, header, rows in main_tables(r):
            lines += [f"### {caption}", ""] + md_table(header, rows) + [""]
        sig = significance_tables(r)
        lines += [f"### Significance against {baseline}", ""]
        if not sig:
            lines += [f"Baseline {baseline!r} has no runs in this suite.", ""]
        else:
            lines += [SIG_NOTE, ""]
            if (r.significance["n_problems"] > 0).any():
                lines += [PROBLEM_NOTE, ""]
            for caption, header, rows in sig:
                lines += [f"#### {caption}", ""] + md_table(header, rows) + [""]
        rob = robustness_table(r, baseline)
        lines += [f"### {rob[0]}", ""] + md_table(rob[1], rob[2]) + [""]
        stem = figures.get((r.suite.name, "robustness"))
        if stem and fig_ext:
            lines += [f"![robustness {r.suite.name}](figures/{stem}.{fig_ext})", ""]
        caption, header, rows = stability_table(r)
        lines += [f"### {caption}", "", "Per seed, then mean over seeds; collapsed = seeds whose final ALL AVG "
                  "is below their step-0 evaluation.", ""] + md_table(header, rows) + [""]
        if fig_ext:
            for noise in r.suite.noises:
                stem = figures.get((r.suite.name, "stability", noise))
                if stem:
                    lines += [f"![stability {r.suite.name} {noise}](figures/{stem}.{fig_ext})", ""]
    return "\n".join(lines)


# ---- LaTeX ----------------------------------------------------------------------------------

_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", DASH: "--", "†": r"$^\dagger$",
        "‡": r"$^\ddagger$", "Δ": r"$\Delta$", "*": r"$^*$", "<": r"$<$", ">": r"$>$", "±": r"$\pm$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def tex_table(caption: str, header: list[str], rows: list[list[str]]) -> list[str]:
    spec = "ll" + "r" * (len(header) - 2)
    body = [r"\begin{tabular}{" + spec + "}", r"\toprule", " & ".join(tex_escape(h) for h in header) + r" \\",
            r"\midrule"] + [" & ".join(tex_escape(c) for c in row) + r" \\" for row in rows] + [r"\bottomrule",
                                                                                               r"\end{tabular}"]
    if len(header) > 5:
        body = [r"\resizebox{\linewidth}{!}{%"] + body + ["}"]
    return [r"\begin{table}[htbp]", r"\centering", r"\caption{" + tex_escape(caption) + "}"] + body + [r"\end{table}", ""]


def render_latex(reports: list[SuiteReport], baseline: str, figures: dict, fig_ext: str | None) -> str:
    lines = [r"\documentclass{article}", r"\usepackage[margin=2cm]{geometry}", r"\usepackage{booktabs}",
             r"\usepackage{graphicx}", r"\begin{document}", r"\section*{Answers}", tex_escape(ANSWERS_NOTE), ""]
    for suite, sentences in answers(reports, baseline):
        lines += [r"\paragraph{" + tex_escape(suite) + "}", r"\begin{itemize}"]
        lines += [r"\item " + tex_escape(s) for s in sentences] + [r"\end{itemize}", ""]
    lines += [r"\section*{Methods}", tex_escape(METHODS), ""]
    for r in reports:
        lines += [r"\section{" + tex_escape(r.suite.name) + "}", ""]
        note = _unfinished_line(r)
        if note:
            lines += [tex_escape(note), ""]
        lines += [tex_escape(validity.NOTE), ""] + tex_table(*validity.table(r.validity))
        for table in main_tables(r):
            lines += tex_table(*table)
        sig = significance_tables(r)
        if sig:
            lines += [tex_escape(SIG_NOTE), ""]
            if (r.significance["n_problems"] > 0).any():
                lines += [tex_escape(PROBLEM_NOTE), ""]
            for table in sig:
                lines += tex_table(*table)
        else:
            lines += [tex_escape(f"Baseline {baseline!r} has no runs in this suite."), ""]
        lines += tex_table(*robustness_table(r, baseline))
        lines += tex_table(*stability_table(r))
        stems = [figures.get((r.suite.name, "robustness"))] + [figures.get((r.suite.name, "stability", n)) for n in r.suite.noises]
        for stem in stems:
            if stem and fig_ext:
                lines += [r"\begin{figure}[htbp]", r"\centering",
                          r"\includegraphics[width=\linewidth]{figures/" + stem + "." + fig_ext + "}",
                          r"\caption{" + tex_escape(stem.replace("_", " ")) + "}", r"\end{figure}", ""]
        lines += [r"\clearpage", ""]
    lines += [r"\end{document}", ""]
    return "\n".join(lines)


# ---- CSV ------------------------------------------------------------------------------------

def write_csv(reports: list[SuiteReport], store: RunStore, folder: Path) -> None:
    folder.mkdir()
    store.cells.drop(columns="path").to_csv(folder / "cells.csv", index=False)
    store.final_scores().to_csv(folder / "final_per_seed.csv", index=False)

    def cat(attr: str, with_suite: bool = False) -> pd.DataFrame:
        frames = [getattr(r, attr).assign(suite=r.suite.name) if with_suite else getattr(r, attr) for r in reports]
        frames = [f for f in frames if not f.empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    cat("main").to_csv(folder / "main.csv", index=False)
    cat("significance").to_csv(folder / "significance.csv", index=False)
    cat("robustness_curve").to_csv(folder / "robustness_curve.csv", index=False)
    cat("robustness").to_csv(folder / "robustness_auc.csv", index=False)
    cat("stability").to_csv(folder / "stability.csv", index=False)
    cat("validity").to_csv(folder / "validity.csv", index=False)
    cat("stability_curves", with_suite=True).to_csv(folder / "curves.csv", index=False)
    cat("curves", with_suite=True).to_csv(folder / "eval_curves_per_seed.csv", index=False)


# ---- the folder -----------------------------------------------------------------------------

def parse_formats(text: str | None) -> list[str]:
    if text is None or text.strip() in ("", "all"):
        return list(FORMATS)
    items = [t.strip() for t in text.split(",")]
    bad = [t for t in items if t not in FORMATS]
    if bad or not items:
        raise HarnessError(f"unknown report format(s) {', '.join(map(repr, bad))} (valid: {', '.join(FORMATS)}, or all)")
    return [f for f in FORMATS if f in items]


def _check_out(runs_dir: Path, out: Path) -> None:
    r, o = runs_dir.resolve(), out.resolve()
    if r == o or r.is_relative_to(o):
        raise HarnessError(f"--out {str(out)!r} would replace the run store {str(runs_dir)!r}; choose a folder outside it, e.g. {str(runs_dir / 'report')!r}")
    if out.exists() and not (out / MARKER).exists():
        raise HarnessError(f"--out {str(out)!r} exists and is not a report folder (no {MARKER}); choose a new or report folder")


def write_report(runs_dir: Path, out: Path | None = None, baseline: str | None = None,
                 formats: str | list[str] | None = None, seed: int = 0, skipped: list[str] | None = None,
                 margin: float | None = None) -> Path:
    """Analyse the run store and write the report folder (default ``<runs>/report``); returns it.

    Everything is written into a temporary sibling folder first, which then replaces ``out``:
    a failure leaves the previous report as it was. ``baseline`` defaults to ``ppo``; an explicit
    baseline that no suite has is an error. Cells whose files are corrupt are skipped and listed
    (with the reason) in the report and in cells.csv; `skipped`, when given, receives one
    "<cell>: <reason>" line per such cell. ``margin``: the equivalence margin of the answers as a fraction
    (default ``analysis.DEFAULT_MARGIN``); it must be a positive number below 1."""
    runs_dir = Path(runs_dir)
    margin = analysis.DEFAULT_MARGIN if margin is None else margin
    if not (isinstance(margin, (int, float)) and 0 < margin < 1):
        raise HarnessError(f"the equivalence margin must be a number of points between 0 and 100 (exclusive), "
                           f"got {100 * margin if isinstance(margin, (int, float)) else margin!r}")
    out = Path(out) if out is not None else runs_dir / "report"
    formats = parse_formats(formats) if not isinstance(formats, list) else formats
    store = RunStore(runs_dir)
    if skipped is not None:
        skipped.extend(f"{c.suite}/{c.algo}/{c.noise}/seed{c.seed}: {c.reason}" for c in store.corrupt().itertuples())
    if baseline is not None and baseline not in set(store.cells["algo"]):
        raise HarnessError(f"baseline {baseline!r} has no runs (algorithms found: {', '.join(sorted(set(store.cells['algo'])))})")
    baseline = baseline or "ppo"
    _check_out(runs_dir, out)
    reports = analysis.analyse(store, baseline, seed, margin)

    out.parent.mkdir(parents=True, exist_ok=True)
    _recover_interrupted_replace(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}@{_host()}-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a report folder is an ordinary one
    try:
        exts = [e for e in ("png", "pdf") if e in formats]
        figures: dict = {}
        if exts:
            (tmp / "figures").mkdir()
            for r in reports:
                stem = plots.robustness_figure(r, tmp / "figures", exts)
                if stem:
                    figures[(r.suite.name, "robustness")] = stem
                for noise, stem in plots.stability_figures(r, tmp / "figures", exts).items():
                    figures[(r.suite.name, "stability", noise)] = stem
        if "md" in formats:
            fig_ext = "png" if "png" in formats else ("pdf" if "pdf" in formats else None)
            (tmp / "report.md").write_text(render_markdown(reports, baseline, figures, fig_ext), encoding="utf-8")
        if "tex" in formats:
            fig_ext = "pdf" if "pdf" in formats else ("png" if "png" in formats else None)
            (tmp / "report.tex").write_text(render_latex(reports, baseline, figures, fig_ext), encoding="utf-8")
        if "csv" in formats:
            write_csv(reports, store, tmp / "csv")
        (tmp / MARKER).write_text("written by `harness report`; this folder is replaced whole on the next run\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _recover_interrupted_replace(out: Path) -> None:
    """Clean up after a report run that died mid-way: its temporary folders (`.<name>.tmp-*`, and
    `.<name>.old-*` once a new report is in place) are removed; a previous report left aside
    between the two renames of `_replace_dir` goes back to `out`."""
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if not (old / MARKER).is_file():
            continue
        if not out.exists():
            os.replace(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):  # a dead writer's, or older than any report still being written
        if tmp.is_dir() and (_writer_gone(tmp.name) or time.time() - tmp.stat().st_mtime > STALE_TMP_S):
            shutil.rmtree(tmp, ignore_errors=True)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64]


def _writer_gone(name: str) -> bool:
    """A temporary report folder `.<out>.tmp-<pid>@<host>-*` whose writer, on this host, is no longer running."""
    match = re.search(r"\.tmp-(\d+)@([A-Za-z0-9._]+)-", name)
    if match is None or match.group(2) != _host():
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def _replace_dir(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an existing ``out`` is moved aside first and removed after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.rmdir(old)
        os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
