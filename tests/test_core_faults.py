"""The core's failure behaviour without a mount: an in-memory store that misbehaves on request
(`tests.support.memstore`), the core under trio's MockClock where time matters.

Covered here: the fetch deadline, offline refusal, the offline probe, the listing saved for offline use,
serving from memory when the cache has no room, coalesced GETs up to fetch.max_request. The same cases
run against SeaweedFS and the fault proxy through real mounts in test_remote_faults.py.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from modelfs.cache import FileCache
from modelfs.catalog.index import ChunkIndex
from modelfs.catalog.manifest import KEY as MANIFEST_KEY
from modelfs.catalog.manifest import FileEntry, Manifest, file_extents
from modelfs.config import load_config
from modelfs.core import ModelFS, assemble
from modelfs.errors import ModelfsError, StoreError, StoreUnreachable
from modelfs.health import Health
from modelfs.stats import Stats
from tests.support.memstore import MemoryStore

EXTENT = 64 * 1024
QUIET = {"prefetch.whole_file": "false", "prefetch.sequential": "false", "prefetch.checkpoint_sets": "false"}


def run(store: MemoryStore, cache_dir: Path, body: Callable[[ModelFS], Awaitable[None]], max_size: int = 0,
        **overrides: str) -> ModelFS:
    """A fresh core (a new daemon) over `store` and `cache_dir`, under a MockClock that jumps ahead once
    every task has waited half a real second (worker threads keep real time)."""
    cfg = load_config(None, {"cache.dir": str(cache_dir), "cache.extent_size": str(EXTENT), "cache.min_free": "0",
                             "fetch.deadline": "30", "fetch.probe_interval": "5", **QUIET, **overrides})
    index = ChunkIndex(str(cache_dir / "index"), 1 << 28)
    cache = FileCache(str(cache_dir), index, store.domain, store.identity, max_size=max_size)
    core = assemble(cfg, store, index, cache, Stats())

    async def main() -> None:
        async with core.serving() as nursery:
            with trio.fail_after(600):  # virtual seconds: a read that never returns fails the test
                await body(core)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.5))
    finally:
        store.release()
        index.close()
    return core


async def open_file(core: ModelFS, name: str) -> int:
    node = await core.lookup(1, name)
    return core.open(node.inode, os.O_RDONLY)


def test_a_stalled_store_fails_the_read_at_the_deadline_and_the_next_read_fetches_afresh(tmp_path: Path) -> None:
    store = MemoryStore()
    data = os.urandom(3 * EXTENT)
    store.add("w.bin", data)

    async def body(core: ModelFS) -> None:
        fh = await open_file(core, "w.bin")
        store.stall_reads()
        began = trio.current_time()
        with pytest.raises(StoreError, match=r"fetch\.deadline") as failed:
            await core.read(fh, 0, 100)
        assert failed.value.errno == errno.EIO
        assert trio.current_time() - began == pytest.approx(8, abs=1)  # the deadline, in virtual time
        assert core.stats.read_timeouts == 1 and core.fetcher.in_flight == 0  # the stuck flight is forgotten
        got: list[bytes] = []

        async def again() -> None:
            got.append(bytes(await core.read(fh, 0, 100)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(again)
            while store.waiting < 2:  # a fresh GET beside the abandoned one, not a join of it
                await trio.sleep(0.01)
            store.release()
        # Two GETs were held at once above: the read made its own, it did not join the abandoned one. (The
        # abandoned GET's thread lands its bytes after its flight was forgotten, and at times asks once more.)
        assert got == [data[:100]] and len(store.reads) >= 2

    run(store, tmp_path / "cache", body, **{"fetch.deadline": "8"})


def test_a_reader_of_the_first_extent_of_a_long_get_is_answered_before_the_get_ends(tmp_path: Path) -> None:
    """A demand read that joins a prefetch GET of several extents gets its extent as soon as that
    extent's bytes are in, while the rest of the GET is still held; the GET is made once."""
    store = MemoryStore()
    data = os.urandom(3 * EXTENT)
    store.add("w.bin", data)

    async def body(core: ModelFS) -> None:
        node = await core.lookup(1, "w.bin")
        fh = core.open(node.inode, os.O_RDONLY)
        ver = core.version(node)
        store.stall_reads(after_first=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(core.fetcher.prefetch_run, ver, [(k * EXTENT, EXTENT) for k in range(3)])
            while store.waiting < 1:
                await trio.sleep(0.01)
            assert bytes(await core.read(fh, 100, 1000)) == data[100:1100]
            assert store.waiting == 1  # answered while the GET was held after its first extent
            store.release()
        assert bytes(await core.read(fh, 0, len(data))) == data
        assert len(store.reads) == 1 and core.stats.gets == 1

    run(store, tmp_path / "cache", body)


def test_an_unreachable_store_turns_uncached_reads_into_instant_errors_and_the_probe_ends_it(tmp_path: Path) -> None:
    store = MemoryStore()
    cached, uncached = os.urandom(2 * EXTENT), os.urandom(2 * EXTENT)
    store.add("cached.bin", cached)
    store.add("uncached.bin", uncached)

    async def body(core: ModelFS) -> None:
        fh_c = await open_file(core, "cached.bin")
        fh_u = await open_file(core, "uncached.bin")
        assert bytes(await core.read(fh_c, 0, len(cached))) == cached
        store.unreachable = True
        with pytest.raises(StoreUnreachable):
            await core.read(fh_u, 0, 100)  # tried again until the store answered nothing for offline_after
        assert core.health.offline and core.stats.store_retries >= 1
        reads = len(store.reads)
        with pytest.raises(StoreUnreachable) as refused:
            await core.read(fh_u, EXTENT, 100)
        assert refused.value.errno == errno.EIO and "offline mode" in str(refused.value)
        assert len(store.reads) == reads and core.stats.offline_misses == 1  # refused without asking the store
        assert bytes(await core.read(fh_c, 0, len(cached))) == cached  # cached bytes still load
        await trio.sleep(5)  # probes every 2 s find the store still gone
        assert core.health.offline
        store.unreachable = False
        await trio.sleep(3)
        assert not core.health.offline  # the next probe ended offline mode
        assert bytes(await core.read(fh_u, EXTENT, 100)) == uncached[EXTENT:EXTENT + 100]

    run(store, tmp_path / "cache", body, **{"fetch.offline_after": "0.5", "fetch.probe_interval": "2"})


def test_a_store_that_fails_requests_for_a_while_is_suspect_not_offline() -> None:
    """An overloaded store refuses or drops a request and answers the next: one failure makes it suspect,
    an answer clears that, and only failures for offline_after (or the mount's check) make it offline."""
    health = Health(lambda: None, "store mem", offline_after=60)
    health.mark_unreachable(StoreUnreachable("refused"))
    health.mark_unreachable(StoreUnreachable("refused again"))
    assert health.suspect and not health.offline
    health.answered()
    assert not health.suspect and not health.offline
    health.mark_unreachable(StoreUnreachable("gone"), confirmed=True)  # the mount's check
    assert health.offline
    brief = Health(lambda: None, "store mem", offline_after=0.05)
    brief.mark_unreachable(StoreUnreachable("refused"))
    time.sleep(0.1)
    brief.mark_unreachable(StoreUnreachable("still refused"))
    assert brief.offline and not brief.suspect


def test_a_failed_get_is_tried_again_within_the_deadline(tmp_path: Path) -> None:
    """Two GETs the store fails for now (as an overloaded store refuses them) cost the reader a retry
    each, not an EIO, and do not make the store offline."""
    store = MemoryStore()
    data = os.urandom(2 * EXTENT)
    store.add("w.bin", data)

    async def body(core: ModelFS) -> None:
        fh = await open_file(core, "w.bin")
        store.fail_reads(2, StoreUnreachable("connection refused"))
        assert bytes(await core.read(fh, 0, len(data))) == data
        assert core.stats.store_retries == 2 and not core.health.offline and not core.health.suspect

    run(store, tmp_path / "cache", body)


def test_a_daemon_started_while_the_store_is_unreachable_serves_the_saved_listing(tmp_path: Path) -> None:
    store = MemoryStore()
    data = os.urandom(EXTENT + 7)
    store.add("ckpt/w.bin", data)
    store.add("ckpt/never-read.bin", b"x" * 100)

    async def first(core: ModelFS) -> None:
        ckpt = await core.lookup(1, "ckpt")
        fh = core.open((await core.lookup(ckpt.inode, "w.bin")).inode, os.O_RDONLY)
        assert bytes(await core.read(fh, 0, len(data))) == data

    run(store, tmp_path / "cache", first)
    store.unreachable = True

    async def offline(core: ModelFS) -> None:
        core.health.mark_unreachable(StoreUnreachable("gone"))  # as the mount does when its check fails
        ckpt = await core.lookup(1, "ckpt")
        names = {n.name for n in (await core.ns.children(ckpt)).values()}
        assert names == {"w.bin", "never-read.bin"}  # from the listing saved in the index
        fh = core.open((await core.lookup(ckpt.inode, "w.bin")).inode, os.O_RDONLY)
        assert bytes(await core.read(fh, 0, len(data))) == data  # from the block cache
        fh2 = core.open((await core.lookup(ckpt.inode, "never-read.bin")).inode, os.O_RDONLY)
        with pytest.raises(ModelfsError) as e:
            await core.read(fh2, 0, 10)
        assert e.value.errno == errno.EIO
        with pytest.raises(ModelfsError):
            await core.lookup(1, "never-listed")

    run(store, tmp_path / "cache", offline, **{"fetch.deadline": "8"})


def test_a_cache_with_no_room_serves_from_memory(tmp_path: Path) -> None:
    store = MemoryStore()
    data = os.urandom(3 * EXTENT)
    store.add("w.bin", data)

    async def body(core: ModelFS) -> None:
        fh = await open_file(core, "w.bin")
        for _ in range(2):
            got = b"".join([bytes(await core.read(fh, off, EXTENT)) for off in range(0, len(data), EXTENT)])
            assert got == data
        assert core.stats.cache_full_skips == 3 and core.cache.bytes_stored == 0
        assert len(store.reads) == 3  # nothing could be cached: the second pass is served from memory

    run(store, tmp_path / "cache", body, max_size=EXTENT // 2)  # smaller than one extent: never room


def write_safetensors(path: Path, sizes: list[int]) -> None:
    header = {f"t{i}": {"dtype": "U8", "shape": [n], "data_offsets": [sum(sizes[:i]), sum(sizes[:i + 1])]}
              for i, n in enumerate(sizes)}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + os.urandom(sum(sizes)))


def test_adjacent_manifest_extents_are_fetched_in_requests_up_to_max_request(tmp_path: Path) -> None:
    """A published file of many small tensors: whole-file prefetch coalesces adjacent uncached extents
    into ranged GETs of at most fetch.max_request bytes, each extent still stored and verified alone."""
    local = tmp_path / "m.safetensors"
    write_safetensors(local, [20_000 + 37 * i for i in range(60)])
    data = local.read_bytes()
    store = MemoryStore()
    info = store.add("m.safetensors", data)
    extents = file_extents(str(local), EXTENT)
    store.add(MANIFEST_KEY, Manifest({"m.safetensors": FileEntry(len(data), info.etag, extents)}).dumps())
    max_request = 256 * 1024

    async def body(core: ModelFS) -> None:
        await core.ns.children(core.ns.root)  # lists the prefix: reads its manifest
        node = await core.lookup(1, "m.safetensors")
        assert core.version(node).layout is not None  # the manifest's extents are used
        assert (await core.warm(node.inode))["fetched"] == len(data)
        fh = core.open(node.inode, os.O_RDONLY)
        assert bytes(await core.read(fh, 0, len(data))) == data
        gets = [r for r in store.reads if r[0] == "m.safetensors"]
        assert all(length <= max_request for _, _, length in gets)
        assert sum(length for _, _, length in gets) == len(data)  # every byte once
        assert len(gets) < len(extents) / 4  # coalesced: far fewer GETs than extents
        assert core.cache.bytes_stored == len(data)  # every extent in the file, once

    run(store, tmp_path / "cache", body, **{"prefetch.whole_file": "true", "fetch.max_request": str(max_request)})


@pytest.mark.parametrize("error", [StoreUnreachable("connection refused"), StoreError("503 SlowDown", transient=True)],
                         ids=["refused", "503"])
def test_a_directory_not_listed_before_rides_out_a_store_that_fails_for_now(tmp_path: Path,
                                                                             error: StoreError) -> None:
    """An overloaded store refuses or 5xx's the first listings of a directory the mount has no saved
    listing of: the listing is asked again, with pauses, and the load goes on (no EIO, no offline mode)."""
    store = MemoryStore()
    data = os.urandom(EXTENT)
    store.add("ckpt/w.bin", data)

    async def body(core: ModelFS) -> None:
        ckpt = await core.lookup(1, "ckpt")
        listed = store.lists
        store.fail_lists(4, error)
        node = await core.lookup(ckpt.inode, "w.bin")
        fh = core.open(node.inode, os.O_RDONLY)
        assert bytes(await core.read(fh, 0, EXTENT)) == data
        assert store.lists == listed + 5 and not core.health.offline

    run(store, tmp_path / "cache", body)


def test_a_directory_never_listed_fails_with_eio_at_the_deadline_when_the_store_keeps_refusing(
        tmp_path: Path) -> None:
    """A store that keeps refusing the listing of a directory the mount never listed: it is asked again
    until fetch.deadline (or offline mode, if that comes first), then the lookup fails with EIO."""
    store = MemoryStore()
    store.add("ckpt/w.bin", b"x")

    async def body(core: ModelFS) -> None:
        ckpt = await core.lookup(1, "ckpt")
        store.fail_lists(10_000, StoreUnreachable("connection refused"))
        began = trio.current_time()
        with pytest.raises(ModelfsError, match="not cached") as failed:
            await core.lookup(ckpt.inode, "w.bin")
        assert failed.value.errno == errno.EIO
        assert 8 - 2 <= trio.current_time() - began <= 8  # the deadline, less at most one pause (virtual time)

    run(store, tmp_path / "cache", body, **{"fetch.deadline": "8"})  # below fetch.offline_after: the deadline ends it


def test_a_cold_file_is_fetched_in_a_few_long_gets_each_through_one_buffer(tmp_path: Path) -> None:
    """Whole-file prefetch of a file with fixed extents (no manifest): adjacent extents go in GETs of up to
    fetch.max_request bytes, each streamed through ONE GET buffer (every extent stored before the next is
    read into it); every byte is fetched once and read back right."""
    store = MemoryStore()
    data = os.urandom(16 * EXTENT + 100)
    store.add("w.bin", data)

    async def body(core: ModelFS) -> None:
        fh = await open_file(core, "w.bin")
        assert bytes(await core.read(fh, 0, 100)) == data[:100]  # the first READ starts whole-file prefetch
        await core.idle()
        assert bytes(await core.read(fh, 0, len(data))) == data
        gets = [length for key, _, length in store.reads if key == "w.bin"]
        assert sum(gets) == len(data) and max(gets) <= 8 * EXTENT, gets
        assert len(gets) <= 4, gets  # the demand READ's extent, then two GETs for the other 16 extents
        assert core.buffers.taken == len(gets)  # one buffer each, however long the GET

    run(store, tmp_path / "cache", body, **{"prefetch.whole_file": "true", "fetch.max_request": str(8 * EXTENT)})
