"""The package's shape: imports flow one way (no circle), and docs/design.md names every module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "exporter"


def _imports() -> dict[str, set[str]]:
    """exporter module -> the exporter modules it imports (anywhere in it, lazily too)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = f"exporter.{path.stem}"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "exporter":
                    found.update(f"exporter.{alias.name}" for alias in node.names)
                elif node.module.startswith("exporter."):
                    found.add(".".join(node.module.split(".")[:2]))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("exporter."):
                        found.add(".".join(alias.name.split(".")[:2]))
        graph[name] = {m for m in found if m != name and m != "exporter.simulator"}
    return graph


def test_imports_flow_one_way() -> None:
    graph = _imports()
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "visiting"
        path.append(module)
        for dependency in sorted(graph.get(module, ())):
            if state.get(dependency) == "visiting":
                circle = [*path[path.index(dependency) :], dependency]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if dependency not in state:
                visit(dependency)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_only_the_cli_and_the_demo_import_the_simulator() -> None:
    users = set()
    for path in PACKAGE.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        if "exporter.simulator" in text:
            users.add(path.stem)
    assert users <= {"cli", "demo"}


def test_design_names_every_module() -> None:
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    for path in sorted(PACKAGE.glob("*.py")):
        assert f"`exporter/{path.name}`" in design, f"docs/design.md does not name {path.name}"
