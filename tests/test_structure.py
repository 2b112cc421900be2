"""The package's import graph has no cycle (module-level or inside functions): each module can be read,
changed and tested on its own, and `modelfs cache` commands never drag the FUSE side in."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import modelfs

ROOT = Path(modelfs.__file__).parent


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        mod = ".".join(("modelfs", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("modelfs"):
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("modelfs")]
            for name in names:
                if (ROOT.joinpath(*name.split(".")[1:]).with_suffix(".py").exists()
                        or (ROOT.joinpath(*name.split(".")[1:]) / "__init__.py").exists()):
                    graph[mod].add(name)
    return graph


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "modelfs.mount" in graph and "modelfs.core" in graph  # the walk found the package
    cycles: set[str] = set()

    def walk(node: str, path: list[str]) -> None:
        for dep in graph.get(node, ()):
            if dep in path:
                cycles.add(" -> ".join([*path[path.index(dep):], dep]))
            elif dep != node:
                walk(dep, [*path, dep])

    for node in list(graph):
        walk(node, [node])
    assert not cycles, sorted(cycles)


def test_cache_admin_does_not_import_the_fuse_side() -> None:
    graph = import_graph()
    seen: set[str] = set()
    todo = ["modelfs.admin"]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo += graph.get(mod, ())
    assert not seen & {"modelfs.mount", "modelfs.fs"}, sorted(seen)
