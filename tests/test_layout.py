"""The layered layout: no import points upwards, no import cycle (local imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "curvkit"

#: Layer of each first-level name under ``curvkit``; a module may import its own
#: package and anything in a lower layer (not a sibling package of the same layer).
LAYERS = {
    "errors": 0,
    "timing": 0,
    "records": 1,
    "data": 1,
    "problems": 1,
    "extraction": 2,
    "operators": 3,
    "diagnostics": 4,
    "optim": 4,
    "plotting": 5,
    "distributed": 5,
    "": 5.5,  # the lazy public namespace: for the applications only
    "app": 6,
    "__main__": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every ``curvkit`` module ``path`` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "curvkit")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "curvkit":
                continue
            for alias in node.names:  # ``from curvkit.x import submodule`` or a name
                candidate = f"{node.module}.{alias.name}"
                if is_module(candidate):
                    found.add(candidate)
                elif candidate != "curvkit.__version__":
                    found.add(node.module)
    return found


def is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


GRAPH = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_first_level_name_has_a_layer():
    assert {top(m) for m in GRAPH} <= set(LAYERS), {top(m) for m in GRAPH} - set(LAYERS)


@pytest.mark.parametrize("module", sorted(GRAPH), ids=sorted(GRAPH))
def test_no_upward_import(module):
    here = top(module)
    bad = [
        target
        for target in sorted(GRAPH[module])
        if here and top(target) != here and LAYERS[top(target)] >= LAYERS[here]
    ]
    assert not bad, f"{module} (layer {LAYERS[here]}) imports {bad}"


def test_no_import_cycle():
    def resolve(target: str) -> str:
        while target not in GRAPH and "." in target:
            target = target.rsplit(".", 1)[0]
        return target

    edges = {m: {resolve(t) for t in ts} - {m} for m, ts in GRAPH.items()}
    # a package's __init__ importing its own sub-modules is a re-export, not a cycle
    for m in edges:
        edges[m] = {t for t in edges[m] if not t.startswith(m + ".")}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == "open":
                cycle = stack[stack.index(t) :] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_at_most_eight_modules_at_the_top():
    assert len(list(PACKAGE.glob("*.py"))) <= 8


def test_every_module_is_named_in_the_architecture_notes():
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "__init__.py"
        and f"`{path.name}`" not in text
        and f"`curvkit/{path.relative_to(PACKAGE)}`" not in text
    ]
    assert not missing, f"docs/architecture.md does not name {missing}"
