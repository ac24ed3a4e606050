"""Grid files and presets: `harness run --config FILE.yaml` and `--preset NAME`.

A grid file is a YAML mapping whose keys are `harness run`'s long option names (dashes or
underscores: `suite`, `algos`, `noise`, `seeds`, `steps`, `workers`, `out`, `model`, `log-to`, ...)
plus `set:`, a mapping of config key -> value (the `--set` keys; nested mappings join with dots).
Lists may be YAML lists or comma strings. Flags on the command line override the file; `--set`
keys given on the command line override the file's. A preset is a grid file shipped in the package
(`harness/presets/NAME.yaml`); its first comment line is its description (`harness list presets`).
"""
from __future__ import annotations

import argparse
import importlib.resources
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

# Options that choose a file, or are not run options.
NOT_IN_FILES = {"config", "preset", "set", "help", "command"}


def preset_dir() -> Path:
    return Path(str(importlib.resources.files("harness") / "presets"))


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = preset_dir() / f"{name}.yaml"
    if not path.is_file():
        raise HarnessError(f"unknown preset {name!r} (valid: {', '.join(preset_names())})")
    return path


def preset_description(path: Path) -> str:
    """The file's first comment line, without its `#`."""
    for line in Path(path).read_text().splitlines():
        if line.strip().startswith("#"):
            return line.strip().lstrip("#").strip()
    return ""


def list_presets() -> list[tuple[str, str]]:
    return [(name, preset_description(preset_dir() / f"{name}.yaml")) for name in preset_names()]


# Limits of a grid file, checked while it is read: a grid file is a few dozen lines.
MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 32  # nesting of mappings and lists
MAX_ALIASES = 16  # `*name` references: enough to share a list, too few for an expansion bomb
MAX_NODES = 100_000  # values of the file, aliases counted as often as they are used


class GridFileError(Exception):
    """A limit of `BoundedLoader` crossed, with the line where."""


def bounded_loader():
    """A `yaml.SafeLoader` that refuses nesting deeper than MAX_DEPTH, more than MAX_ALIASES aliases and
    more than MAX_NODES values (an alias counts as the values it repeats), before building anything."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        def __init__(self, stream):
            super().__init__(stream)
            self.depth, self.aliases, self.sizes = 0, 0, {}

        def compose_node(self, parent, index):
            mark = self.peek_event().start_mark
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_ALIASES:
                    raise GridFileError(f"line {mark.line + 1}: more than {MAX_ALIASES} YAML aliases (*name)")
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise GridFileError(f"line {mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
            try:
                node = super().compose_node(parent, index)
            finally:
                self.depth -= 1
            if self.size(node) > MAX_NODES:
                raise GridFileError(f"line {mark.line + 1}: more than {MAX_NODES} values (YAML aliases included)")
            return node

        def size(self, node) -> int:
            """Values under `node`, an alias's as often as it is used (memoised per node)."""
            if id(node) not in self.sizes:
                children = node.value if isinstance(node, yaml.SequenceNode) else \
                    [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
                self.sizes[id(node)] = (node, 1 + sum(self.size(c) for c in children))
            return self.sizes[id(node)][1]

    return BoundedLoader


def read_mapping(path: Path) -> dict[str, Any]:
    """The YAML mapping of a grid file; a one-line error for a missing, malformed or oversized file
    (more than MAX_FILE_BYTES, not UTF-8, nested deeper than MAX_DEPTH, more than MAX_ALIASES aliases)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"grid file {str(path)!r} does not exist")
    with open(path, "rb") as fh:
        raw = fh.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise HarnessError(f"{path}: a grid file is at most {MAX_FILE_BYTES} bytes; this one is larger")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise HarnessError(f"{path}: not UTF-8 text (byte {exc.start}, line {line}); save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=bounded_loader())  # noqa: S506 - a SafeLoader with limits
    except GridFileError as exc:
        raise HarnessError(f"{path} {exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise HarnessError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HarnessError(f"{path}: a grid file is a mapping of option: value, got a {type(data).__name__}")
    return data


def as_text(value: Any) -> str:
    """A YAML value as the text a command-line flag would give: lists join with commas."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(as_text(v) for v in value)
    if value is None:
        return ""
    return str(value)


def flatten_set(value: Any, path: Path, prefix: str = "") -> dict[str, str]:
    """`set:` as {config key: text}; nested mappings join with dots (`train: {lr: 1e-6}` -> train.lr)."""
    if not isinstance(value, dict):
        raise HarnessError(f"{path}: 'set' must be a mapping of config key: value, got {as_text(value)!r}")
    out: dict[str, str] = {}
    for key, item in value.items():
        full = f"{prefix}{key}"
        if isinstance(item, dict):
            out.update(flatten_set(item, path, f"{full}."))
        else:
            out[full] = as_text(item)
    return out


def run_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action of the options a grid file may set."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_IN_FILES}


def file_defaults(parser: argparse.ArgumentParser, path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The file's options as argparse defaults (dest -> value) and its `set:` keys."""
    data = read_mapping(path)
    options = run_options(parser)
    valid = ", ".join(sorted(d.replace("_", "-") for d in options) + ["set"])
    defaults: dict[str, Any] = {}
    overrides: dict[str, str] = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest == "set":
            overrides = flatten_set(value, path)
            continue
        if dest not in options:
            raise HarnessError(f"{path}: unrecognized option {str(key)!r} (valid: {valid})")
        action, flag = options[dest], options[dest].option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise HarnessError(f"{path}: {key} takes true or false, got {as_text(value)!r}")
            defaults[dest] = value
            continue
        text = as_text(value)
        if dest == "seeds" and isinstance(value, (list, tuple)) and len(value) == 1:
            text += ","  # a one-element list is a seed, not a count
        if action.choices is not None and text not in action.choices:
            raise HarnessError(f"{path}: argument {flag}: invalid choice: {text!r} "
                               f"(choose from {', '.join(map(str, action.choices))})")
        if action.type is not None:
            try:
                defaults[dest] = action.type(text)
            except (TypeError, ValueError):
                raise HarnessError(f"{path}: argument {flag}: invalid {action.type.__name__} value: {text!r}") from None
        else:
            defaults[dest] = text
    return defaults, overrides


def grid_file(args: argparse.Namespace) -> Path | None:
    """The file a command's `--config` or `--preset` names (not both), or None."""
    config, preset = getattr(args, "config", None), getattr(args, "preset", None)
    if config and preset:
        raise HarnessError("give --config FILE or --preset NAME, not both")
    if preset:
        return preset_path(preset)
    return Path(config) if config else None


def parse_with_file(parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, argv: list[str] | None):
    """Parse `argv`; when it names a grid file for `sub`, parse again with the file's options as
    defaults of `sub`, so that flags on the command line win. Returns (args, `FileOrigin` or None)."""
    args = parser.parse_args(argv)
    path = grid_file(args)
    if path is None or getattr(args, "command", None) != sub.prog.split()[-1]:
        return args, None
    defaults, overrides = file_defaults(sub, path)
    saved = {dest: sub.get_default(dest) for dest in defaults}
    sub.set_defaults(**defaults)
    try:
        args = parser.parse_args(argv)
    finally:
        sub.set_defaults(**saved)
    given = [a.split("=", 1)[0] for a in (argv or []) if a.startswith("--")]
    flags = [run_options(sub)[dest].option_strings[-1] for dest in defaults]
    return args, FileOrigin(path, [f for f in flags if f not in given], overrides)


class FileOrigin:
    """What a grid file set and the command line did not override: errors about those name the file."""

    def __init__(self, path: Path, flags: list[str], overrides: dict[str, str]):
        self.path, self.flags, self.overrides = path, flags, overrides

    def blame(self, exc: HarnessError, cli_overrides: dict[str, str]) -> HarnessError:
        message = str(exc)
        keys = [k for k in self.overrides if k not in cli_overrides]
        sections = {k.split(".", 1)[0] for k in keys}
        if (any(flag in message for flag in self.flags) or any(key in message for key in keys)
                or any(f"section {s!r}" in message or f"{s}.*" in message for s in sections)):
            return HarnessError(f"{self.path}: {message}")
        return exc
