"""The module graph follows the architecture: ``kernels/`` imports nothing of the project above
it, ``pipeline/`` (the library) imports no Luigi and nothing from ``tasks/``, and no project
module imports itself again through others (no import cycles), counting imports inside
functions too."""
import ast
from pathlib import Path

from conftest import ROOT
from pipeline.artifacts import imported_modules, module_file


def project_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def every_import(path: Path) -> set[str]:
    """Every module name ``path`` imports, the project's and others', top level or in functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names


def test_the_library_imports_no_luigi_and_no_task():
    for path in project_files("pipeline"):
        bad = {n for n in every_import(path) if n.split(".")[0] in ("luigi", "tasks")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_kernels_import_nothing_above_them():
    for path in project_files("kernels"):
        bad = {n for n in every_import(path) if n.split(".")[0] in ("luigi", "tasks", "pipeline")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_no_import_cycles():
    graph = {p: {module_file(m) for m in imported_modules(p)} - {p}
             for pkg in ("pipeline", "kernels", "tasks") for p in project_files(pkg)}
    state: dict[Path, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(str(p.relative_to(ROOT)) for p in cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
