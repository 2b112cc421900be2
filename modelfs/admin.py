"""`modelfs cache ...`: what is in a cache dir, verifying it, shrinking it, pinning models.

Pins are kept in `<cache>/pins.json` as key prefixes of a source (`{"<source identity>": ["llama/", ...]}`,
where a source is what `cache ls` shows). The daemon reads them at start: blocks of pinned files are never
evicted by its quota or free-space floor; `gc` honours them too.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from modelfs.cache import BlockCache, block_hash
from modelfs.cachedir import CacheDir
from modelfs.errors import ModelfsError
from modelfs.index import ChunkIndex


@dataclass
class CachedModel:
    source: str
    key: str
    size: int
    cached: int
    pinned: bool


def _index(cache_dir: str) -> ChunkIndex:
    where = CacheDir(cache_dir)
    if not where.has_index():
        raise ModelfsError(f"{where} is not a modelfs cache dir (no index)")
    return ChunkIndex(where.index, 64 << 30)


def load_pins(cache_dir: str) -> dict[str, list[str]]:
    path = CacheDir(cache_dir).pins
    try:
        with open(path) as f:
            pins = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ModelfsError(f"cannot read {path}: {e}") from None
    return {str(k): [str(p) for p in v] for k, v in pins.items()}


def save_pins(cache_dir: str, pins: dict[str, list[str]]) -> None:
    path = CacheDir(cache_dir).pins
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump({k: sorted(set(v)) for k, v in pins.items() if v}, f, indent=1)
    os.replace(tmp, path)


def _is_pinned(pins: dict[str, list[str]], source: str, key: str) -> bool:
    return any(key.startswith(p) for p in pins.get(source, ()))


def pinned_blocks(cache_dir: str, index: ChunkIndex) -> set[str]:
    """Names (hex hashes) of the blocks of every pinned file version."""
    pins = load_pins(cache_dir)
    names: set[str] = set()
    if pins:
        for vid, rec in index.versions().items():
            if _is_pinned(pins, str(rec["source"]), str(rec["key"])):
                names.update(digest.hex() for digest, _ in index.extents(vid).values())
    return names


def list_models(cache_dir: str) -> list[CachedModel]:
    index = _index(cache_dir)
    pins = load_pins(cache_dir)
    try:
        blocks = {name for _, _, files in os.walk(CacheDir(cache_dir).blocks) for name in files}
        out = []
        for vid, rec in index.versions().items():
            extents = index.extents(vid)
            cached = sum(length for digest, length in extents.values() if digest.hex() in blocks)
            out.append(CachedModel(str(rec["source"]), str(rec["key"]), int(str(rec["size"])), cached,
                                   _is_pinned(pins, str(rec["source"]), str(rec["key"]))))
        return sorted(out, key=lambda m: (m.source, m.key))
    finally:
        index.close()


def verify(cache_dir: str, progress: Callable[[int], object] = lambda n: None) -> tuple[int, list[str]]:
    """Hash every block against its name; drop the bad ones. Returns (blocks checked, bad block paths)."""
    checked = 0
    bad: list[str] = []
    for dirpath, _dirs, files in os.walk(CacheDir(cache_dir).blocks):
        for name in files:
            if ".tmp." in name:
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue  # evicted meanwhile
            checked += 1
            progress(len(data))
            if block_hash(data).hex() != name:
                bad.append(path)
                os.unlink(path)
    return checked, bad


def total_bytes(cache_dir: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(CacheDir(cache_dir).blocks):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def gc(cache_dir: str, target: int) -> tuple[int, int]:
    """Evict least recently used, unpinned blocks until the cache holds at most `target` bytes.
    The cache must not be in use (one daemon per cache dir: it keeps its own accounting)."""
    lock = CacheDir(cache_dir).lock()
    try:
        index = _index(cache_dir)
        try:
            cache = BlockCache(cache_dir, "gc", max_size=0)  # evicts across every domain's blocks
            cache.keep(pinned_blocks(cache_dir, index))
            before = cache.bytes_stored
            cache.max_size = max(target, 1)
            cache.make_room(0, partial=True)
            with contextlib.suppress(OSError):
                os.rmdir(cache.root)  # the "gc" domain dir the constructor made, if empty
            return before, cache.bytes_stored
        finally:
            index.close()
    finally:
        os.close(lock)
