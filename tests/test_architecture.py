"""The layering the README describes: no import cycles in the runtime, kernels independent of it.

Imports are read from the source (every `import` statement, at the top or
inside a function), so a cycle hidden behind a lazy import counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Module name -> file, for the runtime and the kernels (installed as fastcodegen.kernels)."""
    out = {}
    for path in (ROOT / "fastcodegen").rglob("*.py"):
        if "data" in path.relative_to(ROOT / "fastcodegen").parts:
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "kernels").glob("*.py"):
        name = "fastcodegen.kernels" if path.stem == "__init__" else f"fastcodegen.kernels.{path.stem}"
        out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (a package's own __init__ is not counted as an import of it)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            stem = node.module if node.level == 0 else ".".join(p for p in (base, node.module) if p)
            targets = [f"{stem}.{a.name}" for a in node.names] + [stem]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t != "fastcodegen":
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_the_runtime_has_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_kernels_depend_on_the_runtime_only_for_the_weight_layout():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("fastcodegen.kernels"):
            outside = {d for d in deps if not d.startswith("fastcodegen.kernels")}
            assert outside <= {"fastcodegen.weights"}, (name, outside)
