"""The run store: one folder per cell, small files written atomically.

    <out>/<suite>/<algo>/<noise>/seed<k>/
        config.json     the fully resolved configuration
        metrics.jsonl   one object per training step (key "step")
        eval.jsonl      one object per (eval point, benchmark, metric)
        status.json     {"state": "running" | "done" | "failed", "reason": ..., ...}
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable


def cell_dir(out: Path, suite: str, algo: str, noise: str, seed: int) -> Path:
    return Path(out) / suite / algo / noise / f"seed{seed}"


def _clean(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every reader can parse the files."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n")


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Append whole lines and flush them to disk: a crash loses at most the line being written."""
    text = "".join(json.dumps(_clean(row), sort_keys=True) + "\n" for row in rows)
    with open(path, "a") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def read_json(path: Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def read_status(cell: Path) -> dict | None:
    path = Path(cell) / "status.json"
    if not path.exists():
        return None
    try:
        return read_json(path)
    except json.JSONDecodeError:
        return None


def write_status(cell: Path, state: str, **extra: Any) -> None:
    atomic_write_json(Path(cell) / "status.json", {"state": state, "time": time.time(), **extra})


def reset_cell(cell: Path) -> None:
    """Start a cell afresh: an unfinished cell's partial files would otherwise mix two runs."""
    cell = Path(cell)
    if cell.exists():
        shutil.rmtree(cell)
    cell.mkdir(parents=True)
