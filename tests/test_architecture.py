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


def package_of(module: str) -> str:
    """buildseg.inference.core.engines -> buildseg.inference.core; top-level modules are their own."""
    parts = module.split(".")
    if len(parts) <= 2:
        return module
    return ".".join(parts[:3]) if parts[1] == "inference" and len(parts) > 3 else ".".join(parts[:2])


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, deps in import_graph().items():
        here = package_of(module)
        graph.setdefault(here, set()).update(package_of(d) for d in deps if package_of(d) != here)
    for deps in list(graph.values()):
        for d in deps:
            graph.setdefault(d, set())
    return graph


def test_no_loop_between_packages():
    """Packages (and inference's three layers) form no cycle: a dependency points one way."""
    assert cycles(package_graph()) == []


def _bad(layer: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in import_graph().items() if m == layer or m.startswith(layer + ".")
                  for d in deps if any(d == f or d.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("layer, forbidden", [
    ("buildseg.config", ("buildseg.data", "buildseg.training", "buildseg.inference")),
    ("buildseg.settings", ("buildseg.data", "buildseg.models", "buildseg.training", "buildseg.inference",
                           "buildseg.config", "buildseg.evaluation")),
    ("buildseg.data", ("buildseg.evaluation", "buildseg.instance_metrics", "buildseg.metrics", "buildseg.inference",
                       "buildseg.training")),
    ("buildseg.inference.core", ("buildseg.inference.jobs", "buildseg.inference.runners",
                                 "buildseg.inference.prediction")),
    ("buildseg.inference.jobs", ("buildseg.inference.runners", "buildseg.inference.prediction")),
    ("buildseg.adaptation", ("buildseg.inference.jobs", "buildseg.inference.runners", "buildseg.inference.prediction")),
])
def test_lower_layers_import_no_higher_one(layer, forbidden):
    assert _bad(layer, forbidden) == []


def private_uses() -> list[str]:
    """``module._name`` calls and ``from module import _name`` across buildseg modules."""
    paths = {module_name(p): p for p in SRC.rglob("*.py")}
    found = []
    for name, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("buildseg"):
                for a in node.names:
                    target = f"{node.module}.{a.name}"
                    if target in paths:
                        aliases[a.asname or a.name] = target
                    elif a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{name} imports {node.module}.{a.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{name} uses {aliases[node.value.id]}.{node.attr}")
    return sorted(found)


def test_no_module_uses_another_modules_private_names():
    assert private_uses() == []


def test_the_rules_catch_what_they_forbid():
    """The checks fail on the import that breaks them (a loop, a private name)."""
    assert cycles({"buildseg.a": {"buildseg.b"}, "buildseg.b": {"buildseg.a"}}) == [["buildseg.a", "buildseg.b"]]
    assert package_of("buildseg.inference.core.engines") == "buildseg.inference.core"
    assert package_of("buildseg.data.store") == "buildseg.data"


def test_no_function_in_src_is_longer_than_60_lines():
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(SRC)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []


def test_cli_only_parses_and_calls():
    assert len((SRC / "buildseg" / "cli.py").read_text(encoding="utf-8").splitlines()) <= 350
