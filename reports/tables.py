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
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from harness.errors import HarnessError
from reports import analysis, plots
from reports.analysis import AVERAGES, LAST_K, SuiteReport
from reports.load import CORRUPT, RunStore
from reports.stats import CI_MIN_SEEDS, IQM_MIN_SEEDS

FORMATS = ("md", "tex", "csv", "png", "pdf")
MARKER = ".harness-report"
STALE_TMP_S = 3600  # a temporary report folder this old belongs to a report run that died
DASH = "–"
MARKS = (("significant", "*"), ("significant_mwu", "†"), ("significant_paired", "‡"))


# ---- cell formatting (neutral text; LaTeX translates it) -------------------------------------

def pct(x: float, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return DASH
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def pct_ci(mean: float, low: float, high: float, signed: bool = False) -> str:
    """'45.3 [40.1, 50.2]' in percent; the bare mean when there is no interval; a dash if no mean."""
    if math.isnan(mean):
        return DASH
    if math.isnan(low):
        return pct(mean, signed)
    return f"{pct(mean, signed)} [{pct(low, signed)}, {pct(high, signed)}]"


def pval(p: float, adjusted: float) -> str:
    if math.isnan(p):
        return DASH
    return f"{p:.3f} ({adjusted:.3f})"


def prob_ci(p: float, low: float, high: float) -> str:
    if math.isnan(p):
        return DASH
    return f"{p:.2f}" if math.isnan(low) else f"{p:.2f} [{low:.2f}, {high:.2f}]"


# ---- tables as (caption, header, rows) ------------------------------------------------------

Table = tuple[str, list[str], list[list[str]]]


def main_tables(r: SuiteReport) -> list[Table]:
    m = r.main.set_index(["algo", "noise", "score"])
    benches = r.suite.benchmarks["ID"] + r.suite.benchmarks["OOD"]
    avg_rows, bench_rows = [], []
    for algo in r.suite.algos:
        for noise in r.suite.noises:
            n = int(m.loc[(algo, noise, "ALL AVG"), "n_finished"])
            cells = [pct_ci(*m.loc[(algo, noise, s), ["mean", "ci_low", "ci_high"]]) for s in AVERAGES]
            iqm = m.loc[(algo, noise, "ALL AVG"), ["iqm", "iqm_low", "iqm_high"]]
            avg_rows.append([algo, noise, str(n), *cells, pct_ci(*iqm)])
            bench_rows.append([algo, noise] + [pct_ci(*m.loc[(algo, noise, b), ["mean", "ci_low", "ci_high"]])
                                               for b in benches])
    bench_header = [f"{b} ({r.suite.role(b)})" for b in benches]
    return [
        ("Final scores (%): mean [95% CI] over seeds", ["algo", "noise", "seeds", *AVERAGES, "IQM (ALL AVG)"], avg_rows),
        ("Final scores per benchmark (%): mean [95% CI]", ["algo", "noise", *bench_header], bench_rows),
    ]


def significance_tables(r: SuiteReport) -> list[Table]:
    df = r.significance
    if df.empty:
        return []
    paired = (df["paired_problems"] > 0).any()
    out = []
    for score in AVERAGES:
        rows = []
        for row in df[df["score"] == score].itertuples():
            marks = "".join(sym for col, sym in MARKS if getattr(row, col))
            cells = [row.noise, row.algo, f"{row.n_algo}/{row.n_base}",
                     pct_ci(row.diff, row.diff_low, row.diff_high, signed=True) + marks,
                     pval(row.welch_p, row.welch_p_holm), pval(row.mwu_p, row.mwu_p_holm),
                     prob_ci(row.poi, row.poi_low, row.poi_high)]
            if paired:
                cells += [pct_ci(row.paired_diff, row.paired_low, row.paired_high, signed=True),
                          pval(row.paired_p, row.paired_p_holm)]
            rows.append(cells)
        header = ["noise", "algo", "seeds", "Δ mean (pp) [95% CI]", "Welch p (Holm)", "MWU p (Holm)", "P(improve) [95% CI]"]
        if paired:
            header += ["paired Δ (pp) [95% CI]", "paired p (Holm)"]
        out.append((f"{score}: each algorithm minus {df['baseline'].iloc[0]}", header, rows))
    return out


def robustness_table(r: SuiteReport) -> Table | None:
    m = r.main.set_index(["algo", "noise", "score"])
    auc = r.robustness
    families = sorted(set(auc["family"]))
    rows = []
    for algo in r.suite.algos:
        for score in AVERAGES:
            cells = [algo, score] + [pct(m.loc[(algo, n, score), "mean"]) for n in r.suite.noises]
            for fam in families:
                a = auc[(auc["algo"] == algo) & (auc["score"] == score) & (auc["family"] == fam)].iloc[0]
                cells.append(pct_ci(a["auc"], a["auc_low"], a["auc_high"]))
            rows.append(cells)
    header = ["algo", "score", *r.suite.noises] + [f"AUC {f} [95% CI]" for f in families]
    return ("Noise robustness (%): final mean score per noise setting; AUC = normalised area under "
            "score against noise rate", header, rows)


def stability_table(r: SuiteReport) -> Table:
    s = r.stability[r.stability["score"] == "ALL AVG"]
    rows = []
    for row in s.itertuples():
        collapsed = DASH if math.isnan(row.collapsed) else f"{int(row.collapsed)}/{row.n_initial}"
        rows.append([row.algo, row.noise, str(row.n_seeds), pct(row.last_std), pct(row.max_drop), collapsed])
    header = ["algo", "noise", "seeds", f"std of last {LAST_K} evals (pp)", "largest drop (pp)", "collapsed"]
    return ("Stability of ALL AVG over evaluations", header, rows)


# ---- Markdown -------------------------------------------------------------------------------

def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    aligns = ["---" if i < 2 else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


METHODS = (
    f"Final score = each finished run's primary metric (accuracy, or avg@k) at its last evaluation. "
    f"ID AVG / OOD AVG = mean over the suite's ID / OOD benchmarks; ALL AVG = mean over all its benchmarks. "
    f"Intervals: 95% percentile intervals of a stratified bootstrap over seeds (strata = benchmarks, "
    f"{analysis.REPS} replicates, seeded); none with fewer than {CI_MIN_SEEDS} seeds. IQM (25% trimmed mean of all "
    f"runs x benchmarks) only with at least {IQM_MIN_SEEDS} seeds. A dash is a missing cell."
)
SIG_NOTE = ("Δ = algorithm minus baseline in percentage points. Welch = Welch's t-test, MWU = Mann-Whitney U "
            "(two-sided, over per-seed scores); in brackets Holm-Bonferroni adjusted over the comparisons of the "
            "table. * Welch, † MWU, ‡ paired bootstrap over problems: adjusted p < 0.05. P(improve) = "
            "P(algorithm > baseline) over seed pairs, mean over benchmarks.")


def _why_unfinished(cell) -> str:
    if cell.state == CORRUPT:
        return f"corrupt, skipped: {cell.reason}"
    return cell.state if cell.state != "done" else "no eval"


def _unfinished_line(r: SuiteReport) -> str | None:
    if r.unfinished.empty:
        return None
    names = ", ".join(f"{c.algo}/{c.noise}/seed{c.seed} ({_why_unfinished(c)})" for c in r.unfinished.itertuples())
    noun = "cell" if len(r.unfinished) == 1 else "cells"
    return f"{len(r.unfinished)} {noun} not finished (excluded): {names}"


def render_markdown(reports: list[SuiteReport], baseline: str, figures: dict, fig_ext: str | None) -> str:
    lines = ["# Report", "", METHODS, ""]
    for r in reports:
        lines += [f"## {r.suite.name}", ""]
        note = _unfinished_line(r)
        if note:
            lines += [note, ""]
        for caption, header, rows in main_tables(r):
            lines += [f"### {caption}", ""] + md_table(header, rows) + [""]
        sig = significance_tables(r)
        lines += [f"### Significance against {baseline}", ""]
        if not sig:
            lines += [f"Baseline {baseline!r} has no runs in this suite.", ""]
        else:
            lines += [SIG_NOTE, ""]
            for caption, header, rows in sig:
                lines += [f"#### {caption}", ""] + md_table(header, rows) + [""]
        rob = robustness_table(r)
        lines += [f"### {rob[0]}", ""] + md_table(rob[1], rob[2]) + [""]
        stem = figures.get((r.suite.name, "robustness"))
        if stem and fig_ext:
            lines += [f"![robustness {r.suite.name}](figures/{stem}.{fig_ext})", ""]
        caption, header, rows = stability_table(r)
        lines += [f"### {caption}", "", f"Per seed, then mean over seeds; collapsed = seeds whose final ALL AVG "
                  f"is below their step-0 evaluation.", ""] + md_table(header, rows) + [""]
        if fig_ext:
            for noise in r.suite.noises:
                stem = figures.get((r.suite.name, "stability", noise))
                if stem:
                    lines += [f"![stability {r.suite.name} {noise}](figures/{stem}.{fig_ext})", ""]
    return "\n".join(lines)


# ---- LaTeX ----------------------------------------------------------------------------------

_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", DASH: "--", "†": r"$^\dagger$",
        "‡": r"$^\ddagger$", "Δ": r"$\Delta$", "*": r"$^*$"}


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
             r"\usepackage{graphicx}", r"\begin{document}", r"\section*{Report}", tex_escape(METHODS), ""]
    for r in reports:
        lines += [r"\section{" + tex_escape(r.suite.name) + "}", ""]
        note = _unfinished_line(r)
        if note:
            lines += [tex_escape(note), ""]
        for table in main_tables(r):
            lines += tex_table(*table)
        sig = significance_tables(r)
        if sig:
            lines += [tex_escape(SIG_NOTE), ""]
            for table in sig:
                lines += tex_table(*table)
        else:
            lines += [tex_escape(f"Baseline {baseline!r} has no runs in this suite."), ""]
        lines += tex_table(*robustness_table(r))
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
                 formats: str | list[str] | None = None, seed: int = 0, skipped: list[str] | None = None) -> Path:
    """Analyse the run store and write the report folder (default ``<runs>/report``); returns it.

    Everything is written into a temporary sibling folder first, which then replaces ``out``:
    a failure leaves the previous report as it was. ``baseline`` defaults to ``ppo``; an explicit
    baseline that no suite has is an error. Cells whose files are corrupt are skipped and listed
    (with the reason) in the report and in cells.csv; `skipped`, when given, receives one
    "<cell>: <reason>" line per such cell."""
    runs_dir = Path(runs_dir)
    out = Path(out) if out is not None else runs_dir / "report"
    formats = parse_formats(formats) if not isinstance(formats, list) else formats
    store = RunStore(runs_dir)
    if skipped is not None:
        skipped.extend(f"{c.suite}/{c.algo}/{c.noise}/seed{c.seed}: {c.reason}" for c in store.corrupt().itertuples())
    if baseline is not None and baseline not in set(store.cells["algo"]):
        raise HarnessError(f"baseline {baseline!r} has no runs (algorithms found: {', '.join(sorted(set(store.cells['algo'])))})")
    baseline = baseline or "ppo"
    _check_out(runs_dir, out)
    reports = analysis.analyse(store, baseline, seed)

    out.parent.mkdir(parents=True, exist_ok=True)
    _recover_interrupted_replace(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
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
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):  # older than any report still being written
        if tmp.is_dir() and time.time() - tmp.stat().st_mtime > STALE_TMP_S:
            shutil.rmtree(tmp, ignore_errors=True)


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
