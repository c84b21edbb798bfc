"""No import cycles among denoisplit_zoo's modules, counting imports inside functions too (they hide an edge, they
do not remove it): data must flow one way through the pipeline stages."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "denoisplit_zoo"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its file (top level or inside functions)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                    root = ".".join(base + ([node.module] if node.module else []))
                else:
                    root = node.module or ""
                # `from . import export` names a module; `from .export import x` names one too (its parent)
                targets = [f"{root}.{a.name}" if f"{root}.{a.name}" in modules else root for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != mod and not (mod.startswith(t + ".") and t == "denoisplit_zoo"):
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if colour.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in colour and (found := visit(m)):
                return found
        stack.pop()
        colour[n] = 2
        return None

    for n in sorted(graph):
        if n not in colour and (found := visit(n)):
            return found
    return None


def test_the_graph_sees_function_local_imports():
    g = import_graph()
    assert "denoisplit_zoo.package.reader" in g["denoisplit_zoo.pretrained"]  # imported inside _from_package
    assert "denoisplit_zoo.package.layout" in g["denoisplit_zoo.package.zoo"]  # `from . import layout as L`


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lint_gate():
    """ruff with the small rule set of pyproject.toml ([tool.ruff.lint]) over the package, tests and benchmarks."""
    import shutil
    import subprocess

    ruff = shutil.which("ruff")
    assert ruff, "ruff is part of the [test] extra: pip install -c constraints.txt -e '.[test,bmz]'"
    root = PKG.parent
    p = subprocess.run([ruff, "check", "--no-cache", "denoisplit_zoo", "tests", "benchmarks"], cwd=root,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-1000:]
