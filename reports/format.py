"""Cell formatting of the report's tables and sentences: neutral text (Markdown as it is, LaTeX
escaped by `reports.render`). Scores print in percent; a dash marks a missing cell."""
from __future__ import annotations

import math

from reports import analysis

DASH = "–"


def is_missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def pct(x: float, signed: bool = False) -> str:
    if is_missing(x):
        return DASH
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def pct_ci(mean: float, low: float, high: float, signed: bool = False, n: int | None = None,
           n_row: int | None = None) -> str:
    """'45.3 [40.1, 50.2]' in percent; the bare mean when there is no interval; a dash if no mean.
    With ``n``: ' (n=3)' appended when it differs from the row's ``n_row``, or always without one."""
    if is_missing(mean):
        return DASH
    text = pct(mean, signed) if is_missing(low) else f"{pct(mean, signed)} [{pct(low, signed)}, {pct(high, signed)}]"
    if n is not None and (n_row is None or int(n) != int(n_row)):
        text += f" (n={int(n)})"
    return text


def fmt_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def pval(p: float, adjusted: float, bound: bool = False, reps: int = analysis.REPS) -> str:
    """'0.031 (0.124)*': p, Holm-adjusted p in brackets, * when the adjusted p < 0.05; a bootstrap
    p with no replicate across 0 prints as '< 1/B'; an undefined test is a dash."""
    if is_missing(p):
        return DASH
    mark = "*" if adjusted < analysis.ALPHA else ""
    if bound:
        return f"< {1 / reps:g} ({fmt_p(adjusted)}){mark}"
    return f"{fmt_p(p)} ({fmt_p(adjusted)}){mark}"


def prob_ci(p: float, low: float, high: float) -> str:
    if is_missing(p):
        return DASH
    return f"{p:.2f}" if is_missing(low) else f"{p:.2f} [{low:.2f}, {high:.2f}]"
