"""docs/architecture.md names every module, and the rooms keep their shape."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "architecture.md").read_text()


def modules() -> list[tuple[Path, str]]:
    """Every module of the project with the name docs/architecture.md gives it."""
    out = []
    for pkg in ("coordinator", "agents"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if path.stem in ("__init__", "__main__") or "bench" in rel.parts:
                continue
            room = rel.parts[1] if len(rel.parts) > 2 else ""
            name = f"{room}.{path.stem}" if room in ("ctl", "planner") else path.stem
            out.append((rel, name))
    return out


@pytest.mark.parametrize(("path", "name"), modules(), ids=[str(p) for p, _ in modules()])
def test_every_module_has_a_row_in_docs_architecture(path: Path, name: str) -> None:
    assert f"| `{name}` |" in DOC, f"{path}: no row `{name}` in docs/architecture.md"


def test_the_modules_of_the_house_are_found() -> None:
    names = {n for _, n in modules()}
    # A walk that found nothing would pass the test above vacuously.
    assert {"service", "barrier", "runs", "agent", "errors", "ctl.main", "planner.plan"} <= names


def test_no_module_imports_a_private_name_of_another() -> None:
    found = []
    for path, _ in modules():
        tree = ast.parse((ROOT / path).read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0]
                in (
                    "coordinator",
                    "agents",
                )
            ):
                found += [f"{path}: {node.module}.{a.name}" for a in node.names if _private(a.name)]
    assert found == []


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# Private names of other libraries the project has to reach (argparse's subparsers type, and
# pgserver's registry of servers, which it offers no other way to reset).
THIRD_PARTY_PRIVATE = {
    "argparse._SubParsersAction",
    "PostgresServer._instances",
    "PostgresServer._lock",
}


def test_no_module_reaches_into_another_objects_private_members() -> None:
    """`self.daemon._finish()` or `module._helper` from outside: a private member reached
    through another object (a chain of attributes) or through an imported name. A method's
    own instances (`self._x`, `other._x` in `__eq__`, `t._x` in a classmethod) are its own."""
    found = []
    for path, _ in modules():
        tree = ast.parse((ROOT / path).read_text())
        imported = {
            (a.asname or a.name).split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, ast.Import | ast.ImportFrom)
            for a in n.names
        }
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            through = node.value
            if isinstance(through, ast.Name) and through.id not in imported:
                continue
            if ast.unparse(node) not in THIRD_PARTY_PRIVATE:
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_no_circle_of_imports() -> None:
    """Not even one hidden behind TYPE_CHECKING or a function-level import: grimp sees both."""
    import grimp

    graph = grimp.build_graph("coordinator", "agents", include_external_packages=False)
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(dep) == 1:
                circles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, path)
        path.pop()
        state[module] = 2

    for module in sorted(graph.modules):
        if module not in state:
            visit(module, [])
    assert len(graph.modules) > 40  # the walk saw the house
    assert circles == []


def cited_sources() -> list[tuple[str, str]]:
    """(document, path) of every `….py` source the README and docs/ cite in backticks."""
    import re

    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        found = set(re.findall(r"`([A-Za-z0-9_./-]+\.py)[`:]", doc.read_text()))
        out.extend((doc.name, path) for path in sorted(found))
    return out


@pytest.mark.parametrize(
    ("doc", "path"), cited_sources(), ids=[f"{d}:{p}" for d, p in cited_sources()]
)
def test_every_source_file_the_docs_cite_exists(doc: str, path: str) -> None:
    """A path with a folder is from the repository root or from coordinator/ (`core/batch.py`);
    a bare test module's name is found under tests/. Other bare names (`vm.py`) are read in
    the context of the paragraph and not checked."""
    if "/" in path:
        assert (ROOT / path).is_file() or (ROOT / "coordinator" / path).is_file(), (
            f"{doc} cites {path}, which is not in the repository (moved or renamed?)"
        )
    elif path.startswith("test_"):
        assert list((ROOT / "tests").rglob(path)), f"{doc} cites {path}, found nowhere under tests/"
