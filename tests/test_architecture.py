"""The package's shape: layers are folders, and a module imports only from its own folder or from
folders below it in `LAYERS` (even lazily, inside a function); no cycles; nothing imports the CLI;
the resume format is known to one module."""

from __future__ import annotations

import ast
from pathlib import Path

import graft

PACKAGE = Path(graft.__file__).parent
# lowest first: a folder may import from the folders before it, never from those after it
LAYERS = (
    "core",
    "data",
    "models",
    "frozen",
    "training",
    "selection",
    "inference",
    "outputs",
    "workflows",
    "serve",
    "cli",
)


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module ('core.config'): graft modules it imports anywhere in the file}"""
    graph = {}
    for path in package.rglob("*.py"):
        name = _module_name(path, package)
        here = name.split(".")[:-1] if path.stem != "__init__" else name.split(".")
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 0:
                if node.module and node.module.startswith("graft."):
                    found.add(node.module.removeprefix("graft."))
                continue
            base = here[: len(here) - (node.level - 1)]
            if node.module:
                found.add(".".join([*base, node.module]))
            else:
                found.update(".".join([*base, a.name]) for a in node.names)
        graph[name] = found - {name}
    return graph


def _layer(module: str) -> str:
    return module.split(".")[0]


def _upward(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, deps in graph.items():
        if _layer(m) not in LAYERS:
            continue  # graft/__init__.py and __main__.py sit above every layer
        for dep in deps:
            if _layer(dep) in LAYERS and LAYERS.index(_layer(dep)) > LAYERS.index(_layer(m)):
                bad.append(f"{m} imports {dep}")
    return sorted(bad)


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


def test_every_module_sits_in_a_layer_folder():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert loose == []
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert folders == sorted(LAYERS)


def test_imports_point_down_the_layers():
    assert _upward(_imports()) == []


def test_an_upward_import_is_caught(tmp_path):
    """The rule bites: a core module that imports from training is reported."""
    for folder in ("core", "training"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "training" / "loop.py").write_text("from ..core.errors import GraftError\n")
    (tmp_path / "core" / "config.py").write_text("def f():\n    from ..training.loop import fit\n")
    assert _upward(_imports(tmp_path)) == ["core.config imports training.loop"]


def test_imports_form_no_cycle():
    modules = _imports()
    graph = {m: {d for d in deps if d in modules} for m, deps in modules.items()}
    assert _cycle(graph) is None


def test_nothing_imports_the_cli():
    assert [
        m
        for m, deps in _imports().items()
        if _layer(m) != "cli" and m != "__main__" and any(_layer(d) == "cli" for d in deps)
    ] == []


def test_the_resume_format_lives_in_checkpoint_alone():
    users = [
        _module_name(p)
        for p in PACKAGE.rglob("*.py")
        if "LAST_META" in p.read_text(encoding="utf-8")
    ]
    assert sorted(users) == ["core.runfolder", "training.checkpoint"]


def test_public_functions_are_not_shadowed_by_their_modules():
    """graft.report and graft.export are functions even after their modules are imported."""
    import graft.inference.export
    import graft.outputs.report

    assert callable(graft.export) and graft.export.__module__ == "graft.inference.export"
    assert callable(graft.report) and graft.report.__name__ == "build_report"
