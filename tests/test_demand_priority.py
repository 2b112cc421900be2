"""Demand reads get bandwidth, not only buffers (`buffers.BufferPool`): through a real mount, SeaweedFS and the
fault proxy, a loader's READ is answered while every GET prefetch may run is stalled at the store; without a
mount, the pool's rules themselves, and a coalesced prefetch GET joined by a demand read.

Ordering, not time: each READ must return while the stalled GETs are still held; the bounds only detect a
hang.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest

import modelfs.core
from modelfs.catalog.manifest import KEY as MANIFEST_KEY
from modelfs.catalog.manifest import FileEntry, Manifest, file_extents
from modelfs.core import ModelFS
from modelfs.fetch.buffers import Ask, BufferPool
from modelfs.remote.base import ObjectInfo
from modelfs.service.metrics import _StatsCollector
from modelfs.stats import ReadWaits
from tests.conftest import Checkpoint, Mount, cli, requires_fuse
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.memstore import MemoryStore
from tests.support.seaweed import SeaweedServer
from tests.test_core_faults import EXTENT, open_file, run, write_safetensors

KiB = 1 << 10
#: 32 GET buffers of 256 KiB for prefetch (the soak saw up to 32 GETs in flight) and the default reserve of 2
#: on top; 34 prefetch workers, so the pool, not the workers, is what limits prefetch. Hedging off and a
#: read timeout past every bound: a stalled GET stays one stalled request. fetch.deadline: a READ that waits
#: for a buffer held by a stalled GET gets EIO there instead of hanging the test. One extent per GET
#: (fetch.max_request): a GET of several would stream through one buffer, and 32 GETs are the point.
BUSY = ["-o", "cache.extent_size=256KiB", "-o", "fetch.max_request=256KiB", "-o", "fetch.concurrency=32",
        "-o", "fetch.memory_budget=16MiB",
        "-o", "prefetch.concurrency=34", "-o", "prefetch.whole_file=false", "-o", "prefetch.checkpoint_sets=false",
        "-o", "prefetch.sequential=false", "-o", "s3.hedge_after=0", "-o", "s3.read_timeout=300",
        "-o", "fetch.deadline=60", "-o", "s3.max_pool_connections=96"]
PREFETCH_GETS = 32

READ_AT = """
import hashlib, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: this READ and no other
try:
    print(hashlib.sha256(os.pread(fd, int(sys.argv[3]), int(sys.argv[2]))).hexdigest())
except OSError as e:
    print("errno", e.errno)
"""


@pytest.fixture
def proxy(seaweed: SeaweedServer, s3_checkpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(seaweed.endpoint_url) as p:
        yield p


@requires_fuse
@pytest.mark.mount
@pytest.mark.s3
def test_a_demand_read_is_answered_after_one_get_while_32_prefetch_gets_are_stalled(
        proxy: FaultProxy, seaweed: SeaweedServer, s3_checkpoint: str, checkpoint: Checkpoint,
        mounter: Callable[..., Mount]) -> None:
    """`modelfs prefetch` of one shard fills every GET prefetch may run, and the store holds them all; a
    loader's READ of another file is answered by one GET of its own while all of those are still held."""
    env = {**seaweed.env(), "AWS_ENDPOINT_URL": proxy.endpoint_url}
    m = mounter(s3_checkpoint, env=env, args=BUSY)
    shard = sorted(f for f in checkpoint.files() if f.endswith(".safetensors"))[0]
    other = checkpoint.torch_file
    shard_key, other_key = shard.split("/")[-1], other.split("/")[-1]
    assert checkpoint.files()[shard] >= 40 * 256 * KiB  # more extents than prefetch may fetch at once
    rule = proxy.add_rule(Fault.stall(600), method="GET", path_contains=shard_key, ranged=True)
    warm = subprocess.Popen([sys.executable, "-m", "modelfs", "prefetch", "-q", str(m.path / shard)],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reader: subprocess.Popen[str] | None = None
    try:
        assert proxy.wait_stalled(PREFETCH_GETS, timeout=120), proxy.stalled
        offset, size = 5 * 256 * KiB, 4096
        reader = subprocess.Popen([sys.executable, "-c", READ_AT, str(m.path / other), str(offset), str(size)],
                                  stdout=subprocess.PIPE, text=True)
        try:  # the bound only detects a hang: before the reserve, this READ waited for fetch.deadline (60 s)
            out, _ = reader.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the demand READ was not answered while the prefetch GETs were stalled")
        with open(checkpoint.root / other, "rb") as f:
            f.seek(offset)
            assert out.strip() == hashlib.sha256(f.read(size)).hexdigest()
        # Ordering, not time: answered while every prefetch GET was still held at the proxy, unanswered (and
        # prefetch never took the reserve) ...
        assert proxy.stalled == PREFETCH_GETS and rule.fired == PREFETCH_GETS
        # ... by exactly one GET of its own, the only GET the daemon completed.
        assert proxy.requests_matching(method="GET", path_contains=other_key, ranged=True) == 1
        assert proxy.requests_matching(method="GET", ranged=True) == rule.fired + 1
        st = m.stats()
        assert st["gets"] == 1 and st["read_timeouts"] == 0, st
        assert st["read_wait_max_ms"] >= 0 and st["read_wait_p99_ms"] <= st["read_wait_max_ms"], st
    finally:
        proxy.clear()
        proxy.release()
        warm.wait(timeout=300)  # it may fail: its flights past fetch.deadline while stalled
        if reader is not None and reader.poll() is None:
            reader.kill()
    r = cli("prefetch", "-q", str(m.path / shard), env=env)  # every byte arrived after the stall
    assert r.returncode == 0, r.stderr


# -- the pool's rules, without a store -------------------------------------------------------------------


def pool_run(body: Callable[[BufferPool, trio.Nursery], Awaitable[None]], count: int = 8, reserve: int = 2,
             cap: int = 2) -> None:
    async def main() -> None:
        pool = BufferPool(count, 4096, reserve=reserve, cap=cap)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await body(pool, nursery)
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_prefetch_leaves_the_reserve_and_a_demand_buffer_is_handed_out_at_once() -> None:
    async def body(pool: BufferPool, nursery: trio.Nursery) -> None:
        held = [await pool.acquire(demand=False) for _ in range(6)]
        waiting = Ask(1, demand=False)  # a 7th: waits
        nursery.start_soon(pool.take, waiting)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.held_by_prefetch == 6 and pool.free == 2 and not waiting.granted
        d1 = await pool.acquire(demand=True)  # no waiting for any prefetch GET to end
        d2 = await pool.acquire(demand=True)
        assert pool.free == 0 and pool.demand_active
        pool.release(held.pop())  # a prefetch GET ends while demand GETs run: prefetch holds 5 > cap 2
        await trio.testing.wait_all_tasks_blocked()
        assert not waiting.granted and pool.free == 1
        pool.release(d1)
        pool.release(d2)  # no demand left: prefetch fills up to its limit again
        await trio.testing.wait_all_tasks_blocked()
        assert waiting.granted and pool.held_by_prefetch == 6

    pool_run(body)


def test_while_demand_runs_prefetch_goes_on_below_the_cap_and_a_large_request_alone() -> None:
    async def body(pool: BufferPool, nursery: trio.Nursery) -> None:
        d = await pool.acquire(demand=True)
        one = await pool.acquire(demand=False)
        two = await pool.acquire(demand=False)  # prefetch below the cap of 2 while demand runs
        third = Ask(1, demand=False)
        nursery.start_soon(pool.take, third)
        await trio.testing.wait_all_tasks_blocked()
        assert not third.granted  # at the cap
        pool.release(one)
        await trio.testing.wait_all_tasks_blocked()
        assert third.granted  # one ended, one more starts: prefetch never stops while demand runs
        pool.release(two)
        pool.release(third.bufs[0])  # type: ignore[index]
        big = Ask(4, demand=False)  # a coalesced GET larger than the cap: runs when prefetch holds nothing
        nursery.start_soon(pool.take, big)
        await trio.testing.wait_all_tasks_blocked()
        assert big.granted and pool.held_by_prefetch == 4
        pool.release_all(big.bufs)  # type: ignore[arg-type]
        pool.release(d)
        assert pool.free == 8 and pool.waiting == 0

    pool_run(body)


def test_a_promoted_request_is_served_as_demand_and_a_cancelled_head_lets_the_rest_through() -> None:
    async def body(pool: BufferPool, nursery: trio.Nursery) -> None:
        held = [await pool.acquire(demand=False) for _ in range(6)]
        run_ask = Ask(2, demand=False)  # a coalesced prefetch GET waiting for buffers ...
        nursery.start_soon(pool.take, run_ask)
        await trio.testing.wait_all_tasks_blocked()
        assert not run_ask.granted
        pool.promote(run_ask)  # ... that a demand read joined: the reserve is its
        await trio.testing.wait_all_tasks_blocked()
        assert run_ask.granted and pool.demand_active
        pool.release_all(run_ask.bufs)  # type: ignore[arg-type]
        with trio.CancelScope() as scope:
            head = Ask(6, demand=False)
            behind = Ask(1, demand=False)
            async with trio.open_nursery() as inner:
                inner.start_soon(pool.take, head)
                await trio.testing.wait_all_tasks_blocked()
                inner.start_soon(pool.take, behind)
                await trio.testing.wait_all_tasks_blocked()
                assert not behind.granted  # FIFO: nobody overtakes the head
                scope.cancel()
        assert not head.granted and pool.waiting == 0
        pool.release_all(held)
        assert pool.free == 8

    pool_run(body)


@pytest.mark.parametrize("seed", range(20))
def test_random_traffic_never_deadlocks_and_keeps_the_limits(seed: int) -> None:
    """Demand and prefetch GETs of 1-4 buffers, some cancelled while waiting, some promoted: every grant
    keeps prefetch within its limits, and every request not cancelled is eventually granted."""
    rnd = random.Random(seed)
    count, reserve, cap = rnd.choice([(1, 2, 1), (3, 1, 1), (8, 2, 2), (16, 2, 4)])

    async def body(pool: BufferPool, nursery: trio.Nursery) -> None:
        granted = 0
        done = trio.Event()

        async def gets() -> None:
            nonlocal granted
            demand = rnd.random() < 0.3
            ask = pool.ask(rnd.randint(1, 4), demand)
            bufs = None
            with trio.CancelScope() as scope:
                if rnd.random() < 0.1:
                    scope.deadline = trio.current_time() + rnd.random() * 0.01
                if not demand and rnd.random() < 0.1:
                    nursery.start_soon(promote_later, ask)
                bufs = await pool.take(ask)
            if bufs is None:
                return  # cancelled while waiting: holds nothing
            assert pool.held_by_prefetch <= pool.prefetch_max and pool.free >= 0
            granted += 1
            await trio.sleep(rnd.random() * 0.005)
            pool.release_all(bufs)

        async def promote_later(ask: Ask) -> None:
            await trio.sleep(rnd.random() * 0.003)
            pool.promote(ask)

        async def all_of_them() -> None:
            async with trio.open_nursery() as inner:
                for _ in range(200):
                    inner.start_soon(gets)
                    if rnd.random() < 0.3:
                        await trio.sleep(rnd.random() * 0.002)
            done.set()

        nursery.start_soon(all_of_them)
        await done.wait()
        assert granted > 0 and pool.waiting == 0 and pool.free == pool.total and not pool.demand_active

    pool_run(body, count=count, reserve=reserve, cap=cap)


# -- a coalesced prefetch GET, through the core (in-memory store) ----------------------------------------------


class KeyStall(MemoryStore):
    """The in-memory store, with the first `times` ranged reads of one key held until `release` (the proxy's
    stall rule, by key, with `times`)."""

    def __init__(self, stalled_key: str, times: int) -> None:
        super().__init__()
        self.stalled_key = stalled_key
        self.times = times
        self.held = 0  # reads of that key held right now
        self.asked = 0  # reads of that key that reached the store, held or not
        self._open = threading.Event()
        self._count = threading.Lock()

    def read_into(self, obj: ObjectInfo, start: int, views: object, filled: object = None) -> None:
        with self._count:
            self.asked += obj.key == self.stalled_key
            stall = obj.key == self.stalled_key and self.times > 0 and not self._open.is_set()
            if stall:
                self.times -= 1
                self.held += 1
        if stall:
            try:
                self._open.wait()
            finally:
                with self._count:
                    self.held -= 1
        super().read_into(obj, start, views, filled)  # type: ignore[arg-type]

    def release(self) -> None:
        self._open.set()
        super().release()


def test_a_demand_read_joining_a_coalesced_prefetch_get_that_waits_for_buffers_is_served_first(
        tmp_path: Path) -> None:
    """Coalesced prefetch GETs of a published file hold every buffer prefetch may have, stalled; a further
    coalesced GET has its flights made but waits for buffers. A demand READ of one of its extents joins that
    flight, which then takes demand buffers: answered while the others are still held."""
    local = tmp_path / "m.safetensors"
    write_safetensors(local, [EXTENT] * 24)
    data = local.read_bytes()
    store = KeyStall("m.safetensors", times=6)
    info = store.add("m.safetensors", data)
    extents = file_extents(str(local), EXTENT)
    store.add(MANIFEST_KEY, Manifest({"m.safetensors": FileEntry(len(data), info.etag, extents)}).dumps())

    async def body(core: ModelFS) -> None:
        await core.ns.children(core.ns.root)  # reads the manifest
        node = await core.lookup(1, "m.safetensors")
        ver = core.version(node)
        assert ver.layout is not None
        pool = core.buffers
        starts = [s for s, _ in ver.extents()]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(core.warm, node.inode)
            while store.held < 6 or pool.waiting < 1:  # GETs stalled with all prefetch buffers, one more queued
                await trio.sleep(0.01)
            assert pool.held_by_prefetch == pool.prefetch_max and pool.free == pool.reserve
            queued = [s for s in starts if (f := core.fetcher.flight(ver, s)) is not None and f.ask is not None
                      and not f.ask.granted]
            assert queued, "no coalesced flight waits for buffers"
            fh = await open_file(core, "m.safetensors")
            got = bytes(await core.read(fh, queued[0] + 10, 100))  # joins that flight
            assert got == data[queued[0] + 10:queued[0] + 110]
            assert store.held == 6 and pool.held_by_prefetch == pool.prefetch_max  # the others still held
            assert store.asked == 7  # by one GET of its own
            store.release()
        fh = await open_file(core, "m.safetensors")
        assert bytes(await core.read(fh, 0, len(data))) == data

    # 8 buffers of one extent, 2 reserved: six coalesced GETs of 2 extents (one buffer each: a GET streams its
    # extents through one) fill prefetch's 6.
    run(store, tmp_path / "cache", body, **{"prefetch.whole_file": "true", "fetch.memory_budget": str(8 * EXTENT),
                                            "fetch.concurrency": "8", "fetch.max_request": str(2 * EXTENT)})


# -- read_wait_seconds ------------------------------------------------------------------------------------


def test_a_read_of_a_held_block_counts_as_no_wait_without_a_clock_read(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryStore()
    data = os.urandom(2 * EXTENT)
    store.add("w.bin", data)

    def no_clock() -> float:
        raise AssertionError("the fast path read the clock")

    async def body(core: ModelFS) -> None:
        fh = await open_file(core, "w.bin")
        assert bytes(await core.read(fh, 0, 100)) == data[:100]  # a GET: timed
        waits = core.read_wait
        assert waits.instant == 0 and sum(waits.counts) == 1 and waits.max > 0
        with monkeypatch.context() as m:
            m.setattr(modelfs.core, "time", SimpleNamespace(monotonic=no_clock))
            assert bytes(await core.read(fh, 100, 100)) == data[100:200]  # the block is held: at once
        assert waits.instant == 1 and sum(waits.counts) == 1
        c = core.counters()
        assert c["read_wait_p50_ms"] == 0 and c["read_wait_max_ms"] == round(waits.max * 1000)

    run(store, tmp_path / "cache", body)


def test_read_wait_histogram_exposition() -> None:
    """Instant READs land in the lowest bucket and in _count; the gauge is the longest wait."""
    waits = ReadWaits()
    waits.instant = 3
    waits.observe(0.2)
    waits.observe(90.0)
    registry = CollectorRegistry()
    registry.register(_StatsCollector(lambda: {}, lambda: False, waits))
    text = generate_latest(registry).decode()
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("modelfs_read_wait"))
    assert float(values['modelfs_read_wait_seconds_bucket{le="0.001"}']) == 3
    assert float(values['modelfs_read_wait_seconds_bucket{le="0.25"}']) == 4
    assert float(values['modelfs_read_wait_seconds_bucket{le="60"}']) == 4
    assert float(values['modelfs_read_wait_seconds_bucket{le="+Inf"}']) == 5
    assert float(values["modelfs_read_wait_seconds_count"]) == 5
    assert float(values["modelfs_read_wait_seconds_sum"]) == pytest.approx(90.2)
    assert float(values["modelfs_read_wait_max_seconds"]) == 90.0
    assert waits.counters() == {"read_wait_p50_ms": 0, "read_wait_p99_ms": 90000, "read_wait_max_ms": 90000}
    waits.instant = 0  # then the median is in the bucket of 0.2 s: its bound
    assert waits.counters()["read_wait_p50_ms"] == 250


@requires_fuse
@pytest.mark.mount
@pytest.mark.s3
def test_read_wait_is_served_on_the_metrics_endpoint(seaweed: SeaweedServer, s3_checkpoint: str,
                                                     checkpoint: Checkpoint, mounter: Callable[..., Mount]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    m = mounter(s3_checkpoint, env=seaweed.env(), args=["-o", f"metrics.address=127.0.0.1:{port}",
                                                        "-o", "mount.passthrough_wait=0"])  # READs wait
    with open(m.path / checkpoint.torch_file, "rb") as f:
        while f.read(1 << 20):
            pass
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    values = {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                       if line.startswith("modelfs_read_wait"))}
    count = values["modelfs_read_wait_seconds_count"]
    assert count >= 1 and values['modelfs_read_wait_seconds_bucket{le="+Inf"}'] == count
    assert values["modelfs_read_wait_max_seconds"] > 0  # the first READ waited for a GET
    st = m.stats()
    assert st["read_wait_max_ms"] >= st["read_wait_p99_ms"] >= st["read_wait_p50_ms"] >= 0, st
