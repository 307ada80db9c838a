"""The package's layout: one native boundary (python/ddetr/_native), imports without
cycles, every module importable on its own."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "ddetr"
NATIVE = PACKAGE / "_native"
# the extension's attributes, or the address of a tensor's data (spelt so that this file
# does not match itself)
BOUNDARY = re.compile(r"_C\.|data[_]ptr")
EXTENSION = "ddetr._C"  # compiled: a module that imports none of the package


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its __init__.py)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def test_only_the_native_package_reaches_the_extension():
    # No line outside python/ddetr/_native (code, comment or docstring) in the package,
    # the tests or the benchmarks names the extension's attributes or a data address:
    # the rest of the package, the tests and the benchmarks ask _native.
    hits = []
    for top in ("python", "tests", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts or NATIVE in path.parents:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue  # binary files
            hits += [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
                     for i, line in enumerate(text.splitlines(), 1) if BOUNDARY.search(line)]
    assert not hits, "outside python/ddetr/_native:\n" + "\n".join(hits)


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `module` imports anywhere in its file (inside functions
    too). ``from a import b`` imports a.b when that is a module, else a."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    known = {*modules, EXTENSION}
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # import a.b.c of a non-module c: a.b
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    # Module granularity: the explicit imports of each module. Importing a.b also runs
    # a/__init__.py, but that implicit edge to the parent package is left out (a package
    # importing its own modules is no cycle).
    modules = _modules()
    graph = {name: _imported(name, path, modules) for name, path in modules.items()}
    graph[EXTENSION] = set()
    # (the parser sees what it should)
    assert graph["ddetr.ops.msda"] >= {"ddetr._native", "ddetr._native.msda"}
    assert graph["ddetr._native.loader"] == {EXTENSION}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(_modules())
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
