"""Final-score tables from a run store.

Run store layout (written by the trainer)::

    <runs>/<suite>/<algo>/<noise>/seed<k>/{status.json, config.json, metrics.jsonl, eval.jsonl}

A *cell* is one ``seed<k>`` directory at that depth holding ``status.json`` or ``eval.jsonl``.
Its final score is read at its LAST evaluation step (the largest ``step`` in ``eval.jsonl``):
``id_acc`` / ``ood_acc`` = mean over the ID / OOD benchmarks of the rows with
``metric == "accuracy"`` at that step. Each benchmark counts once: several accuracy rows of one
benchmark at that step (e.g. two decoding settings) are averaged first. Values are fractions in
[0, 1]; the Markdown report prints them in percent.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

from harness.errors import HarnessError
from harness.store import atomic_write_text

LAYOUT = "<runs>/<suite>/<algo>/<noise>/seed<k>/eval.jsonl"
COLUMNS = ["suite", "algo", "noise", "seed", "state", "step", "id_acc", "ood_acc"]
EVAL_KEYS = ("step", "benchmark", "role", "metric", "value")
_SEED_DIR = re.compile(r"seed(\d+)")


def read_jsonl(path: Path) -> list[dict]:
    """Objects of a JSONL file; blank lines skipped; HarnessError names file and line if malformed."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise HarnessError(f"malformed JSON in {str(path)!r} line {lineno}: {e.msg}") from None
            if not isinstance(row, dict):
                raise HarnessError(f"malformed JSON in {str(path)!r} line {lineno}: expected an object")
            rows.append(row)
    return rows


def _read_state(cell: Path) -> str:
    path = cell / "status.json"
    if not path.exists():
        return "unknown"
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HarnessError(f"malformed JSON in {str(path)!r} line {e.lineno}: {e.msg}") from None
    if not isinstance(status, dict):
        raise HarnessError(f"malformed JSON in {str(path)!r}: expected an object")
    return str(status.get("state", "unknown"))


def _final_scores(path: Path) -> tuple[int | None, float, float]:
    """(last eval step, id_acc, ood_acc) of one eval.jsonl; (None, nan, nan) if it has no rows."""
    rows = read_jsonl(path) if path.exists() else []
    for lineno, row in enumerate(rows, start=1):
        missing = [k for k in EVAL_KEYS if k not in row]
        if missing:
            raise HarnessError(f"eval row {lineno} of {str(path)!r} lacks key(s) {', '.join(missing)} (needs {', '.join(EVAL_KEYS)})")
    if not rows:
        return None, math.nan, math.nan
    df = pd.DataFrame(rows)
    last = int(df["step"].max())
    acc = df[(df["step"] == last) & (df["metric"] == "accuracy")]
    per_benchmark = acc.groupby(["role", "benchmark"])["value"].mean()

    def role_mean(role: str) -> float:
        values = per_benchmark[per_benchmark.index.get_level_values("role") == role]
        return float(values.mean()) if len(values) else math.nan

    return last, role_mean("ID"), role_mean("OOD")


def collect_final_scores(runs_dir: Path) -> pd.DataFrame:
    """One row per cell: suite, algo, noise, seed, state, step, id_acc, ood_acc (see module doc)."""
    runs_dir = Path(runs_dir)
    records = []
    for cell in sorted(runs_dir.glob("*/*/*/seed*")) if runs_dir.is_dir() else []:
        match = _SEED_DIR.fullmatch(cell.name)
        if not (cell.is_dir() and match and ((cell / "eval.jsonl").exists() or (cell / "status.json").exists())):
            continue
        suite, algo, noise = cell.relative_to(runs_dir).parts[:3]
        step, id_acc, ood_acc = _final_scores(cell / "eval.jsonl")
        records.append((suite, algo, noise, int(match.group(1)), _read_state(cell), step, id_acc, ood_acc))
    if not records:
        raise HarnessError(f"no runs found under {str(runs_dir)!r} (expected {LAYOUT})")
    df = pd.DataFrame.from_records(records, columns=COLUMNS)
    df["step"] = df["step"].astype("Int64")
    return df.sort_values(["suite", "algo", "noise", "seed"], key=_sort_key).reset_index(drop=True)


def _noise_order(name: str) -> tuple:
    """'none' first, then natural order: flip0.1 < flip0.2 < flip0.4, pseudo8 < pseudo16."""
    parts = re.split(r"(\d+(?:\.\d+)?)", name)
    return (name != "none", tuple(float(p) if i % 2 else p for i, p in enumerate(parts)))


def _sort_key(col: pd.Series) -> pd.Series:
    if col.name != "noise":
        return col
    rank = {name: i for i, name in enumerate(sorted(set(col), key=_noise_order))}
    return col.map(rank)


def _fmt(values: pd.Series) -> str:
    """Accuracy fractions over seeds -> '45.3 ± 2.1' in percent (sample std, ddof=1)."""
    values = values.dropna() * 100
    if values.empty:
        return "n/a"
    std = f"{values.std(ddof=1):.1f}" if len(values) > 1 else "n/a"
    return f"{values.mean():.1f} ± {std}"


def _suite_section(suite: str, cells: pd.DataFrame) -> list[str]:
    finished = cells["state"].eq("done") & cells["step"].notna()
    lines = [
        f"## {suite}",
        "",
        "| algo | noise | seeds | ID acc (mean ± std) | OOD acc (mean ± std) |",
        "|---|---|---:|---:|---:|",
    ]
    for (algo, noise), group in cells.groupby(["algo", "noise"], sort=False):
        done = group[finished[group.index]]
        lines.append(f"| {algo} | {noise} | {len(done)} | {_fmt(done['id_acc'])} | {_fmt(done['ood_acc'])} |")
    excluded = cells[~finished]
    if len(excluded):
        names = ", ".join(
            f"{r.algo}/{r.noise}/seed{r.seed} ({r.state if r.state != 'done' else 'no eval'})"
            for r in excluded.itertuples()
        )
        noun = "cell" if len(excluded) == 1 else "cells"
        lines += ["", f"{len(excluded)} {noun} not finished (excluded from the means): {names}"]
    return lines + [""]


def render_report(df: pd.DataFrame) -> str:
    """Markdown text of the report for a frame from ``collect_final_scores``."""
    lines = [
        "# Final evaluation scores",
        "",
        "Accuracy in percent at each run's last evaluation step, mean ± sample std (ddof=1) over "
        "finished seeds; ID/OOD = mean over the suite's in-domain/out-of-domain benchmarks.",
        "",
    ]
    for suite, cells in df.groupby("suite", sort=True):
        lines += _suite_section(suite, cells)
    return "\n".join(lines)


def write_report(runs_dir: Path, out: Path | None = None) -> Path:
    """Collect final scores under ``runs_dir`` and write the Markdown report (default
    ``runs_dir / "report.md"``) atomically; returns its path."""
    runs_dir = Path(runs_dir)
    out = Path(out) if out is not None else runs_dir / "report.md"
    atomic_write_text(out, render_report(collect_final_scores(runs_dir)))
    return out
