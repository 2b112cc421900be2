"""Prefetch without a mount: whole-file order, checkpoint sets, demand priority, page-cache push, warm."""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from modelfs.cache import FileCache
from modelfs.catalog.index import ChunkIndex
from modelfs.config import load_config
from modelfs.core import ModelFS, assemble
from modelfs.fetch.buffers import BufferPool
from modelfs.passthrough.kernel import Kernel
from modelfs.remote.local import LocalStore
from modelfs.stats import Stats

EXTENT = 64 * 1024


def write_safetensors(path: Path, tensors: dict[str, int], metadata_pad: int = 0) -> bytes:
    """A real safetensors layout (uint8 tensors of the given byte sizes), returns the file bytes."""
    header: dict[str, object] = {"__metadata__": {"pad": "x" * metadata_pad}}
    off = 0
    for name, n in tensors.items():
        header[name] = {"dtype": "U8", "shape": [n], "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    data = struct.pack("<Q", len(h)) + h + os.urandom(off)
    path.write_bytes(data)
    return data


def make_core(src: Path, cache_dir: Path, push: Callable[[int, int, memoryview], None] | None = None,
              kernel: Kernel | None = None, **overrides: str) -> tuple[ModelFS, Callable[[], None]]:
    cfg = load_config(None, {"cache.dir": str(cache_dir), "cache.extent_size": str(EXTENT),
                             "fetch.memory_budget": str(16 * EXTENT), "cache.min_free": "0",
                             **overrides})
    store = LocalStore(str(src))
    index = ChunkIndex(str(cache_dir / "index"), 1 << 28)
    cache = FileCache(str(cache_dir), index, store.domain, store.identity, max_size=int(cfg.cache.max_size),
                      min_free=int(cfg.cache.min_free))
    core = assemble(cfg, store, index, cache, Stats(), push=push, kernel=kernel)

    def close() -> None:
        cache.close()
        index.close()

    return core, close


def run(core: ModelFS, body: Callable[[ModelFS], object]) -> None:
    async def main() -> None:
        async with core.serving() as nursery:
            await body(core)  # type: ignore[misc]
            nursery.cancel_scope.cancel()

    trio.run(main)


async def lookup(core: ModelFS, path: str) -> int:
    inode = 1
    for part in path.split("/"):
        inode = (await core.lookup(inode, part)).inode
    return inode


def run_and_close(core: ModelFS, close: Callable[[], None], body: Callable[[ModelFS], object]) -> None:
    try:
        run(core, body)
    finally:
        close()


def source_dir(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    return src


async def settle(core: ModelFS) -> None:
    """Wait until no prefetch work is queued or running."""
    with trio.fail_after(30):
        await core.idle()


def test_first_read_prefetches_whole_checkpoint_file_and_an_open_alone_fetches_nothing(tmp_path: Path) -> None:
    """An open the kernel answers from its page cache sends no READ and must cost no GET; the first READ
    of a checkpoint file schedules all of it."""
    src = source_dir(tmp_path)
    data = write_safetensors(src / "model.safetensors", {f"t{i}": 50_000 + i for i in range(20)})
    (src / "notes.txt").write_bytes(os.urandom(5 * EXTENT))
    core, close = make_core(src, tmp_path / "cache")

    async def body(core: ModelFS) -> None:
        notes = core.open(await lookup(core, "notes.txt"), os.O_RDONLY)  # not a checkpoint pattern
        fh = core.open(await lookup(core, "model.safetensors"), os.O_RDONLY)
        await settle(core)
        assert core.stats.bytes_fetched == 0
        assert bytes(await core.read(notes, 0, 10)) == (src / "notes.txt").read_bytes()[:10]
        assert bytes(await core.read(fh, 0, 8)) == data[:8]
        await settle(core)
        assert core.stats.bytes_fetched == len(data) + EXTENT  # every extent once, and the one notes.txt read
        assert bytes(await core.read(fh, 0, len(data))) == data
        assert core.stats.bytes_fetched == len(data) + EXTENT

    run_and_close(core, close, body)


class Registry:
    """The kernel's side of passthrough, in memory: backing ids handed out for files the daemon registered
    (what FUSE_DEV_IOC_BACKING_OPEN keeps), and the bytes each id would serve."""

    def __init__(self) -> None:
        self.files: dict[int, bytes] = {}

    def register(self, fd: int) -> int:
        backing_id = len(self.files) + 1
        self.files[backing_id] = os.pread(fd, os.fstat(fd).st_size, 0)
        return backing_id

    def kernel(self) -> Kernel:
        return Kernel(lambda: True, self.register, lambda backing_id: None)


def test_the_first_open_of_a_checkpoint_file_waits_for_its_last_byte_and_is_passthrough(tmp_path: Path) -> None:
    """A cold open: the whole-file prefetch starts at the open, which returns once the file is complete, with a
    backing id of the file's bytes: the loader's reads never reach the daemon, each byte fetched once. The
    shard's set is scheduled at that open too."""
    src = source_dir(tmp_path)
    shards = [write_safetensors(src / f"model-0000{k}-of-00003.safetensors", {f"t{i}": 90_001 for i in range(12)})
              for k in (1, 2, 3)]
    registry = Registry()
    core, close = make_core(src, tmp_path / "cache", kernel=registry.kernel())

    async def body(core: ModelFS) -> None:
        fh = core.open(await lookup(core, "model-00001-of-00003.safetensors"), os.O_RDONLY)
        backing_id = await core.backing_id(fh)
        assert backing_id and registry.files[backing_id] == shards[0]
        assert core.stats.open_waits == 1 and core.stats.bytes_served == 0
        await settle(core)  # the other shards were scheduled by that open
        assert core.stats.bytes_fetched == sum(map(len, shards))
        fh2 = core.open(await lookup(core, "model-00002-of-00003.safetensors"), os.O_RDONLY)
        assert registry.files[await core.backing_id(fh2)] == shards[1]
        assert core.stats.open_waits == 1 and core.stats.bytes_fetched == sum(map(len, shards))

    run_and_close(core, close, body)


def test_a_new_daemon_checks_each_extent_of_a_set_once_before_its_opens(tmp_path: Path) -> None:
    """A daemon that starts on a cache holding a whole set must read back and hash each extent before the
    kernel gets its file, and only once: the index's open (a loader's first) checks no shard, the first
    shard's open has the others checked ahead by the prefetcher, and the loader opening them next finds them
    checked (or joins the check in progress)."""
    src = source_dir(tmp_path)
    names = [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    shards = [write_safetensors(src / n, {f"t{i}": 90_001 for i in range(12)}) for n in names]
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"t0": names[0]}}))
    names.insert(0, "model.safetensors.index.json")
    shards.insert(0, (src / names[0]).read_bytes())

    async def cold(core: ModelFS) -> None:
        for name, data in zip(names, shards, strict=True):
            fh = core.open(await lookup(core, name), os.O_RDONLY)
            if not await core.backing_id(fh):  # the index: not a file an open waits for
                assert bytes(await core.read(fh, 0, len(data))) == data
        await settle(core)

    run_and_close(*make_core(src, tmp_path / "cache", kernel=Registry().kernel()), cold)
    registry = Registry()
    core, close = make_core(src, tmp_path / "cache", kernel=registry.kernel())

    async def warm(core: ModelFS) -> None:
        inodes = [await lookup(core, name) for name in names]
        for inode, data in zip(inodes, shards, strict=True):  # opened one after the other, as a loader does
            backing_id = await core.backing_id(core.open(inode, os.O_RDONLY))
            assert backing_id and registry.files[backing_id] == data
        await settle(core)
        extents = sum(len(core.version(core.node(inode)).extents()) for inode in inodes)
        assert core.cache.reads_verified == extents
        assert core.stats.gets == 0 and core.stats.bytes_served == 0

    run_and_close(core, close, warm)


def test_an_open_waits_no_longer_than_the_bound_then_reads_come_to_the_daemon(tmp_path: Path) -> None:
    src = source_dir(tmp_path)
    data = write_safetensors(src / "m.safetensors", {f"t{i}": 70_001 for i in range(40)})
    core, close = make_core(src, tmp_path / "cache", kernel=Registry().kernel(),
                            **{"mount.passthrough_wait": "0.000001"})

    async def body(core: ModelFS) -> None:
        fh = core.open(await lookup(core, "m.safetensors"), os.O_RDONLY)
        assert await core.backing_id(fh) == 0
        assert core.stats.open_wait_expired == 1
        assert bytes(await core.read(fh, 0, len(data))) == data
        await settle(core)
        assert core.stats.bytes_fetched == len(data)

    run_and_close(core, close, body)


def test_a_reopen_of_a_file_the_kernel_may_hold_costs_no_get(tmp_path: Path) -> None:
    """A file read through READs has its pages in the kernel's page cache, which outlive its cache file (evicted
    under a quota): a later open that the kernel answers from those pages must not fetch the file again, so it
    does not wait for the file either."""
    src = source_dir(tmp_path)
    data = write_safetensors(src / "m.safetensors", {f"t{i}": 70_001 for i in range(10)})
    core, close = make_core(src, tmp_path / "cache", kernel=Registry().kernel())

    async def body(core: ModelFS) -> None:
        inode = await lookup(core, "m.safetensors")
        fh = core.open(inode, os.O_RDONLY)  # an open in cached mode (no backing id asked for)
        assert bytes(await core.read(fh, 0, len(data))) == data
        core.release(fh)
        await settle(core)
        ver = core.version(core.node(inode))
        core.cache.drop(ver.vid, 0, "evicted (test)")
        gets = core.stats.gets
        fh = core.open(inode, os.O_RDONLY)
        assert await core.backing_id(fh) == 0
        await settle(core)
        assert core.stats.gets == gets and core.stats.open_waits == 0

    run_and_close(core, close, body)


def test_demand_reads_during_prefetch_fetch_each_byte_once(tmp_path: Path) -> None:
    src = source_dir(tmp_path)
    data = write_safetensors(src / "m.safetensors", {f"t{i}": 70_001 for i in range(40)})
    core, close = make_core(src, tmp_path / "cache")

    async def body(core: ModelFS) -> None:
        fh = core.open(await lookup(core, "m.safetensors"), os.O_RDONLY)
        got = bytearray()
        for off in range(0, len(data), 100_000):  # the loader reads while the prefetcher runs
            got += await core.read(fh, off, 100_000)
        assert bytes(got) == data
        await settle(core)
        assert core.stats.bytes_fetched == len(data)

    run_and_close(core, close, body)


def test_index_json_schedules_every_shard(tmp_path: Path) -> None:
    src = tmp_path / "src" / "llama"
    src.mkdir(parents=True)
    sizes = {}
    weight_map = {}
    for k in range(1, 4):
        name = f"model-{k:05d}-of-00003.safetensors"
        sizes[name] = len(write_safetensors(src / name, {f"l{k}.w": 200_000}))
        weight_map[f"l{k}.w"] = name
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    core, close = make_core(tmp_path / "src", tmp_path / "cache")

    async def body(core: ModelFS) -> None:
        fh = core.open(await lookup(core, "llama/model.safetensors.index.json"), os.O_RDONLY)
        await core.read(fh, 0, 1)
        await settle(core)
        for name, size in sizes.items():
            assert await core.cached_bytes(await lookup(core, f"llama/{name}")) == size
        assert core.stats.pushed_bytes == 0  # nothing is open: cache only

    run_and_close(core, close, body)


def test_first_shard_schedules_its_set_bounded_by_cache_space(tmp_path: Path) -> None:
    src = source_dir(tmp_path)
    for k in range(1, 4):
        write_safetensors(src / f"w-{k:05d}-of-00003.safetensors", {"x": 300_000})
    write_safetensors(src / "other-00001-of-00002.safetensors", {"x": 300_000})
    core, close = make_core(src, tmp_path / "cache")

    async def body(core: ModelFS) -> None:
        fh = core.open(await lookup(core, "w-00001-of-00003.safetensors"), os.O_RDONLY)
        await core.read(fh, 0, 1)
        await settle(core)
        for k in (2, 3):
            assert await core.cached_bytes(await lookup(core, f"w-{k:05d}-of-00003.safetensors")) > 0
        assert await core.cached_bytes(await lookup(core, "other-00001-of-00002.safetensors")) == 0

    run_and_close(core, close, body)
    core, close = make_core(src, tmp_path / "cache2", **{"cache.min_free": "100TiB"})

    async def no_space(core: ModelFS) -> None:
        fh = core.open(await lookup(core, "w-00001-of-00003.safetensors"), os.O_RDONLY)
        await core.read(fh, 0, 1)
        await settle(core)
        assert await core.cached_bytes(await lookup(core, "w-00002-of-00003.safetensors")) == 0

    try:
        run(core, no_space)
    finally:
        close()


def test_a_set_that_does_not_fit_is_reported_once_not_at_every_open(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Loaders open shards over and over; a cache too small for the set is said once per directory (the
    soak found this line logged 90,000 times in four minutes)."""
    src = source_dir(tmp_path)
    for k in range(1, 4):
        write_safetensors(src / f"w-{k:05d}-of-00003.safetensors", {"x": 300_000})
    core, close = make_core(src, tmp_path / "cache", **{"cache.min_free": "100TiB"})

    async def body(core: ModelFS) -> None:
        for _ in range(5):
            fh = core.open(await lookup(core, "w-00001-of-00003.safetensors"), os.O_RDONLY)
            await core.read(fh, 0, 1)
            await settle(core)
            core.release(fh)

    caplog.set_level(logging.INFO, logger="modelfs.reads.prefetch")
    run_and_close(core, close, body)
    said = [r for r in caplog.records if "not prefetching" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]


def test_open_files_are_pushed_to_the_page_cache_once(tmp_path: Path) -> None:
    src = source_dir(tmp_path)
    data = write_safetensors(src / "m.safetensors", {f"t{i}": 99_999 for i in range(10)})
    pushed: dict[int, bytes] = {}
    core, close = make_core(src, tmp_path / "cache", push=lambda inode, off, buf: pushed.__setitem__(off, bytes(buf)),
                            **{"prefetch.push_min_available": "0", "prefetch.page_cache_push": "true"})

    async def body(core: ModelFS) -> None:
        inode = await lookup(core, "m.safetensors")
        fh = core.open(inode, os.O_RDONLY)
        assert bytes(await core.read(fh, 0, 1)) == data[:1]  # the first READ starts the job
        await settle(core)
        assert b"".join(pushed[o] for o in sorted(pushed)) == data[1:]  # every byte the READ did not answer
        assert min(pushed) == 1 and core.stats.pushed_bytes == len(data) - 1
        core.release(fh)
        core.open(inode, os.O_RDONLY)  # re-open: the kernel still has the pages, nothing to push
        await settle(core)
        assert core.stats.pushed_bytes == len(data) - 1

    run_and_close(core, close, body)


def test_bytes_a_read_answered_are_left_out_of_the_push(tmp_path: Path) -> None:
    """A cold loader often reads an extent as it lands, before its push: the pages the READs filled are
    not copied into the kernel a second time; the rest of the extent is."""
    src = source_dir(tmp_path)
    data = os.urandom(20 * EXTENT)
    (src / "blob.dat").write_bytes(data)  # not a checkpoint name: prefetched as a sequential stream
    pushed: dict[int, bytes] = {}
    core, close = make_core(src, tmp_path / "cache", push=lambda inode, off, buf: pushed.__setitem__(off, bytes(buf)),
                            **{"prefetch.push_min_available": "0", "prefetch.page_cache_push": "true",
                               "prefetch.initial_window": str(4 * EXTENT)})
    step = EXTENT // 4

    async def body(core: ModelFS) -> None:
        fh = core.open(await lookup(core, "blob.dat"), os.O_RDONLY)
        for off in range(0, 3 * step, step):  # the third READ makes it a stream: its window is pushed
            assert bytes(await core.read(fh, off, step)) == data[off:off + step]
        await settle(core)
        first = min(pushed)
        assert first == 3 * step, sorted(pushed)  # extent 0 is pushed from where the READs stopped
        got = b"".join(pushed[o] for o in sorted(pushed))
        assert got == data[first:first + len(got)] and len(got) >= 4 * EXTENT - first
        assert core.stats.pushed_bytes == len(got)

    run_and_close(core, close, body)


def test_warm_fills_the_cache_and_reports(tmp_path: Path) -> None:
    src = source_dir(tmp_path)
    (src / "blob.gguf").write_bytes(os.urandom(7 * EXTENT + 5))
    core, close = make_core(src, tmp_path / "cache")

    async def body(core: ModelFS) -> None:
        inode = await lookup(core, "blob.gguf")
        assert await core.warm(inode) == {"size": 7 * EXTENT + 5, "fetched": 7 * EXTENT + 5}
        assert await core.cached_bytes(inode) == 7 * EXTENT + 5
        assert (await core.warm(inode))["fetched"] == 0

    run_and_close(core, close, body)


def test_buffer_pool_serves_demand_first() -> None:
    order: list[str] = []

    async def main() -> None:
        pool = BufferPool(1, 4096)
        held = await pool.acquire(demand=False)

        async def take(tag: str, demand: bool) -> None:
            buf = await pool.acquire(demand)
            order.append(tag)
            pool.release(buf)

        async with trio.open_nursery() as n:
            for i in range(3):
                n.start_soon(take, f"p{i}", False)
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(take, "d", True)
            await trio.testing.wait_all_tasks_blocked()
            assert pool.waiting == 4
            pool.release(held)
        assert pool.free == 1 and pool.waiting == 0

    trio.run(main)
    assert order[0] == "d" and sorted(order[1:]) == ["p0", "p1", "p2"]


def test_cancelled_waiter_does_not_leak_a_buffer() -> None:
    async def main() -> None:
        pool = BufferPool(1, 4096)
        held = await pool.acquire(demand=True)
        async with trio.open_nursery() as n:
            n.start_soon(pool.acquire, False)
            await trio.testing.wait_all_tasks_blocked()
            assert pool.waiting == 1
            n.cancel_scope.cancel()
        pool.release(held)
        assert pool.free == 1 and pool.waiting == 0
        again = await pool.acquire(demand=False)
        assert again is held  # reused, not a new one

    trio.run(main)


@pytest.mark.parametrize("budget", ["128KiB", "1MiB"])
def test_memory_budget_bounds_get_buffers(tmp_path: Path, budget: str) -> None:
    """A cold load of a file far larger than the budget holds no more GET-buffer bytes than the budget: the
    bytes of every buffer the pool hands out (the real mappings, not a count of them) add up to at most it."""
    src = source_dir(tmp_path)
    data = write_safetensors(src / "m.safetensors", {f"t{i}": 5 * EXTENT + i for i in range(40)})
    # One extent per GET (each GET holds one buffer however long it is): many GETs, many buffers at once.
    core, close = make_core(src, tmp_path / "cache",
                            **{"fetch.memory_budget": budget, "fetch.max_request": str(EXTENT)})
    handed: dict[int, mmap.mmap] = {}  # id -> every buffer handed out (kept alive, so ids stay unique)
    take = core.buffers._take

    def recording_take() -> mmap.mmap:
        buf = take()
        handed[id(buf)] = buf
        return buf

    core.buffers._take = recording_take  # type: ignore[method-assign]

    async def body(core: ModelFS) -> None:
        fh = core.open(await lookup(core, "m.safetensors"), os.O_RDONLY)
        got = bytearray()
        for off in range(0, len(data), 100_000):
            got += await core.read(fh, off, 100_000)
        await settle(core)
        assert bytes(got) == data
        budget_bytes = int(core.cfg.fetch.memory_budget)
        assert len(data) > 10 * budget_bytes
        held = sum(len(buf) for buf in handed.values())
        assert 0 < held <= budget_bytes, (held, budget_bytes, len(handed))
        # The load kept many buffers busy at once, so the bound was exercised, not idle. (How many of them
        # depends on how prefetch, started by the first READ, and the reads interleave.)
        assert len(handed) >= core.buffers.total // 2, (len(handed), core.buffers.total)
        await trio.testing.wait_all_tasks_blocked()
        assert core.buffers.free == core.buffers.total  # every buffer came back
        assert {id(b) for b in core.buffers._free} == set(handed)  # ... and no other buffer was made
        assert core.counters()["get_buffer_bytes"] == held  # what `modelfs stats` and the soak see

    run_and_close(core, close, body)


def test_an_idle_daemon_gives_back_its_buffers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a load, an idle core drops the extents it holds in memory and returns its GET buffers' pages to
    the system; the next read still gets every byte."""
    import ctypes
    import ctypes.util
    import mmap

    import modelfs.core

    monkeypatch.setattr(modelfs.core, "IDLE_TRIM", 0.05)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    src = source_dir(tmp_path)
    data = write_safetensors(src / "m.safetensors", {f"t{i}": 3 * EXTENT + i for i in range(8)})
    core, close = make_core(src, tmp_path / "cache")

    def resident(buf: mmap.mmap) -> int:
        vec = ctypes.create_string_buffer(len(buf) // page)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))  # a writable anonymous mapping
        assert libc.mincore(addr, len(buf), vec) == 0
        return sum(b & 1 for b in vec.raw)

    async def body(core: ModelFS) -> None:
        fh = core.open(await lookup(core, "m.safetensors"), os.O_RDONLY)
        assert bytes(await core.read(fh, 0, len(data))) == data
        await settle(core)
        assert core.buffers._free
        assert any(resident(b) for b in core.buffers._free)
        with trio.fail_after(30):
            while core.blocks.held or any(resident(b) for b in core.buffers._free):
                await trio.sleep(0.05)
        assert bytes(await core.read(fh, 1000, 5 * EXTENT)) == data[1000:1000 + 5 * EXTENT]

    run_and_close(core, close, body)
