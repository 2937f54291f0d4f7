"""The package order of docs/architecture.md, enforced: every import of every module (lazy
imports inside functions included) goes down the order, never up or sideways, and no modules
import each other in a cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "verydeep"
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

#: Lowest first. A module may import its own package and any package on an earlier line; the
#: packages that share a line (the jobs) may not import one another.
ORDER: list[tuple[str, ...]] = [
    ("errors",),
    ("core",),
    ("configs",),
    ("data",),
    ("runtime",),
    ("models",),
    ("formats",),
    ("hub",),
    ("evaluate", "extract", "train", "bench", "explain"),
    ("cli",),
]
#: The public façade and the ``python -m verydeep`` entry point sit above everything.
TOP = {"verydeep", "verydeep.__main__"}


def module_name(path: Path) -> str:
    parts = ["verydeep", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imported(path: Path, name: str) -> set[str]:
    """The verydeep modules ``path`` imports, at any depth of its code."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "verydeep"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "verydeep":
                continue
            for a in node.names:  # `from verydeep.x import y` imports the module x.y when y is one
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod)
    return {m for m in out if m != name}


GRAPH = {name: imported(path, name) for name, path in MODULES.items()}


def layer(module: str) -> tuple[int, str]:
    """(position in ORDER, package) of a module below the façade."""
    package = module.split(".")[1]
    for i, names in enumerate(ORDER):
        if package in names:
            return i, package
    raise AssertionError(f"{module}: package {package!r} is not in the documented order")


def test_every_package_is_in_the_order():
    for module in MODULES:
        if module not in TOP:
            layer(module)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in TOP))
def test_imports_go_down_the_order(module):
    here, package = layer(module)
    for target in sorted(GRAPH[module]):
        assert target not in TOP, f"{module} imports the façade {target}; import the defining module instead"
        there, other = layer(target)
        if other == package:
            continue
        assert there < here, f"{module} imports {target}: {other!r} is not below {package!r}"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if state.get(t) == 1:
                cycle = path[path.index(t) :] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t in GRAPH and state.get(t) is None:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if state.get(m) is None:
            visit(m)


def test_architecture_doc_states_the_same_order():
    text = DOC.read_text()
    found = re.search(r"<!-- package order -->\n```\n(.*?)```", text, re.S)
    assert found, f"{DOC}: no package order block"
    lines = [tuple(p.strip() for p in line.split("|")) for line in found[1].strip().splitlines()]
    assert lines == list(reversed(ORDER)), "docs/architecture.md lists a different package order"
