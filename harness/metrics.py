"""The primary metric of an evaluation row, defined once for the trainer, `harness eval` and the
reports: `accuracy` when the evaluation drew one sample per problem, else `avg@k` (the mean
fraction correct over k samples); the `pass@k` row beside an `avg@k` row is not a score."""
from __future__ import annotations

import re

_AVG_AT_K = re.compile(r"avg@\d+")


def primary_metric(k: int) -> str:
    """The primary metric's name for an evaluation of `k` samples per problem."""
    return "accuracy" if k == 1 else f"avg@{k}"


def is_primary(metric: str) -> bool:
    """Whether `metric` (an eval.jsonl row's) is a primary metric: accuracy or avg@k."""
    return metric == "accuracy" or _AVG_AT_K.fullmatch(metric) is not None
