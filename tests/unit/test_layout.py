"""Sizes a reader can hold and a layout the formatter owns: the library's modules, functions and
classes stay small, no module imports one that imports it back, and ``# fmt: skip`` stands only
where alignment carries meaning (a data table, with an ``# aligned:`` comment saying why on the
line above)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "src" / "headperturb"

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 8
MAX_CLASS_LINES = 200

pytestmark = pytest.mark.unit


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = node.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return [n for n in names if n not in ("self", "cls")]


def test_library_sizes():
    too_big = []
    for name, path in _modules().items():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            too_big.append(f"module {name}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            span = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if span > MAX_FUNCTION_LINES:
                    limit = MAX_FUNCTION_LINES
                    too_big.append(f"{name}.{node.name}: {span} lines (at most {limit})")
                n = len(_parameters(node))
                if n > MAX_PARAMETERS:
                    too_big.append(f"{name}.{node.name}: {n} parameters (at most {MAX_PARAMETERS})")
            elif isinstance(node, ast.ClassDef) and span > MAX_CLASS_LINES:
                limit = MAX_CLASS_LINES
                too_big.append(f"class {name}.{node.name}: {span} lines (at most {limit})")
    assert not too_big, "\n".join(too_big)


def _imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in it (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {name for name in found if name in known}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_import_cycles_found():
    """The check itself: a cycle of three is found, a chain is not."""
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    # a package's __init__ importing nothing of its own is the rule here: no edge from a module
    # to its package counts as a cycle through it
    graph = {
        name: {d for d in deps if not name.startswith(d + ".")} for name, deps in graph.items()
    }
    assert import_cycles(graph) == []


def _python_and_snakemake_files() -> list[Path]:
    paths = [ROOT / "Snakefile", *sorted((ROOT / "workflow").rglob("*.smk"))]
    for folder in ("src", "workflow", "tests", "benchmarks"):
        paths += sorted((ROOT / folder).rglob("*.py"))
    return paths


def test_fmt_skip_only_for_aligned_tables():
    unexplained = []
    for path in _python_and_snakemake_files():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "fmt: skip" in line and "fmt: skip" not in line.split("#", 1)[0]:
                before = lines[i - 1].strip() if i else ""
                if not before.startswith("# aligned:") and path != Path(__file__):
                    unexplained.append(f"{path.relative_to(ROOT)}:{i + 1}")
    assert not unexplained, "fmt: skip without an '# aligned:' reason above:\n" + "\n".join(
        unexplained
    )


def _resolves(dotted: str) -> bool:
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_names_in_docstrings_and_docs_exist():
    """Every ``headperturb.x.y`` that the code, the rules or the docs name is there to import."""
    import re

    named = re.compile(r"(?<![\w/])(headperturb(?:\.[A-Za-z_]\w*)+)")
    paths = [*sorted(LIBRARY.rglob("*.py")), *sorted((ROOT / "workflow").rglob("*.smk"))]
    paths += [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md", ROOT / "Snakefile"]
    missing = sorted(
        {
            f"{path.relative_to(ROOT)}: {name.rstrip('.')}"
            for path in paths
            for name in named.findall(path.read_text())
            if not _resolves(name.rstrip("."))
        }
    )
    assert not missing, "\n".join(missing)
