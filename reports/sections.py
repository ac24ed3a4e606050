"""A suite's report as one list of sections, `SECTIONS`: each section computes its frames from the
run store (with `reports.analysis` and `reports.validity`), says what it shows as format-neutral
blocks (`reports.render`), names its CSV files and draws its figures. `analyse` runs the sections'
analyses; the Markdown and LaTeX writers and the CSV folder walk the same list, so a new table is
one function and one `Section` entry here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from reports import analysis, plots, validity
from reports.analysis import AVERAGES, LAST_K, Suite, SuiteReport
from reports.format import DASH, pct, pct_ci, prob_ci, pval
from reports.load import CORRUPT, RunStore
from reports.render import Block, Figure, Heading, Table, Text
from reports.stats import BOOTSTRAP_MIN_SEEDS, IQM_MIN_SEEDS

# (caption, header, rows) of a table before it becomes a `Table` block
Rows = tuple[str, list[str], list[list[str]]]


# ---- what the sections show -----------------------------------------------------------------

def main_tables(r: SuiteReport) -> list[Rows]:
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


def significance_tables(r: SuiteReport) -> list[Rows]:
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


def robustness_table(r: SuiteReport, baseline: str) -> Rows:
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


def stability_table(r: SuiteReport) -> Rows:
    s = r.stability[r.stability["score"] == "ALL AVG"]
    rows = []
    for row in s.itertuples():
        collapsed = DASH if math.isnan(row.collapsed) else f"{int(row.collapsed)}/{row.n_initial}"
        rows.append([row.algo, row.noise, str(row.n_seeds), pct(row.last_std), pct(row.max_drop), collapsed])
    header = ["algo", "noise", "seeds", f"std of last {LAST_K} evals (pp)", "largest drop (pp)", "collapsed"]
    return ("Stability of ALL AVG over evaluations", header, rows)



# ---- notes and the methods paragraph ---------------------------------------------------------

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


# ---- the sections -----------------------------------------------------------------------------

@dataclass
class Context:
    """What a section's analysis reads: the store, the suite, the comparison's settings, and the
    frames of the sections before it (`frames`, by name)."""

    store: RunStore
    suite: Suite
    baseline: str
    seed: int
    margin: float
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)


@dataclass(frozen=True)
class Section:
    """One part of each suite's report.

    analyse(ctx) -> {name: frame}: the frames it adds to the `SuiteReport` (readable as
    `report.<name>`); blocks(report, baseline) -> what it shows, in every document format;
    csv: (file name, frame name, with a suite column) per CSV file it writes; figures(report, folder,
    exts) -> [(file stem, alternative text)]: the figures it draws, shown after its blocks."""

    name: str
    analyse: Callable[[Context], dict[str, pd.DataFrame]]
    blocks: Callable[[SuiteReport, str], list[Block]]
    csv: tuple[tuple[str, str, bool], ...] = ()
    figures: Callable[[SuiteReport, Path, list[str]], list[tuple[str, str]]] | None = None


def _unfinished(ctx: Context) -> dict[str, pd.DataFrame]:
    cells = ctx.store.cells[ctx.store.cells["suite"] == ctx.suite.name]
    return {"unfinished": cells[~(cells["state"].eq("done") & cells["step"].notna()) | cells["issue"].ne("")]}


def _unfinished_blocks(r: SuiteReport, baseline: str) -> list[Block]:
    note = _unfinished_line(r)
    return [Text(note)] if note else []


def _validity_blocks(r: SuiteReport, baseline: str) -> list[Block]:
    return [Table(*validity.table(r.validity), note=validity.NOTE)]


def _main(ctx: Context) -> dict[str, pd.DataFrame]:
    return {"main": analysis.main_table(ctx.store, ctx.suite, ctx.seed)}


def _significance(ctx: Context) -> dict[str, pd.DataFrame]:
    return {"significance": analysis.significance_table(ctx.store, ctx.suite, ctx.baseline, ctx.seed, ctx.margin)}


def _significance_blocks(r: SuiteReport, baseline: str) -> list[Block]:
    out: list[Block] = [Heading(f"Significance against {baseline}")]
    tables = significance_tables(r)
    if not tables:
        return out + [Text(f"Baseline {baseline!r} has no runs in this suite.")]
    out.append(Text(SIG_NOTE))
    if (r.significance["n_problems"] > 0).any():
        out.append(Text(PROBLEM_NOTE))
    return out + [Table(*t, level=4) for t in tables]


def _robustness(ctx: Context) -> dict[str, pd.DataFrame]:
    curve, auc = analysis.robustness_table(ctx.store, ctx.suite, ctx.frames["main"], ctx.baseline, ctx.seed, ctx.margin)
    return {"robustness_curve": curve, "robustness": auc}


def _robustness_figures(r: SuiteReport, folder: Path, exts: list[str]) -> list[tuple[str, str]]:
    stem = plots.robustness_figure(r, folder, exts)
    return [(stem, f"robustness {r.suite.name}")] if stem else []


def _stability(ctx: Context) -> dict[str, pd.DataFrame]:
    curves = analysis.eval_curves(ctx.store, ctx.suite)
    return {"curves": curves, "stability_curves": analysis.stability_curves(ctx.store, ctx.suite, curves),
            "stability": analysis.stability_table(ctx.suite, curves)}


STABILITY_NOTE = "Per seed, then mean over seeds; collapsed = seeds whose final ALL AVG is below their step-0 evaluation."


def _stability_blocks(r: SuiteReport, baseline: str) -> list[Block]:
    return [Table(*stability_table(r), note=STABILITY_NOTE, note_formats=("md",))]


def _stability_figures(r: SuiteReport, folder: Path, exts: list[str]) -> list[tuple[str, str]]:
    stems = plots.stability_figures(r, folder, exts)
    return [(stems[n], f"stability {r.suite.name} {n}") for n in r.suite.noises if n in stems]


SECTIONS: list[Section] = [
    Section("unfinished", _unfinished, _unfinished_blocks),
    Section("validity", lambda ctx: {"validity": validity.gates(ctx.store, ctx.suite, ctx.baseline)}, _validity_blocks,
            csv=(("validity.csv", "validity", False),)),
    Section("main", _main, lambda r, baseline: [Table(*t) for t in main_tables(r)], csv=(("main.csv", "main", False),)),
    Section("significance", _significance, _significance_blocks, csv=(("significance.csv", "significance", False),)),
    Section("robustness", _robustness, lambda r, baseline: [Table(*robustness_table(r, baseline))],
            csv=(("robustness_curve.csv", "robustness_curve", False), ("robustness_auc.csv", "robustness", False)),
            figures=_robustness_figures),
    Section("stability", _stability, _stability_blocks,
            csv=(("stability.csv", "stability", False), ("curves.csv", "stability_curves", True),
                 ("eval_curves_per_seed.csv", "curves", True)),
            figures=_stability_figures),
]


def analyse(store: RunStore, baseline: str = "ppo", seed: int = 0,
            margin: float = analysis.DEFAULT_MARGIN) -> list[SuiteReport]:
    """One `SuiteReport` per suite of the store, with the frames of every section."""
    out = []
    for suite in analysis.suites(store, baseline):
        ctx = Context(store, suite, baseline, seed, margin)
        for section in SECTIONS:
            ctx.frames.update(section.analyse(ctx))
        out.append(SuiteReport(suite, ctx.frames))
    return out


def draw_figures(r: SuiteReport, folder: Path, exts: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Each section's figures of one suite, drawn into `folder`: {section name: [(stem, alt)]}."""
    return {s.name: s.figures(r, folder, exts) for s in SECTIONS if s.figures is not None}


def suite_blocks(r: SuiteReport, baseline: str, figures: dict[str, list[tuple[str, str]]]) -> list[Block]:
    """Every section's blocks of one suite, each followed by its figures (`draw_figures`)."""
    out: list[Block] = []
    for section in SECTIONS:
        out += section.blocks(r, baseline)
        out += [Figure(stem, alt) for stem, alt in figures.get(section.name, [])]
    return out
