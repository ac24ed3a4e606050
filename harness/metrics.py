"""What the harness measures, defined once. The primary metric of an evaluation row, for the
trainer, `harness eval` and the reports: `accuracy` when the evaluation drew one sample per
problem, else `avg@k` (the mean fraction correct over k samples); the `pass@k` row beside an
`avg@k` row is not a score. And the seconds a training step spends in each phase (`PhaseTimer`,
the `time/*` keys of metrics.jsonl)."""
from __future__ import annotations

import re
import time
from typing import Any

_AVG_AT_K = re.compile(r"avg@\d+")


def primary_metric(k: int) -> str:
    """The primary metric's name for an evaluation of `k` samples per problem."""
    return "accuracy" if k == 1 else f"avg@{k}"


def is_primary(metric: str) -> bool:
    """Whether `metric` (an eval.jsonl row's) is a primary metric: accuracy or avg@k."""
    return metric == "accuracy" or _AVG_AT_K.fullmatch(metric) is not None


def role_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean primary metric (accuracy or avg@k) over each role's benchmarks: {"ID": .., "OOD": ..}."""
    out: dict[str, list[float]] = {}
    for row in rows:
        if is_primary(row["metric"]):
            out.setdefault(row["role"], []).append(row["value"])
    return {role: sum(v) / len(v) for role, v in out.items()}


class PhaseTimer:
    """`with timer("rollout"): ...` adds the block's wall-clock seconds to `seconds["rollout"]`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._name = ""
        self._start = 0.0

    def __call__(self, name: str) -> "PhaseTimer":
        self._name = name
        return self

    def __enter__(self):
        self._start = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + time.perf_counter() - self._start


def summarise(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of the primary metric over the benchmarks of each role: {"ID_accuracy": .., "OOD_accuracy": ..}."""
    return {f"{role}_accuracy": value for role, value in role_scores(rows).items()}
