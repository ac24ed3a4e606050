"""Reading the run store into pandas frames.

Run store layout (written by the trainer)::

    <runs>/<suite>/<algo>/<noise>/seed<k>/{status.json, config.json, metrics.jsonl, eval.jsonl,
                                           eval_problems.jsonl (optional)}

A *cell* is one ``seed<k>`` directory at that depth holding ``status.json`` or ``eval.jsonl``.

Scores. Each benchmark's *primary metric* at an evaluation step is ``accuracy`` (one sample per
problem) or, when the evaluation drew k > 1 samples, ``avg@k``; pass@k rows are not scores here.
Several primary rows of one benchmark at one step (e.g. two decoding settings) are averaged first,
so each benchmark counts once. A cell's *final* score is the mean of its last m evaluations after
step 0, m being the cell's ``eval.final_evals`` (config.json; 1 when absent: the last evaluation
alone), or fewer when the cell has fewer; the window always ends at the LAST evaluation step: a
benchmark whose value there (or anywhere in the window) is missing or NaN has no final score for
that seed, a cell whose last evaluation is NaN on every benchmark, or whose last evaluation comes
before the last training step (``steps`` of ``status.json``), is not scored at all, and
``RunStore.cells`` says why in its ``issue`` column. Values are fractions in [0, 1].

``eval_problems.jsonl`` (optional, one object per (evaluation step, benchmark, problem)) holds
per-problem results for the paired bootstrap::

    {"step": 200, "benchmark": "math500", "role": "ID", "problem": "test/algebra/1.json", "score": 0.75}

``problem`` is any stable id (string or number) of the problem within its benchmark; ``score``
is that problem's primary metric in [0, 1] (1/0 for accuracy, the fraction correct for avg@k).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

from harness import store
from harness.errors import HarnessError
from harness.metrics import is_primary

LAYOUT = "<runs>/<suite>/<algo>/<noise>/seed<k>/eval.jsonl"
COLUMNS = ["suite", "algo", "noise", "seed", "state", "step", "id_acc", "ood_acc"]
# A cell whose files cannot be read is listed with state CORRUPT and the reason, and enters no statistic.
CORRUPT = "corrupt"
EVAL_KEYS = ("step", "benchmark", "role", "metric", "value")
PROBLEM_KEYS = ("step", "benchmark", "role", "problem", "score")
_SEED_DIR = re.compile(r"seed(\d+)")


def read_jsonl(path: Path, keys: tuple[str, ...] = ()) -> list[dict]:
    """Objects of a JSONL file; blank lines skipped; a StoreError (HarnessError) names the file and
    the line when it is not UTF-8, a line is not a JSON object or lacks one of `keys`."""
    return store.read_jsonl(path, keys)


def _read_status(cell: Path) -> dict:
    """A cell's status.json through the store's validating reader; {"state": "unknown"} without one."""
    return store.read_status(cell) or {"state": "unknown"}


def final_issue(scores: pd.DataFrame, last: int | None, steps) -> str:
    """Why a cell's last evaluation cannot (fully) be scored, or '' when it can: no evaluation,
    an evaluation short of the last training step, or NaN values at the last evaluation."""
    if last is None:
        return "no evaluation"
    if isinstance(steps, int) and last < steps:
        return f"last evaluation at step {last} of {steps}: the final one is missing"
    final = scores[scores["step"] == last]
    nan = sorted(final.loc[final["value"].isna(), "benchmark"])
    if nan and len(nan) == len(final):
        return f"last evaluation (step {last}) is NaN on every benchmark"
    if nan:
        return f"NaN on {', '.join(nan)} at the last evaluation (step {last}): not scored there"
    return ""


def _checked_rows(path: Path, keys: tuple[str, ...]) -> list[dict]:
    return read_jsonl(path, keys) if path.exists() else []


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The keys that tell two evaluation rows apart: the same values twice is one row written twice.
EVAL_ROW_KEY = ("step", "role", "benchmark", "metric", "temperature", "top_p", "k", "max_new_tokens")


def _eval_rows(path: Path) -> list[dict]:
    """eval.jsonl's rows, each with an integer step and a number (or null) value, none repeated: a
    value such as "abc" or a row written twice makes the cell corrupt instead of a NaN or an average."""
    rows = _checked_rows(path, EVAL_KEYS)
    seen: dict[tuple, int] = {}
    for i, row in enumerate(rows, start=1):
        if not isinstance(row["step"], int) or isinstance(row["step"], bool):
            raise store.StoreError(f"{str(path)!r} row {i}: 'step' must be an integer, found {row['step']!r:.40}")
        if row["value"] is not None and not _is_number(row["value"]):
            raise store.StoreError(f"{str(path)!r} row {i}: 'value' must be a number or null, found {row['value']!r:.40}")
        key = tuple(json.dumps(row.get(k), sort_keys=True) for k in EVAL_ROW_KEY)
        if key in seen:
            raise store.StoreError(f"{str(path)!r} row {i} repeats row {seen[key]} (step {row['step']}, "
                                   f"{row['benchmark']!s:.40} {row['metric']!s:.20})")
        seen[key] = i
    return rows


def _metric_rows(path: Path) -> list[dict]:
    """metrics.jsonl's rows: an integer step each, each step once (a step written twice is not averaged),
    no metric a string (a value such as "abc" makes the cell corrupt instead of a NaN)."""
    rows = _checked_rows(path, ())
    seen: dict[int, int] = {}
    for i, row in enumerate(rows, start=1):
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise store.StoreError(f"{str(path)!r} row {i}: 'step' must be an integer, found {step!r:.40}")
        if step in seen:
            raise store.StoreError(f"{str(path)!r} row {i} repeats step {step} (row {seen[step]})")
        seen[step] = i
        bad = next((k for k, v in row.items() if isinstance(v, str)), None)
        if bad is not None:
            raise store.StoreError(f"{str(path)!r} row {i}: metric {bad!r:.60} must be a number or null, "
                                   f"found {row[bad]!r:.40}")
    return rows


def final_evals_of(cell: Path) -> int:
    """The cell's `eval.final_evals` from its config.json (1 without one, or for a config that predates it)."""
    path = cell / "config.json"
    if not path.exists():
        return 1
    section = store.read_json(path).get("eval")
    value = section.get("final_evals", 1) if isinstance(section, dict) else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise store.StoreError(f"{str(path)!r}: eval.final_evals must be a positive integer, got {value!r}")
    return value


def final_steps(steps, m: int) -> list[int]:
    """The evaluation steps a final score averages: the last `m` after step 0 (the last step alone
    when it is step 0). `steps`: the cell's evaluation steps."""
    ordered = sorted(set(int(s) for s in steps))
    if not ordered:
        return []
    trained = [s for s in ordered if s > 0]
    return trained[-m:] if trained else ordered[-1:]


def window_mean(frame: pd.DataFrame, keys: list[str], column: str) -> pd.DataFrame:
    """`column` averaged over the steps of each `keys` group, NaN when any of them is NaN."""
    return frame.groupby(keys, as_index=False, sort=False)[column].agg(lambda v: v.mean(skipna=False))


def primary_scores(rows: list[dict]) -> pd.DataFrame:
    """Eval rows -> one row per (step, role, benchmark) with the primary metric's value
    (accuracy, else avg@k), duplicate rows of a benchmark averaged (NaN when all of them are NaN).
    Columns: step, role, benchmark, value."""
    if not rows:
        return pd.DataFrame({"step": pd.Series(dtype=int), "role": pd.Series(dtype=str),
                             "benchmark": pd.Series(dtype=str), "value": pd.Series(dtype=float)})
    df = pd.DataFrame(rows)
    df = df[df["metric"].map(lambda m: is_primary(str(m)))]
    df = df.assign(value=pd.to_numeric(df["value"], errors="coerce"))  # null -> NaN, kept: a NaN is a result
    out = df.groupby(["step", "role", "benchmark"], as_index=False)["value"].mean()  # NaN only if all NaN
    out["step"] = out["step"].astype(int)
    out["value"] = out["value"].astype(float)
    return out


def _noise_order(name: str) -> tuple:
    """'none' first, then natural order: flip0.1 < flip0.2 < flip0.4, pseudo8 < pseudo16."""
    parts = re.split(r"(\d+(?:\.\d+)?)", name)
    return (name != "none", tuple(float(p) if i % 2 else p for i, p in enumerate(parts)))


def sort_noise(names) -> list[str]:
    return sorted(set(names), key=_noise_order)


def _sort_key(col: pd.Series) -> pd.Series:
    if col.name != "noise":
        return col
    rank = {name: i for i, name in enumerate(sort_noise(col))}
    return col.map(rank)


def sort_frame(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    return df.sort_values(by, key=_sort_key).reset_index(drop=True)


class RunStore:
    """Every cell under ``runs_dir`` with its parsed files.

    ``cells``: suite, algo, noise, seed, state, step (last eval step), id_acc, ood_acc, reason (why
    a cell failed, or why its files are unreadable: state ``corrupt``), issue (why a finished cell's
    last evaluation is not, or not fully, scored; '' when it is), path.
    ``evals``: suite, algo, noise, seed, step, role, benchmark, value (primary metric, all steps).
    ``metrics``: suite, algo, noise, seed, step and one column per metrics.jsonl key.
    ``problems``: suite, algo, noise, seed, step, role, benchmark, problem, score (may be empty).
    ``ceilings``: {(suite, benchmark): the best expected score any policy can reach there}, for the
    benchmarks whose eval rows record one (their problems' `meta["ceiling"]`, `tasks.base.Problem`); 1 for
    the others.
    """

    def __init__(self, runs_dir: Path):
        runs_dir = Path(runs_dir)
        cells, evals, metrics, problems, windows = [], [], [], [], []
        ceilings: dict[tuple[str, str], dict[int, float]] = {}
        for cell in sorted(runs_dir.glob("*/*/*/seed*")) if runs_dir.is_dir() else []:
            match = _SEED_DIR.fullmatch(cell.name)
            if not (cell.is_dir() and match and ((cell / "eval.jsonl").exists() or (cell / "status.json").exists())):
                continue
            suite, algo, noise = cell.relative_to(runs_dir).parts[:3]
            key = {"suite": suite, "algo": algo, "noise": noise, "seed": int(match.group(1))}
            try:
                status = _read_status(cell)
                rows = _eval_rows(cell / "eval.jsonl")
                scores = primary_scores(rows)
                m = pd.DataFrame(_metric_rows(cell / "metrics.jsonl"))
                p = _checked_rows(cell / "eval_problems.jsonl", PROBLEM_KEYS)
                m_final = final_evals_of(cell)
            except (ValueError, TypeError) as exc:  # one cell's corrupt files never hold the report hostage
                reason = str(exc) if isinstance(exc, HarnessError) else f"{str(cell)!r}: {type(exc).__name__}: {exc}"
                cells.append({**key, "state": CORRUPT, "step": None, "id_acc": math.nan, "ood_acc": math.nan,
                              "reason": reason, "issue": "", "path": str(cell), "final_steps": ""})
                continue
            last = int(scores["step"].max()) if len(scores) else None
            window = final_steps(scores["step"], m_final)
            final = window_mean(scores[scores["step"].isin(window)], ["role", "benchmark"], "value")

            def role_mean(role: str) -> float:
                values = final.loc[final["role"] == role, "value"]
                return float(values.mean(skipna=False)) if len(values) else math.nan

            state = str(status.get("state", "unknown"))
            reason = str(status.get("reason", "")) if state == "failed" else ""
            issue = final_issue(scores, last, status.get("steps")) if state == "done" else ""
            cells.append({**key, "state": state, "step": last, "id_acc": role_mean("ID"),
                          "ood_acc": role_mean("OOD"), "reason": reason, "issue": issue, "path": str(cell),
                          "final_steps": ",".join(map(str, window))})
            evals.append(scores.assign(**key))
            for row in rows:
                if isinstance(row.get("ceiling"), (int, float)):
                    ceilings.setdefault((suite, str(row["benchmark"])), {})[key["seed"]] = float(row["ceiling"])
            windows += [{**key, "step": step} for step in window]
            if "step" in m:
                metrics.append(m.assign(**key))
            if p:
                problems.append(pd.DataFrame(p)[list(PROBLEM_KEYS)].assign(**key))
        if not cells:
            raise HarnessError(f"no runs found under {str(runs_dir)!r} (expected {LAYOUT})")
        keys = ["suite", "algo", "noise", "seed"]
        self.cells = sort_frame(pd.DataFrame(cells), keys)
        self.cells["step"] = self.cells["step"].astype("Int64")
        self.evals = pd.concat(evals, ignore_index=True) if evals else pd.DataFrame(columns=keys + ["step", "role", "benchmark", "value"])
        self.metrics = pd.concat(metrics, ignore_index=True) if metrics else pd.DataFrame(columns=keys + ["step"])
        self.problems = (pd.concat(problems, ignore_index=True) if problems
                         else pd.DataFrame(columns=keys + list(PROBLEM_KEYS)))
        self.problems["problem"] = self.problems["problem"].astype(str)
        # The best expected score a policy can reach on each (suite, benchmark), from its eval rows'
        # `ceiling`: a seed draws its own problems, so the mean over the seeds, as the scores are
        # averaged (benchmarks whose rows record none are not in it: 1).
        self.ceilings = {key: sum(by_seed.values()) / len(by_seed) for key, by_seed in ceilings.items()}
        # The evaluation steps each cell's final score averages (`final_steps`): keys + step.
        self.final_windows = pd.DataFrame(windows, columns=keys + ["step"])

    def corrupt(self) -> pd.DataFrame:
        """Cells skipped because a file of theirs is unreadable, with the reason."""
        return self.cells[self.cells["state"].eq(CORRUPT)]

    def done(self) -> pd.DataFrame:
        """Cells that finished with a scorable last evaluation (the final one, not NaN on every
        benchmark): the only ones that enter statistics."""
        c = self.cells
        unscorable = c["issue"].str.contains("NaN on every|missing|no evaluation", regex=True)
        return c[c["state"].eq("done") & c["step"].notna() & ~unscorable]

    def final_windows_of_done(self) -> pd.DataFrame:
        """The final-score steps of finished, scorable cells: suite, algo, noise, seed, step."""
        done = self.done()[["suite", "algo", "noise", "seed"]]
        return self.final_windows.merge(done, on=["suite", "algo", "noise", "seed"])

    def final_scores(self) -> pd.DataFrame:
        """Finished cells' final primary scores, the mean over each cell's final steps (module doc;
        NaN values left out: that benchmark has no final score for that seed): suite, algo, noise,
        seed, role, benchmark, value."""
        keys = ["suite", "algo", "noise", "seed"]
        merged = self.evals.merge(self.final_windows_of_done(), on=[*keys, "step"])
        merged = window_mean(merged, [*keys, "role", "benchmark"], "value")
        merged = merged[merged["value"].notna()]
        return merged[["suite", "algo", "noise", "seed", "role", "benchmark", "value"]].reset_index(drop=True)

    def initial_scores(self) -> pd.DataFrame:
        """Finished cells' primary scores at step 0 (the initial model, before training):
        suite, algo, noise, seed, role, benchmark, value."""
        done = self.done()[["suite", "algo", "noise", "seed"]]
        ev = self.evals[(self.evals["step"] == 0) & self.evals["value"].notna()]
        merged = ev.merge(done, on=["suite", "algo", "noise", "seed"])
        return merged[["suite", "algo", "noise", "seed", "role", "benchmark", "value"]]

    def final_problems(self) -> pd.DataFrame:
        """Per-problem scores of finished cells, averaged over each cell's final steps (the step
        column is the last of them): suite, algo, noise, seed, step, role, benchmark, problem, score."""
        keys = ["suite", "algo", "noise", "seed"]
        merged = self.problems.merge(self.final_windows_of_done(), on=[*keys, "step"])
        if merged.empty:
            return merged
        by = [*keys, "role", "benchmark", "problem"]
        out = merged.groupby(by, as_index=False, sort=False).agg(step=("step", "max"), score=("score", "mean"))
        return out[[*keys, *PROBLEM_KEYS]]


def collect_final_scores(runs_dir: Path) -> pd.DataFrame:
    """One row per cell: suite, algo, noise, seed, state, step, id_acc, ood_acc (see module doc)."""
    return RunStore(runs_dir).cells[COLUMNS]
