"""The shape of the house: no import cycle among the project's modules, no module over 500 lines,
and the lower layers (algorithms/, tasks/, noise/) never reaching into the training loop.

The imports are read with `ast`, not by importing: module-level and function-level imports both
count (a lazy import still ties two modules together), imports under `if TYPE_CHECKING:` do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "algorithms", "tasks", "noise", "reports")
LOWER_LAYERS = ("algorithms", "tasks", "noise")
FORBIDDEN_FOR_LOWER = ("harness.trainer", "harness.rollout", "harness.grid")
MAX_LINES = 500

OVER_LIMIT_ALLOWED: set[str] = set()  # a module that must stay longer, named here with the reason


def _project_modules() -> dict[str, Path]:
    """Every project module by dotted name (`harness.grid`, `harness/__init__` as `harness`)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted names a module imports (absolute, relative imports resolved), skipping
    `if TYPE_CHECKING:` bodies. `from a import b` yields `a.b`, which resolves to the module `a.b`
    when b is a submodule and to `a` otherwise (a package's own `__init__` is not an edge)."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def _import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a name resolves to the longest module prefix)."""
    modules = _project_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = set()
        for name in _imported_names(tree, module, path.name == "__init__.py"):
            parts = name.split(".")
            for cut in range(len(parts), 0, -1):
                candidate = ".".join(parts[:cut])
                if candidate in modules:
                    if candidate != module:
                        targets.add(candidate)
                    break
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def _one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A concrete path a -> ... -> a inside a strongly connected component, for the message."""
    members = set(component)
    start = component[0]
    previous = {start: None}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for target in sorted(graph[node] & members):
            if target == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, node, start]
            if target not in previous:
                previous[target] = node
                frontier.append(target)
    return component


def test_the_graph_walker_sees_lazy_imports_and_skips_type_checking_blocks():
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "if TYPE_CHECKING:\n    from harness import trainer\n"
        "def f():\n    from harness.grid import run_grid\n    import noise.spec\n"
    )
    names = _imported_names(ast.parse(source), "harness.cli", is_package=False)
    assert "harness.sibling" in names
    assert "harness.grid.run_grid" in names and "noise.spec" in names
    assert "harness.trainer" not in names
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _one_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_no_import_cycle_among_the_project_modules():
    graph = _import_graph()
    assert "harness.grid" in graph and "algorithms.ppo" in graph  # the walk found the project
    cycles = [
        " -> ".join(_one_cycle(graph, component)) + f" (all of {', '.join(component)})"
        for component in _cycles(graph)
    ]
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_no_project_module_over_500_lines():
    too_long = []
    for path in _project_modules().values():
        relative = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and relative not in OVER_LIMIT_ALLOWED:
            too_long.append(f"{relative} ({lines} lines)")
    assert not too_long, f"modules over {MAX_LINES} lines: " + ", ".join(too_long)


@pytest.mark.parametrize("layer", LOWER_LAYERS)
def test_lower_layers_never_import_the_trainer_rollout_or_grid(layer):
    graph = _import_graph()
    offending = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if module.split(".")[0] == layer
        for target in targets
        if any(target == f or target.startswith(f + ".") for f in FORBIDDEN_FOR_LOWER)
    )
    assert not offending, "; ".join(offending)
