"""The package's shape: imports flow one way (no cycles, even through lazy imports), nothing
imports the CLI, and the resume format is known to one module."""

from __future__ import annotations

import ast
from pathlib import Path

import graft

PACKAGE = Path(graft.__file__).parent


def _imports() -> dict[str, set[str]]:
    """{module: graft modules it imports anywhere in the file (top level or inside functions)}"""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(a.name for a in node.names)
        graph[path.stem] = found - {path.stem}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return trail + [m, n]
            if n not in state and (found := visit(n, trail + [m])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [])):
            return found
    return None


def test_imports_form_no_cycle():
    assert _cycle(_imports()) is None


def test_nothing_imports_the_cli_and_edges_point_down():
    graph = _imports()
    assert not [m for m, deps in graph.items() if "cli" in deps and m != "__main__"]
    assert "predict" not in graph["explain"]  # explain is used by predict, never the reverse
    assert graph["serve"] <= {"predict", "errors", "webpage"}
    assert graph["config"] <= {"errors", "images", "runtime", "runfolder"}
    assert graph["images"] <= {"errors"}
    assert graph["runtime"] <= {"errors"}


def test_the_resume_format_lives_in_checkpoint_alone():
    users = [p.stem for p in PACKAGE.glob("*.py")
             if "LAST_META" in p.read_text(encoding="utf-8")]  # fmt: skip
    assert sorted(users) == ["checkpoint", "runfolder"]


def test_public_functions_are_not_shadowed_by_their_modules():
    """graft.report and graft.export are functions even after their modules are imported."""
    import graft.export
    import graft.report

    assert callable(graft.export) and graft.export.__module__ == "graft.export"
    assert callable(graft.report) and graft.report.__name__ == "build_report"
