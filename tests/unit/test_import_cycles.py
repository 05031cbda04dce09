"""No import cycles between sagaflow's modules, not even ones held apart by a function-level import.

The graph is static: every module of the installed package (``sagaflow/`` and the folders installed as
``sagaflow.web``, ``sagaflow.tasks``, ``sagaflow.config``) is parsed with ``ast``, and every ``import`` and
``from ... import`` in it counts, wherever it stands (module level, inside a function, under
``TYPE_CHECKING``), relative imports resolved against the importing module's package.

The rule for packages: an import names exactly one module, and the edge goes to that module only.
``import sagaflow.a.b`` and ``from sagaflow.a.b import x`` are edges to ``sagaflow.a.b``; ``from sagaflow.a
import b`` is an edge to ``sagaflow.a.b`` when that is a module, else to ``sagaflow.a`` (its ``__init__``).
Python also runs the ``__init__`` of every parent package first, but that is not an edge: otherwise every
module would "import" ``sagaflow/__init__``, which imports ``sagaflow.runtime`` and ``sagaflow.client`` to
declare the Celery tasks, and everything would be one cycle. What the rule does catch is a module that names
a package's ``__init__`` itself (``from sagaflow import Saga``, ``from sagaflow.runtime import x``): that is
an edge to the ``__init__``, and the ``__init__``'s own imports count like any module's.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

FOLDERS = {"sagaflow": ROOT / "sagaflow", "sagaflow.web": ROOT / "web", "sagaflow.tasks": ROOT / "tasks",
           "sagaflow.config": ROOT / "config"}


def modules() -> dict[str, tuple[Path, bool]]:
    """Installed module name -> (its file, whether it is a package's ``__init__``)."""
    found = {}
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            if "migrations" in rel.parts or (package == "sagaflow" and rel.parts[0] in ("web", "tasks", "config")):
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = (path, rel.name == "__init__")
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, (path, is_package) in known.items():
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                           for alias in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in known and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path back to its start) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan; the graph is small enough for recursion
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    found = []
    for component in components:
        start = min(component)
        path, seen = [start], {start}
        while True:  # walk inside the component until a module repeats
            nxt = min(m for m in graph[path[-1]] if m in component)
            if nxt in seen:
                found.append(path[path.index(nxt):] + [nxt] + [f"(all of: {', '.join(sorted(component))})"])
                break
            path.append(nxt)
            seen.add(nxt)
    return found


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    graph = import_graph()
    assert "sagaflow.runtime" in graph["sagaflow"]  # `from sagaflow import runtime`: the submodule
    assert "sagaflow.hosting" in graph["sagaflow.cli.processes"]  # imported inside a command's function


def test_no_import_cycles_between_sagaflow_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (a function-level import does not break one):\n" + "\n".join(
        " -> ".join(cycle) for cycle in found)
