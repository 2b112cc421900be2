"""The package's import graph. No cycle (module-level or inside functions): each module can be read,
changed and tested on its own, and `modelfs cache` commands never drag the FUSE side in. And the layer
rules, as a table: a module imports only modules of its own layer or of the layers below it, and a few pairs
are ruled out inside a layer. The table says how the data path is built (stores at the bottom, the FUSE
boundary and the daemon at the top); a new import against it fails here.

Imports the rules forbid that the code still makes are listed in KNOWN, each with why it is wrong: the
list may only shrink (an entry the code no longer needs fails too, so it is taken out when its import goes).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "modelfs"

#: Bottom to top, by package (a package's modules share its layer; the tree under modelfs/ is this table).
#: The fleet tier sits with the stores: it is one more source of an extent's bytes, behind the same small
#: interface as the origin (`remote.sources.Source`), wrapping it, and knows nothing of the cache that stores
#: them or of the versions they belong to.
LAYERS: list[tuple[str, set[str]]] = [
    ("foundation: errors, settings, counters, logs, supervision, health, retry policy", {
        "errors", "config", "stats", "logs", "faults", "mapped", "retry", "libc", "digest", "supervise",
        "health"}),
    ("stores: the origin (remote) and the fleet tier in front of it (shared)", {"remote", "shared"}),
    ("the catalog: versions, manifests and the chunk index", {"catalog"}),
    ("the cache on disk, its checks and its scrub", {"cache"}),
    ("fetch: GETs into the cache", {"fetch"}),
    ("serving: READs the daemon answers, files the kernel serves, the tree and its open files", {
        "reads", "passthrough", "tree"}),
    ("the core", {"core"}),
    ("the FUSE boundary", {"fuse"}),
    ("the daemon and the tools", {"service", "__main__"}),
]

#: Pairs ruled out even where the layers allow them: (importer, imported, why).
FORBIDDEN = [
    ("fetch", "shared", "the fetcher asks a Source for bytes; which one (the tier, the origin) is not its business"),
    ("passthrough", "fetch", "passthrough serves complete files; it never fetches"),
    ("passthrough", "reads", "a file the kernel serves and a READ the daemon answers meet only in the core"),
    ("reads", "passthrough", "a file the kernel serves and a READ the daemon answers meet only in the core"),
    ("tree", "fetch", "the tree knows names and versions, not bytes"),
    ("tree", "reads", "the tree knows names and versions, not bytes"),
]

#: Imports against the rules that the code still makes, with why each is wrong.
KNOWN: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports, anywhere in it (a function-level import counts too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            # `from modelfs.cache import integrity` depends on the module, not on the package's other names
            names = subs + ([node.module] if not all(s[len("modelfs."):] in modules for s in subs) else [])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.startswith("modelfs."):
                short = name[len("modelfs."):]
                if short in modules:
                    found.add(short)
            elif name == "modelfs" and isinstance(node, ast.ImportFrom):
                found.update(a.name for a in node.names if a.name in modules)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    files.pop("", None)
    modules = set(files)
    return {m: imports(p, modules) - {m} for m, p in files.items()}


def layer_of(modules: set[str]) -> dict[str, int]:
    """Each module's layer: that of the longest name in the table it is, or is in the package of."""
    out: dict[str, int] = {}
    for m in modules:
        best = max(((len(name), i) for i, (_, names) in enumerate(LAYERS) for name in names if within(m, name)),
                   default=None)
        if best is not None:
            out[m] = best[1]
    return out


def violations(g: dict[str, set[str]]) -> dict[tuple[str, str], str]:
    where, out = layer_of(set(g) | {d for deps in g.values() for d in deps}), {}
    for mod, deps in g.items():
        if mod not in where:
            continue
        for dep in deps:
            if dep in where and where[dep] > where[mod]:
                out[(mod, dep)] = f"{mod} ({LAYERS[where[mod]][0]}) imports {dep}, a layer above it"
                continue
            for a, b, why in FORBIDDEN:  # a package's rule holds for each of its modules
                if within(mod, a) and within(dep, b):
                    out[(mod, dep)] = why
    return out


def within(module: str, name: str) -> bool:
    """Whether `module` is `name` or a module of package `name`."""
    return module == name or module.startswith(name + ".")


def test_every_module_has_a_layer() -> None:
    """A new module is placed in the table (the test helpers are outside the package, in tests/support)."""
    g = graph()
    placed = layer_of(set(g))
    missing = sorted(m for m in g if m not in placed)
    assert not missing, f"modules with no layer in tests/test_structure.py: {missing}"
    gone = [m for _, mods in LAYERS for m in mods if not any(within(x, m) for x in g)]
    assert not gone, f"the table names modules that are gone: {gone}"


def test_imports_keep_the_layers() -> None:
    found = violations(graph())
    new = {k: v for k, v in found.items() if k not in KNOWN}
    assert not new, "imports against the layer rules:\n" + "\n".join(f"  {a} -> {b}: {why}"
                                                                        for (a, b), why in sorted(new.items()))
    gone = sorted(k for k in KNOWN if k not in found)
    assert not gone, f"KNOWN lists imports the code no longer makes (take them out): {gone}"


def test_no_import_cycles() -> None:
    g = graph()
    assert "service.mount" in g and "core" in g  # the walk found the package
    cycles: set[str] = set()

    def walk(node: str, path: list[str]) -> None:
        for dep in g.get(node, ()):
            if dep in path:
                cycles.add(" -> ".join([*path[path.index(dep):], dep]))
            else:
                walk(dep, [*path, dep])

    for node in list(g):
        walk(node, [node])
    assert not cycles, sorted(cycles)


def test_cache_admin_does_not_import_the_fuse_side() -> None:
    g = graph()
    seen: set[str] = set()
    todo = ["service.admin"]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo += g.get(mod, ())
    assert "cache" in seen and not any(within(m, "fuse") or m == "service.mount" for m in seen), sorted(seen)


def test_the_checker_sees_what_it_should() -> None:
    """The rules bite: an import up the layers and a forbidden pair are both reported."""
    g = {"errors": {"core"}, "fetch.fetcher": {"shared.tier", "cache"}, "core": {"fuse.fs"},
         "shared.tier": {"cache"}, "reads.extents": {"passthrough.opens"}}
    found = violations(g)
    assert ("errors", "core") in found and ("fetch.fetcher", "shared.tier") in found
    assert ("core", "fuse.fs") in found and ("reads.extents", "passthrough.opens") in found
    assert ("shared.tier", "cache") in found and ("fetch.fetcher", "cache") not in found
