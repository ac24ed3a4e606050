"""The report folder: Markdown, LaTeX, CSV and figures, written into a temporary folder that
replaces ``<out>`` only when complete.

    <out>/report.md        tables inline, figures linked             (--format md)
    <out>/report.tex       booktabs tables, figures included         (--format tex)
    <out>/figures/*.png    robustness and stability figures          (--format png)
    <out>/figures/*.pdf    the same as PDF (report.tex includes them) (--format pdf)
    <out>/csv/*.csv        every number of the report                (--format csv)

Scores print in percent; a dash marks a missing cell (no finished seed, or a benchmark missing).
What a suite's report holds is the list of sections `reports.sections.SECTIONS`; the documents are
written from it by `reports.render`.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pandas as pd

from harness.errors import HarnessError
from reports import analysis, sections
from reports.analysis import SuiteReport
from reports.answers import answers
from reports.load import RunStore
from reports.render import render_latex, render_markdown
from reports.sections import METHODS, analyse, draw_figures, suite_blocks

FORMATS = ("md", "tex", "csv", "png", "pdf")
MARKER = ".harness-report"
STALE_TMP_S = 3600  # a temporary report folder this old belongs to a report run that died


# ---- CSV ------------------------------------------------------------------------------------

def write_csv(reports: list[SuiteReport], store: RunStore, folder: Path) -> None:
    folder.mkdir()
    store.cells.drop(columns="path").to_csv(folder / "cells.csv", index=False)
    store.final_scores().to_csv(folder / "final_per_seed.csv", index=False)

    def cat(attr: str, with_suite: bool = False) -> pd.DataFrame:
        frames = [getattr(r, attr).assign(suite=r.suite.name) if with_suite else getattr(r, attr) for r in reports]
        frames = [f for f in frames if not f.empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    for section in sections.SECTIONS:
        for name, frame, with_suite in section.csv:
            cat(frame, with_suite).to_csv(folder / name, index=False)


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
    reports = analyse(store, baseline, seed, margin)

    out.parent.mkdir(parents=True, exist_ok=True)
    _recover_interrupted_replace(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}@{_host()}-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a report folder is an ordinary one
    try:
        exts = [e for e in ("png", "pdf") if e in formats]
        figures: dict[str, dict] = {}
        if exts:
            (tmp / "figures").mkdir()
            figures = {r.suite.name: draw_figures(r, tmp / "figures", exts) for r in reports}
        suites = [(r.suite.name, suite_blocks(r, baseline, figures.get(r.suite.name, {}))) for r in reports]
        if "md" in formats:
            fig_ext = "png" if "png" in formats else ("pdf" if "pdf" in formats else None)
            text = render_markdown(answers(reports, baseline), METHODS, suites, fig_ext)
            (tmp / "report.md").write_text(text, encoding="utf-8")
        if "tex" in formats:
            fig_ext = "pdf" if "pdf" in formats else ("png" if "png" in formats else None)
            text = render_latex(answers(reports, baseline), METHODS, suites, fig_ext)
            (tmp / "report.tex").write_text(text, encoding="utf-8")
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
