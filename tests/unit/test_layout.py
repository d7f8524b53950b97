"""The tree tells the design (ARCHITECTURE.md): few modules at the top, no runtime import
cycle, no module over 300 lines, and nothing in the runtime imports the dev tooling."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from ext_proc.dev.devstack import ROOT

PACKAGE: Final = ROOT / "ext_proc"
MAX_TOP_LEVEL: Final = 10
MAX_LINES: Final = 300
WINGS: Final = ("h2grpc", "exchange", "policy", "telemetry", "request", "config",
                "envoy_config", "dev")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if "_gen" in path.relative_to(PACKAGE).parts:
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES: Final = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every module `tree` imports at run time (anywhere but under TYPE_CHECKING).

    `from package import submodule` is an edge to the submodule only: a package's
    __init__ that gathers its own submodules (a facade) is not a cycle."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imported(child, module, is_package)
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # a submodule, else a name from the module itself
                full = f"{base}.{alias.name}"
                yield full if full in MODULES else base
        yield from _imported(node, module, is_package)


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        targets = {_resolve(n) for n in _imported(tree, name, path.name == "__init__.py")
                   if n.startswith("ext_proc")}
        graph[name] = {t for t in targets if t and t != name and t != "ext_proc"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_runtime_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    # cli imports the app inside `serve` (a lazy import): still an edge
    assert "ext_proc.app" in graph["ext_proc.cli"]


def test_few_modules_at_the_top() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, top


def test_the_wings_are_there() -> None:
    for wing in WINGS:
        assert (PACKAGE / wing / "__init__.py").is_file(), wing
        assert ast.get_docstring(ast.parse((PACKAGE / wing / "__init__.py").read_text())), \
            f"{wing}/__init__.py says what the wing is"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_over_300_lines(name: str) -> None:
    assert len(MODULES[name].read_text().splitlines()) <= MAX_LINES


def test_the_runtime_never_imports_the_dev_tooling() -> None:
    def dev(name: str) -> bool:
        return name == "ext_proc.dev" or name.startswith("ext_proc.dev.")

    leaks = {name: sorted(filter(dev, targets))
             for name, targets in import_graph().items() if not dev(name)}
    assert {k: v for k, v in leaks.items() if v} == {}


def test_the_request_vocabulary_imports_no_other_wing() -> None:
    graph = import_graph()
    allowed = ("ext_proc.request.", "ext_proc.config", "ext_proc._gen.")
    for name, targets in graph.items():
        if name.startswith("ext_proc.request."):
            assert all(t.startswith(allowed) for t in targets), (name, targets)


def test_architecture_names_only_modules_that_exist() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:[a-z_0-9]+/)+[a-z_0-9]*\.py|[a-z_0-9]+\.py)`", text))
    assert len(named) > 20
    missing = {n for n in named if not (PACKAGE / n).exists() and not (ROOT / n).exists()}
    assert not missing, f"ARCHITECTURE.md names modules that do not exist: {missing}"
