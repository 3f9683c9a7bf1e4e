"""The package's shape: no import cycle (function-level imports included) and the layers'
directions (training and inference never import each other; models, runtime and formats
import neither). A new cycle fails here with the modules that form it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """buildseg module -> the buildseg modules it imports anywhere in its body."""
    paths = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                deps.update(f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names)
        graph[name] = {d for d in deps if d in paths and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_src():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("layer, forbidden", [
    ("buildseg.training", "buildseg.inference"),
    ("buildseg.inference", "buildseg.training"),
    ("buildseg.models", "buildseg.training"),
    ("buildseg.models", "buildseg.inference"),
    ("buildseg.runtime", "buildseg.training"),
    ("buildseg.runtime", "buildseg.inference"),
    ("buildseg.formats", "buildseg.training"),
    ("buildseg.formats", "buildseg.inference"),
])
def test_layers_point_down_the_pipeline(layer, forbidden):
    bad = sorted(f"{m} -> {d}" for m, deps in import_graph().items() if m.startswith(layer)
                 for d in deps if d.startswith(forbidden))
    assert bad == []
