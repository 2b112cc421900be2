"""`modelfs cache ...`: what is in a cache dir, verifying it, shrinking it, pinning models.

Pins are kept in `<cache>/pins.json` as key prefixes of a source (`{"<source identity>": ["llama/", ...]}`,
where a source is what `cache ls` shows). The daemon reads them at start: extents of pinned files (and the
same content in any other file) are never evicted by its quota or free-space floor; `gc` honours them too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from modelfs.cache import FileCache
from modelfs.cache.cachedir import CacheDir
from modelfs.catalog.index import ChunkIndex
from modelfs.digest import content_hash
from modelfs.errors import ModelfsError


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


def pinned_hashes(cache_dir: str, index: ChunkIndex) -> set[bytes]:
    """Content hashes of the extents of every pinned file version (never evicted, in any file)."""
    pins = load_pins(cache_dir)
    hashes: set[bytes] = set()
    if pins:
        for vid, rec in index.versions().items():
            if _is_pinned(pins, str(rec["source"]), str(rec["key"])):
                hashes.update(digest for digest, _ in index.extents(vid).values())
    return hashes


def list_models(cache_dir: str) -> list[CachedModel]:
    index = _index(cache_dir)
    pins = load_pins(cache_dir)
    try:
        present = index.present()
        out = []
        for vid, rec in index.versions().items():
            cached = sum(length for _, length in present.get(vid, {}).values())
            out.append(CachedModel(str(rec["source"]), str(rec["key"]), int(str(rec["size"])), cached,
                                   _is_pinned(pins, str(rec["source"]), str(rec["key"]))))
        return sorted(out, key=lambda m: (m.source, m.key))
    finally:
        index.close()


def verify(cache_dir: str, progress: Callable[[int], object] = lambda n: None) -> tuple[int, list[str]]:
    """Read back every present extent of every cache file and hash it against the index. Returns (extents
    checked, the bad ones as "<version id> at <offset>"). With the cache dir free, bad extents are dropped
    (fetched again when read); while a daemon holds it they are only reported: the daemon checks each file
    before its first use, so a restart has it refetch them."""
    where = CacheDir(cache_dir)
    try:
        lock: int | None = where.lock()
    except ModelfsError:
        lock = None  # a daemon runs: report only
    index = _index(cache_dir)
    checked = 0
    bad: list[tuple[bytes, int]] = []
    try:
        for vid, extents in index.present().items():
            try:
                fd = os.open(os.path.join(where.files, vid.hex()), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                bad += [(vid, start) for start in extents]
                continue
            try:
                for start, (digest, length) in sorted(extents.items()):
                    data = os.pread(fd, length, start)
                    checked += 1
                    progress(len(data))
                    if len(data) != length or content_hash(data) != digest:
                        bad.append((vid, start))
            finally:
                os.close(fd)
        if lock is not None and bad:
            cache = FileCache(cache_dir, index, "")
            for vid, start in bad:
                cache.drop(vid, start, "damaged (modelfs cache verify)")
            cache.close()
    finally:
        index.close()
        if lock is not None:
            os.close(lock)
    return checked, [f"{vid.hex()} at {start}" for vid, start in bad]


def total_bytes(cache_dir: str) -> int:
    """Bytes of extents present in the cache's files (what counts against cache.max_size)."""
    index = _index(cache_dir)
    try:
        return sum(length for extents in index.present().values() for _, length in extents.values())
    finally:
        index.close()


def gc(cache_dir: str, target: int) -> tuple[int, int]:
    """Evict least recently used extents of unpinned models until the cache holds at most `target` bytes.
    The cache must not be in use (one daemon per cache dir: it keeps its own accounting)."""
    lock = CacheDir(cache_dir).lock()
    try:
        index = _index(cache_dir)
        try:
            cache = FileCache(cache_dir, index, "")  # evicts across every source's files
            cache.keep(pinned_hashes(cache_dir, index))
            before = cache.bytes_stored
            cache.max_size = max(target, 1)
            cache.make_room(0, partial=True)
            cache.close()
            return before, cache.bytes_stored
        finally:
            index.close()
    finally:
        os.close(lock)
