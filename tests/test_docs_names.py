"""Every name of the code that README.md and docs/ quote exists: `module.Name` (and `module.Class.attr`) of
the package, `Class.attr` of a class the package defines, and `section.key` settings. A rename that leaves
the documentation behind fails here."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re

import modelfs
from modelfs.config import Config
from tests.test_readme_targets import documents

QUOTED = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`")
#: Names quoted that belong to other projects or files, not to the package (`torch.equal`, `cache.py`).
SUFFIXES = (".py", ".yaml", ".toml", ".json", ".sh", ".md", ".service", ".mount")


def modules() -> dict[str, object]:
    out: dict[str, object] = {}
    for info in pkgutil.walk_packages(modelfs.__path__, "modelfs."):
        if info.name == "modelfs.__main__" or (info.name.startswith("tests.support")
                                                 and info.name != "tests.support.memstore"):
            continue
        out[info.name[len("modelfs."):]] = importlib.import_module(info.name)
    # a module may be quoted by its own name where no other module or package shares it (`extents.Blocks`
    # for reads.extents): the documentation speaks of modules, the tree groups them in packages
    last: dict[str, list[str]] = {}
    for name in out:
        last.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    out.update({short: out[names[0]] for short, names in last.items() if len(names) == 1 and short not in out})
    return out


def settings() -> set[str]:
    cfg = Config()
    return {f"{section.name}.{f.name}" for section in dataclasses.fields(cfg)
            if dataclasses.is_dataclass(getattr(cfg, section.name))
            for f in dataclasses.fields(getattr(cfg, section.name))}


def classes(mods: dict[str, object]) -> dict[str, list[type]]:
    out: dict[str, list[type]] = {}
    for mod in mods.values():
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and obj.__module__.startswith("modelfs"):
                out.setdefault(name, []).append(obj)
    return out


def resolves(name: str, mods: dict[str, object], keys: set[str], types: dict[str, list[type]]) -> bool | None:
    """True if the name is the package's and exists, False if it is the package's and does not, None if it
    is not the package's (another project's, a file name)."""
    if name.endswith(SUFFIXES) or name.startswith(("modelfs.", "mount.modelfs")):
        return None
    head, *rest = name.split(".")
    if name in keys:
        return True
    if head in mods or head in {k.split(".")[0] for k in keys}:
        for split in range(len(name.split(".")) - 1, 0, -1):  # the longest module prefix: remote.s3.S3Store
            mod, attrs = ".".join(name.split(".")[:split]), name.split(".")[split:]
            if mod in mods:
                obj: object = mods[mod]
                for a in attrs:
                    if not hasattr(obj, a) and not (inspect.isclass(obj) and a in getattr(obj, "__annotations__", {})):
                        return False
                    obj = getattr(obj, a, None)
                return True
        return False
    if head in types:  # Class.attr: a method, property, field or slot of that class
        return any(hasattr(c, rest[0]) or rest[0] in getattr(c, "__annotations__", {})
                   or rest[0] in getattr(c, "__slots__", ()) or rest[0] in _assigned(c) for c in types[head])
    return None


def _assigned(cls: type) -> set[str]:
    """Attributes a class's methods assign on self (`self.known = ...`)."""
    try:
        return set(re.findall(r"self\.([A-Za-z_][A-Za-z0-9_]*)\s*(?::[^=\n]+)?=", inspect.getsource(cls)))
    except (OSError, TypeError):
        return set()


def test_every_name_the_documentation_quotes_exists() -> None:
    mods, keys = modules(), settings()
    types = classes(mods)
    wrong: list[str] = []
    checked = 0
    for path in documents():
        doc, text = path.name, path.read_text()
        for name in sorted(set(QUOTED.findall(text))):
            ok = resolves(name, mods, keys, types)
            checked += ok is not None
            if ok is False:
                wrong.append(f"{doc}: `{name}`")
    assert checked > 50, checked  # it read the names it should
    assert not wrong, "names the documentation quotes that the code lacks:\n  " + "\n  ".join(wrong)


def test_the_check_tells_a_missing_name() -> None:
    mods, keys = modules(), settings()
    types = classes(mods)
    assert resolves("cache.FileCache", mods, keys, types) and resolves("cache.scrub_rate", mods, keys, types)
    assert resolves("FileVersion.known", mods, keys, types)
    assert resolves("fetch._Lease", mods, keys, types) is False
    assert resolves("extents.Blocks", mods, keys, types) and resolves("reads.extents.Blocks", mods, keys, types)
    assert resolves("extents.Nope", mods, keys, types) is False
    assert resolves("cache.scrub_speed", mods, keys, types) is False
    assert resolves("FileVersion.nope", mods, keys, types) is False
    assert resolves("torch.equal", mods, keys, types) is None
