"""The core (namespace -> index -> cache -> fetcher -> store) driven without a mount, over a real directory."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from modelfs.cache import FileCache
from modelfs.catalog.index import ChunkIndex
from modelfs.config import load_config
from modelfs.core import ModelFS, assemble
from modelfs.errors import ReadOnly, VersionChanged
from modelfs.remote.local import LocalStore
from modelfs.stats import Stats

EXTENT = 64 * 1024


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "ckpt").mkdir(parents=True)
    (src / "ckpt" / "w.bin").write_bytes(random.Random(1).randbytes(EXTENT * 10 + 1234))
    (src / "small.txt").write_bytes(b"hello")
    return src


Runner = Callable[[Callable[[ModelFS], object]], None]


@pytest.fixture
def run_core(source: Path, tmp_path: Path) -> Iterator[Runner]:
    """Run an async test body against a fresh ModelFS (a new 'process') sharing one cache dir."""
    cache_dir = tmp_path / "cache"

    def run(body: Callable[[ModelFS], object]) -> None:
        # Prefetch off: these tests pin down the demand path (tests/test_prefetch.py covers prefetch).
        cfg = load_config(None, {"cache.dir": str(cache_dir), "cache.extent_size": str(EXTENT),
                                 "prefetch.whole_file": "false", "prefetch.sequential": "false",
                                 "prefetch.checkpoint_sets": "false"})
        store = LocalStore(str(source))
        index = ChunkIndex(str(cache_dir / "index"), 1 << 28)
        cache = FileCache(str(cache_dir), index, store.domain, store.identity)
        core = assemble(cfg, store, index, cache, Stats())

        async def main() -> None:
            async with core.serving() as nursery:
                await body(core)  # type: ignore[misc]
                nursery.cancel_scope.cancel()

        try:
            trio.run(main)
        finally:
            cache.close()
            index.close()

    yield run


async def open_path(core: ModelFS, path: str) -> int:
    inode = 1
    for part in path.split("/"):
        inode = (await core.lookup(inode, part)).inode
    return core.open(inode, os.O_RDONLY)


def test_random_reads_across_extent_edges_match_source(source: Path, run_core: Runner) -> None:
    ref = (source / "ckpt" / "w.bin").read_bytes()

    async def body(core: ModelFS) -> None:
        fh = await open_path(core, "ckpt/w.bin")
        rng = random.Random(7)
        for _ in range(300):
            edge = rng.randrange(1, 11) * EXTENT
            off = max(0, edge + rng.randrange(-5000, 5000))
            size = rng.choice([1, 4096, 131072, 3 * EXTENT])
            assert await core.read(fh, off, size) == ref[off:off + size]
        assert await core.read(fh, len(ref) - 10, 1000) == ref[-10:]
        assert await core.read(fh, len(ref) + 10, 1000) == b""

    run_core(body)


def test_concurrent_reads_of_one_extent_cause_one_get(run_core: Runner) -> None:
    async def body(core: ModelFS) -> None:
        fh = await open_path(core, "ckpt/w.bin")
        async with trio.open_nursery() as n:
            for i in range(32):
                n.start_soon(core.read, fh, EXTENT * 3 + i * 1000, 4096)
        assert core.stats.gets == 1
        assert core.stats.bytes_fetched == EXTENT

    run_core(body)


def test_second_process_serves_from_cache_with_zero_gets(source: Path, run_core: Runner) -> None:
    ref = (source / "ckpt" / "w.bin").read_bytes()

    async def read_all(core: ModelFS) -> bytes:
        fh = await open_path(core, "ckpt/w.bin")
        return b"".join([await core.read(fh, off, 131072) for off in range(0, len(ref), 131072)])

    async def first(core: ModelFS) -> None:
        assert await read_all(core) == ref
        assert core.stats.gets == 11

    async def second(core: ModelFS) -> None:
        assert await read_all(core) == ref
        assert core.stats.gets == 0
        assert core.stats.cache_hits > 0

    run_core(first)
    run_core(second)


def test_identical_content_is_stored_once(source: Path, run_core: Runner) -> None:
    (source / "copy.bin").write_bytes((source / "ckpt" / "w.bin").read_bytes())

    async def body(core: ModelFS) -> None:
        for path in ("ckpt/w.bin", "copy.bin"):
            fh = await open_path(core, path)
            for off in range(0, EXTENT * 11, EXTENT):
                await core.read(fh, off, EXTENT)
        assert core.stats.dedup_bytes_saved == EXTENT * 10 + 1234
        assert core.cache.bytes_stored == EXTENT * 10 + 1234  # once: copy.bin reads w.bin's cache file

    run_core(body)


def test_overwritten_object_gives_estale_never_new_bytes(source: Path, run_core: Runner) -> None:
    path = source / "ckpt" / "w.bin"
    ref = path.read_bytes()

    async def body(core: ModelFS) -> None:
        fh = await open_path(core, "ckpt/w.bin")
        assert await core.read(fh, 0, 100) == ref[:100]
        path.write_bytes(b"\xff" * len(ref))  # overwritten in the store while open
        assert await core.read(fh, 0, 100) == ref[:100]  # cached bytes of the old version: fine
        with pytest.raises(VersionChanged) as e:
            await core.read(fh, EXTENT * 5, 100)
        assert e.value.errno == errno.ESTALE
        assert core.stats.version_changes == 1

    run_core(body)


def test_write_opens_are_refused(run_core: Runner) -> None:
    async def body(core: ModelFS) -> None:
        inode = (await core.lookup(1, "small.txt")).inode
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(ReadOnly):
                core.open(inode, flags)

    run_core(body)
