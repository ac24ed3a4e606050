"""The one JSONL reader: the JSON objects of a file's lines, each line checked, an error naming the
true line number. The run store (`harness.store.read_jsonl`) and the benchmark files
(`tasks.data.read_jsonl_rows`) read through it and put their own file name in front. It imports
nothing of the project, so the lower layers may use it.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Iterator


class JsonlError(ValueError):
    """A line that is not a JSON object; its text is `line <n>: <what is wrong>`."""

    def __init__(self, lineno: int, what: str):
        super().__init__(f"line {lineno}: {what}")
        self.lineno = lineno


def type_name(value: Any) -> str:
    """A JSON value's type in words: "an object", "a list", "a string", ..."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def numbered_objects(lines: Iterable[bytes | str], expected: str = "an object") -> Iterator[tuple[int, dict]]:
    """`(line number, object)` for every non-blank line (bytes are decoded as UTF-8); a `JsonlError`
    at the first line that is not UTF-8 text, not JSON, or not a JSON object (`expected <expected>,
    found <its type>`: the run store says "an object", the benchmark files "a JSON object")."""
    for lineno, raw in enumerate(lines, start=1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise JsonlError(lineno, "not UTF-8 text") from None
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise JsonlError(lineno, f"malformed JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise JsonlError(lineno, f"expected {expected}, found {type_name(row)}")
        yield lineno, row
