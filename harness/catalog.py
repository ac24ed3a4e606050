"""`harness list config`: every configuration key with its default, allowed range and description,
read from the config dataclasses' own fields (`metadata["doc"]`, `metadata["range"]`), so the
list cannot drift from the code."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Iterator

from harness.config import SECTIONS, RunConfig, upper_bound


def type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is tuple:
        return "list"
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args:  # Optional[X]
        return f"{type_name(args[0])}|none"
    return getattr(annotation, "__name__", str(annotation))


def show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) or '""'
    if value == "":
        return '""'
    return str(value)


def allowed(f: dataclasses.Field, key: str | None = None, annotation: Any = None) -> str:
    """The field's range or choices from its metadata; else, for an integer key, its upper bound
    (`harness.config.upper_bound`)."""
    meta = f.metadata
    if "range" in meta:
        r = meta["range"]
        if isinstance(r, (tuple, list)) and len(r) == 2:
            return f"[{show(r[0]) if r[0] is not None else '-inf'}, {show(r[1]) if r[1] is not None else 'inf'}]"
        return str(r)
    if "choices" in meta:
        return "|".join(map(str, meta["choices"]))
    if key is not None and annotation is int and upper_bound(key) is not None:
        bound = upper_bound(key)
        return f"<= {bound}" if key.partition(".")[0] in SECTIONS else f"|x| <= {bound}"
    return ""


def rows_of(cls: type, prefix: str) -> Iterator[dict[str, str]]:
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        yield {"key": f"{prefix}.{f.name}", "type": type_name(hints[f.name]), "default": show(getattr(defaults, f.name)),
               "range": allowed(f, f"{prefix}.{f.name}", hints[f.name]), "doc": f.metadata.get("doc", "")}


def config_rows() -> list[dict[str, str]]:
    """model.*, train.*, eval.*, suite.* of each suite (`suite.KEY` with the suite named), and
    `<algo>.KEY` of each algorithm (`algo.KEY` reaches every algorithm of a grid that has KEY)."""
    from algorithms import ALGOS
    from tasks import SUITES

    hints = typing.get_type_hints(RunConfig)
    rows = [row for section in SECTIONS for row in rows_of(hints[section], section)]
    for name in SUITES.names():
        rows += [{**row, "key": f"{row['key']}  ({name})"} for row in rows_of(SUITES.get(name).Options, "suite")]
    for name in ALGOS.names():
        rows += list(rows_of(ALGOS.get(name).Options, name))
    return rows


def format_rows(rows: list[dict[str, str]]) -> list[str]:
    """Aligned columns (the range column only when some key has a range); a long default (a
    benchmark list) runs past its column rather than widen it."""
    columns = ["key", "type", "default"] + (["range"] if any(r["range"] for r in rows) else [])
    rows = [{"key": "key", "type": "type", "default": "default", "range": "range", "doc": "description"}, *rows]
    widths = {c: min(max(len(r[c]) for r in rows), 24 if c == "default" else 99) for c in columns}
    lines = []
    for r in rows:
        cells = [r[c].ljust(widths[c]) for c in columns]
        lines.append((" ".join(f"{cell} " for cell in cells) + r["doc"]).rstrip())
    return lines
