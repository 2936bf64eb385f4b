"""The package's layers only point down, and no her2lab module imports itself round a circle.

Static (``ast``), so cheap: every ``import`` of a her2lab module counts, at the top of a file or
inside a function, since an import deferred into a function still makes the two modules depend
on each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "her2lab"


# Lowest first: a module may import its own layer and the ones before it.
LAYERS = [
    {"her2lab", "her2lab.errors", "her2lab.io", "her2lab.progress", "her2lab.checkpoint", "her2lab.pool",
     "her2lab.metrics", "her2lab.plots", "her2lab.config", "her2lab.registry"},
    {"her2lab.slides"},
    {"her2lab.embed"},
    {"her2lab.data"},
    {"her2lab.models"},
    {"her2lab.lit"},
    {"her2lab.eval", "her2lab.explain"},
    {"her2lab.run"},
    # the command line: the her2lab command, its --help, doctor, and the python -m entry points
    {"her2lab.cli", "her2lab.help", "her2lab.doctor", "her2lab.__main__", "her2lab.prepare", "her2lab.extract",
     "her2lab.cv", "her2lab.compare"},
]


# (importer, imported): upward imports that are known and have a reason; any other fails.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """her2lab modules each module imports (anywhere in the file), resolved to known modules."""
    graph: dict[str, set[str]] = {}
    for name, f in mods.items():
        pkg = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        found: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for t in targets:
                while t and t not in mods:  # ``from pkg import name``: name may be a function
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("her2lab"):
                    found.add(t)
        graph[name] = found
    return graph


def _layer(module: str) -> int:
    for rank, layer in reversed(list(enumerate(LAYERS))):
        if any(module == p or module.startswith(p + ".") for p in layer if p != "her2lab") or module in layer:
            return rank
    raise AssertionError(f"{module} is in no layer; add it to LAYERS in {__file__}")


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return _imports(_modules())


def test_no_import_circle_among_her2lab_modules(graph):
    # a package imports its own submodules (registries fill up on import): not a circle
    parents = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    assert _circles(parents) == []


def test_nothing_below_run_imports_run(graph):
    bad = {(m, t) for m, ts in graph.items() for t in ts
           if _layer(m) < _layer("her2lab.run") and t.startswith("her2lab.run")}
    assert bad <= KNOWN_UPWARD, f"new imports of her2lab.run from below it: {sorted(bad - KNOWN_UPWARD)}"


def test_layers_only_point_down(graph):
    up = {(m, t) for m, ts in graph.items() for t in ts if _layer(t) > _layer(m)}
    assert up <= KNOWN_UPWARD, f"imports of a higher layer: {sorted(up - KNOWN_UPWARD)}"
