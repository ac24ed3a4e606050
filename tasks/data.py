"""Benchmark data: where each benchmark comes from, how its rows become problems, which grader
scores them.

Every benchmark (and every training set) is a `BenchmarkSpec` in `BENCHMARKS`. Its rows load
from, in this order:

1. a per-benchmark file or folder (`suite.paths=NAME=FILE`),
2. the data folder (`--data-dir DIR`, `suite.data_dir`, or `$HARNESS_DATA_DIR`): `DIR/<filename>`,
   then `DIR/<basename of filename>`; the layout of `../shared/data/` is the reference,
3. the Hugging Face hub with `datasets.load_dataset(hub, hub_config, split=hub_split)` (the
   default for users; `suite.hub=NAME=ID` points it elsewhere, a local dataset folder included).

Data that cannot be had is a `HarnessError` naming the benchmark and the options that fix it;
nothing is skipped silently. Graders live in `GRADERS`: a name with a version
(`math_verify-v1`), stored with every evaluation row.
"""
from __future__ import annotations

import csv
import json
import os
import socket
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from harness.errors import HarnessError
from harness.jsonl import JsonlError, numbered_objects
from harness.registry import Registry
from tasks.base import Problem

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Grader:
    """A clean verifier. `grade(response, problem)` is 1.0 or 0.0 (or a score in [0, 1] for graders
    such as F1); `extract(response)` is the answer it read, or None, for pseudo-label majority votes;
    `render(answer)` writes an extracted answer back as a response it grades (default: as is)."""

    name: str  # with a version, e.g. "math_verify-v1"; stored with every evaluation row
    grade: Callable[[str, Problem], float]
    extract: Callable[[str], str | None]
    # An extracted answer written as a response the grader reads back as that answer (math: boxed);
    # None: the answer itself. Used to check a pseudo-label against the gold answer.
    render: Callable[[str], str] | None = None


GRADERS: Registry[Grader] = Registry("grader")
BENCHMARKS: Registry["BenchmarkSpec"] = Registry("benchmark")


def register_grader(grader: Grader) -> Grader:
    GRADERS.add(grader.name, grader)
    return grader


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str  # e.g. "math500"; also the key of suite.paths / suite.hub
    domain: str  # "math", "science", "dialogue": which suites use it by default is up to the suite
    filename: str  # relative to a data folder, e.g. "math/math500.jsonl"
    hub: str  # Hugging Face dataset id (or a local dataset folder)
    hub_split: str
    grader: str  # a key of GRADERS
    to_problems: Callable[[Rows, "BenchmarkSpec", int], list[Problem]]  # (rows, spec, shuffle seed)
    hub_config: str | None = None
    note: str = ""  # appended to "cannot be had" errors, e.g. how to get a gated dataset
    template: str = ""  # prompt template id stored with evaluation rows, e.g. "math-boxed-v1"
    options: dict[str, Any] = field(default_factory=dict)  # converter settings (a domain, a split part)
    # Side data a converter needs from where the rows come from (SGD's service schemas): called
    # with the spec and the sources before the rows are read; returns the spec to convert with.
    prepare: Callable[["BenchmarkSpec", "DataSources"], "BenchmarkSpec"] | None = None


def register_benchmark(spec: BenchmarkSpec) -> BenchmarkSpec:
    GRADERS.get(spec.grader)  # a typo in a grader name fails at import, not mid-run
    BENCHMARKS.add(spec.name, spec)
    return spec


def parse_mapping(items: tuple[str, ...] | list[str], key: str) -> dict[str, str]:
    """`("math500=/x.jsonl", "gpqa=/y.csv")` -> {"math500": "/x.jsonl", ...}, names checked."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise HarnessError(f"{key} entries look like NAME=VALUE, got {item!r}")
        BENCHMARKS.get(name)
        out[name] = value
    return out


@dataclass(frozen=True)
class DataSources:
    """Where data comes from, for every benchmark of a suite."""

    data_dir: str = ""
    paths: dict[str, str] = field(default_factory=dict)
    hub: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_options(cls, data_dir: str, paths: tuple[str, ...], hub: tuple[str, ...]) -> "DataSources":
        data_dir = data_dir or os.environ.get("HARNESS_DATA_DIR", "")
        if data_dir and not Path(data_dir).is_dir():
            raise HarnessError(f"data folder {data_dir!r} does not exist (--data-dir / suite.data_dir / $HARNESS_DATA_DIR)")
        return cls(data_dir, parse_mapping(paths, "suite.paths"), parse_mapping(hub, "suite.hub"))

    def local_file(self, spec: BenchmarkSpec) -> Path | None:
        if spec.name in self.paths:
            path = Path(self.paths[spec.name])
            if not path.exists():
                raise HarnessError(f"benchmark {spec.name}: suite.paths file {str(path)!r} does not exist")
            return path
        if self.data_dir:
            for candidate in (Path(self.data_dir) / spec.filename, Path(self.data_dir) / Path(spec.filename).name):
                if candidate.exists():
                    return candidate
        return None

    def hub_id(self, spec: BenchmarkSpec) -> str:
        return self.hub.get(spec.name, spec.hub)

    def describe(self, spec: BenchmarkSpec) -> str:
        local = self.local_file(spec)
        return str(local) if local else f"hub:{self.hub_id(spec)}"

    def check(self, spec: BenchmarkSpec, role: str, leave_out: str) -> None:
        """Fail now, before any output is written, when a benchmark's data cannot be had; a local
        file is parsed in full (every row converted), so a malformed one stops the run here."""
        if self.local_file(spec) is not None:
            with warnings.catch_warnings():  # notes on left-out rows are the trainer's to give
                warnings.simplefilter("ignore")
                self.problems(spec)  # its side data (spec.prepare) too
            return
        hub = self.hub_id(spec)
        if Path(hub).exists() or hub_reachable():
            return
        where = f"no {spec.filename} in {self.data_dir!r}" if self.data_dir else "no data folder given"
        raise HarnessError(
            f"benchmark {spec.name} ({role}) cannot be loaded: {where} and the Hugging Face hub "
            f"({hub}) is unreachable; pass --data-dir DIR holding {spec.filename}, or "
            f"--set suite.paths={spec.name}=FILE, or leave it out with {leave_out}"
            + (f" ({spec.note})" if spec.note else ""))

    def rows(self, spec: BenchmarkSpec) -> Rows:
        local = self.local_file(spec)
        if local is not None:
            return read_rows(local, spec.name)
        return hub_rows(self.hub_id(spec), spec)

    def problems(self, spec: BenchmarkSpec, seed: int = 0) -> list[Problem]:
        """The benchmark's problems; `seed` fixes any shuffling a converter does (GPQA's options)."""
        if spec.prepare is not None:
            spec = spec.prepare(spec, self)
        problems = spec.to_problems(self.rows(spec), spec, seed)
        if not problems:
            raise HarnessError(f"benchmark {spec.name}: its data ({self.describe(spec)}) gave no problems")
        return [replace(p, meta={**p.meta, "grader": spec.grader, "benchmark": spec.name}) for p in problems]


def read_rows(path: Path, name: str) -> Rows:
    """Rows of a local .jsonl, .json (a list), .csv or .parquet file, or of a dataset folder."""
    try:
        if path.is_dir():
            return hub_rows(str(path), None)
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return read_jsonl_rows(path, name)
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise ValueError("a .json benchmark file must hold a list of objects")
            return data
        if suffix in (".csv", ".parquet"):
            import pandas as pd

            if suffix == ".csv":
                check_csv_fields(path, name)
            frame = pd.read_csv(path, keep_default_na=False, index_col=False) if suffix == ".csv" else pd.read_parquet(path)
            return frame.to_dict(orient="records")
    except HarnessError:
        raise
    except (OSError, ValueError, csv.Error) as exc:
        raise HarnessError(f"benchmark {name}: cannot read {str(path)!r}: {str(exc).splitlines()[0]}") from None
    raise HarnessError(f"benchmark {name}: {str(path)!r} is not a .jsonl, .json, .csv or .parquet file")


def read_jsonl_rows(path: Path, name: str) -> Rows:
    """The objects of a .jsonl benchmark file, each line checked; errors give the true line number."""
    with open(path, "rb") as fh:
        try:
            return [row for _, row in numbered_objects(fh, expected="a JSON object")]
        except JsonlError as exc:
            raise HarnessError(f"benchmark {name}: {str(path)!r} {exc}") from None


def check_csv_fields(path: Path, name: str) -> None:
    """Every row of a CSV benchmark file has as many fields as its header (pandas would otherwise
    take a row with one field more as an index and shift every column)."""
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise HarnessError(f"benchmark {name}: {str(path)!r} is empty (no header row)")
        for row in reader:
            if row and len(row) != len(header):
                raise HarnessError(f"benchmark {name}: {str(path)!r} line {reader.line_num}: {len(row)} fields, "
                                   f"the header has {len(header)}")


def hub_rows(hub: str, spec: BenchmarkSpec | None) -> Rows:
    """Rows from `datasets.load_dataset` (a hub id, or a local dataset folder)."""
    try:
        import datasets
    except ImportError:
        raise HarnessError("loading benchmarks from the Hugging Face hub needs `datasets` "
                           "(pip install datasets), or give local files with --data-dir") from None
    name = spec.name if spec else hub
    try:
        if spec is None:
            loaded = datasets.load_dataset(hub)
            split = next(iter(loaded.values()))
        else:
            split = datasets.load_dataset(hub, spec.hub_config, split=spec.hub_split)
    except Exception as exc:  # datasets raises many kinds: connection, gating, missing config
        raise HarnessError(f"benchmark {name}: cannot load {hub!r} with datasets ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); give a local file with --data-dir "
                           f"or --set suite.paths={name}=FILE") from None
    return [dict(row) for row in split]


_HUB_REACHABLE: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers (cached per process); False when HF_HUB_OFFLINE is set."""
    global _HUB_REACHABLE
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false"):
        return False
    if _HUB_REACHABLE is None:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    return _HUB_REACHABLE


def field_of(row: dict[str, Any], *names: str, default: Any = None) -> Any:
    """The first of `names` present in `row`, matched case-insensitively (hub copies of one
    benchmark spell their columns differently: `answer`, `Answer`)."""
    lowered = {str(k).lower(): v for k, v in row.items()}
    for name in names:
        if name in row:
            return row[name]
        if name.lower() in lowered:
            return lowered[name.lower()]
    return default


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by `key` alone (not by the run seed): for splits that must be the
    same in every run, such as the held-out evaluation part of a benchmark that also trains."""
    import hashlib

    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2 ** 64
