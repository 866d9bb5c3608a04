"""The house's shape: no import circle, and no arrow running back up from the lower floors."""

from __future__ import annotations

import ast
from pathlib import Path

import cxrtool

PACKAGE = Path(cxrtool.__file__).parent

# Floors that must not import (even lazily, inside a function) what is built on them.
LOWER = ("cxrtool.io", "cxrtool.models", "cxrtool.preprocess", "cxrtool.registry", "cxrtool.stages",
         "cxrtool.errors", "cxrtool._workers", "cxrtool._compat")
UPPER = ("cxrtool.runner", "cxrtool.predict", "cxrtool.explain", "cxrtool.evaluate", "cxrtool.train",
         "cxrtool.cli", "cxrtool.bundle_calibration", "cxrtool.radiomics")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(path: Path, name: str, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)  # a submodule imported by name
    return {m for m in out if m.startswith("cxrtool")}


def _within(module: str, floors: tuple[str, ...]) -> bool:
    return any(module == floor or module.startswith(floor + ".") for floor in floors)


def find_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle met walking the graph depth-first, as the modules around it."""
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1  # on the current trail
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                circles.append(trail[trail.index(child):] + [child])
            elif child not in state:
                visit(child, [*trail, child])
        state[node] = 2  # done

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return circles


def test_no_module_imports_a_module_that_imports_it_back():
    modules = _modules()
    graph = {name: {m for m in _imports(path, name, top_level_only=True) if m in modules and m != name}
             for name, path in modules.items()}
    # A package's __init__ importing its own submodules is how packages re-export: not a circle.
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    assert sum(len(edges) for edges in graph.values()) > 100  # (the walk sees the imports)
    circles = find_circles(graph)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_lower_floors_never_import_the_upper_ones():
    wrong = []
    for name, path in _modules().items():
        if not _within(name, LOWER):
            continue
        for imported in _imports(path, name, top_level_only=False):
            if _within(imported, UPPER):
                wrong.append(f"{name} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_circle_and_a_wrong_arrow(tmp_path):
    """(The two tests above can fail: the same walk finds a planted circle.)"""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from cxrtool.runner import run_studies\nimport cxrtool.b\n")
    b.write_text("def f():\n    from cxrtool import a\n")
    assert "cxrtool.runner" in _imports(a, "cxrtool.a", top_level_only=True)
    assert "cxrtool.a" in _imports(b, "cxrtool.b", top_level_only=False)
    assert "cxrtool.a" not in _imports(b, "cxrtool.b", top_level_only=True)
    assert _within("cxrtool.runner", UPPER) and not _within("cxrtool.runners", UPPER)
    assert find_circles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z", "x"]]
    assert find_circles({"x": {"y"}, "y": set(), "w": {"x", "y"}}) == []
