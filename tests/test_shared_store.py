"""The shared cache tier over the `WritableStore` interface, without S3: the in-memory store and a directory
(the tier on a file system every node mounts), each a real implementation. Two nodes' tiers share one
store, as two daemons share one bucket."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

import pytest
import trio

from modelfs.cache import FileCache
from modelfs.catalog.index import ChunkIndex
from modelfs.catalog.version import FileVersion, Stored
from modelfs.digest import content_hash
from modelfs.health import Health
from modelfs.remote import ObjectInfo, Store, WritableStore
from modelfs.remote.local import LocalStore
from modelfs.remote.sources import Block, Origin
from modelfs.shared import SharedTier, claim_key
from modelfs.stats import Stats
from modelfs.supervise import Supervisor
from tests.support.memstore import MemoryStore

EXTENT = 1 << 20


def memory(_: Path) -> WritableStore:
    return MemoryStore("tier")


def directory(root: Path) -> WritableStore:
    (root / "tier").mkdir()
    return LocalStore(str(root / "tier"))


STORES = [pytest.param(memory, id="memory"), pytest.param(directory, id="directory")]
MakeStore = Callable[[Path], WritableStore]


def local_cache(root: Path) -> FileCache:
    """A node's own cache (files and index), as its daemon has: write-backs are read back from it."""
    return FileCache(str(root), ChunkIndex(str(root / "index"), 1 << 24), "test-domain", "mem:origin",
                     preallocate=False)


def origin(store: Store | None = None) -> Origin:
    """The origin a tier wraps: the real one, over an in-memory store (empty unless given)."""
    store = store or MemoryStore("origin")
    return Origin(store, Stats(), Health(store.check, "origin", 60.0, 5.0))


def tier(store: WritableStore, root: Path, node: str, sup: Supervisor, deadline: float = 5.0,
         behind: Origin | None = None, clock: Callable[[], float] = time.monotonic) -> tuple[SharedTier, FileCache]:
    cache = local_cache(root / node)
    return SharedTier(store, "test-domain", Stats(), cache.read_back, behind or origin(), deadline=deadline,
                      probe_interval=1.0, node=node, supervisor=sup, clock=clock), cache


class Clock:
    """A clock the test moves by hand (`SharedTier(clock=...)`): claim waits are timed by it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def version(size: int = EXTENT) -> FileVersion:
    return FileVersion.of("mem:origin", ObjectInfo("m.safetensors", size, '"etag-1"', 0.0), EXTENT)


def blk(ver: FileVersion, start: int) -> Block:
    """The extent of `ver` at `start`, as the fetcher asks a source for it."""
    return ver.blocks([ver.extent_at(start)])[0]


def run(sup: Supervisor, tiers: list[SharedTier], body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        async with sup.running() as nursery:
            for t in tiers:
                t.start()
            with trio.fail_after(60):  # detects a hang only
                await body()
            nursery.cancel_scope.cancel()

    trio.run(main)


async def written(t: SharedTier) -> None:
    """Until the tier has no write-back queued or in progress."""
    while t.pending:
        await trio.sleep(0.01)


@pytest.mark.parametrize("make", STORES)
def test_a_block_written_back_by_one_node_is_read_verified_by_another(make: MakeStore, tmp_path: Path) -> None:
    store, sup, data = make(tmp_path), Supervisor(Stats()), os.urandom(EXTENT)
    (a, a_cache), (b, _) = tier(store, tmp_path, "a", sup), tier(store, tmp_path, "b", sup)
    ver, digest = version(), content_hash(data)
    view = memoryview(bytearray(EXTENT))

    async def body() -> None:
        assert await trio.to_thread.run_sync(b.fetch, blk(ver, 0), view) is None  # nothing there yet
        await trio.to_thread.run_sync(a_cache.write, ver, 0, memoryview(data), digest)
        await trio.to_thread.run_sync(a.write_back, blk(ver, 0), digest)
        await written(a)
        assert await trio.to_thread.run_sync(b.fetch, blk(ver, 0), view) == digest

    run(sup, [a, b], body)
    assert bytes(view) == data
    assert a.stats.shared_bytes_written == EXTENT and b.stats.shared_hits == 1 and b.stats.shared_misses == 1


@pytest.mark.parametrize("make", STORES)
def test_damaged_bytes_in_the_tier_are_never_served(make: MakeStore, tmp_path: Path) -> None:
    store, sup, data = make(tmp_path), Supervisor(Stats()), os.urandom(EXTENT)
    a, _ = tier(store, tmp_path, "a", sup)
    ver = version()
    key = a.key(blk(ver, 0))
    assert key is not None
    store.put(key, b"x" * EXTENT, {"xxh3": content_hash(data).hex()})  # the hash of other bytes
    view = memoryview(bytearray(EXTENT))

    async def body() -> None:
        assert await trio.to_thread.run_sync(a.fetch, blk(ver, 0), view) is None

    run(sup, [a], body)
    assert a.stats.shared_corrupt == 1 and a.stats.shared_hits == 0


@pytest.mark.parametrize("make", STORES)
def test_of_two_nodes_one_claims_and_the_other_is_woken_when_the_block_lands(make: MakeStore,
                                                                             tmp_path: Path) -> None:
    """A claims the extent, B finds the claim and waits; B is not answered while the claim stands; A writes
    the block and drops its claim; B wakes and reads it from the tier (no miss, no origin fetch)."""
    store, sup, data = make(tmp_path), Supervisor(Stats()), os.urandom(EXTENT)
    (a, a_cache), (b, _) = tier(store, tmp_path, "a", sup), tier(store, tmp_path, "b", sup)
    ver, digest = version(), content_hash(data)
    view = memoryview(bytearray(EXTENT))
    got: list[bytes | None] = []
    key = a.key(blk(ver, 0))
    assert key is not None

    async def body() -> None:
        assert await trio.to_thread.run_sync(a.claim, blk(ver, 0)) is True
        assert await trio.to_thread.run_sync(b.claim, blk(ver, 0)) is False

        async def wait() -> None:
            got.append(await trio.to_thread.run_sync(b.wait_for, blk(ver, 0), view))

        async with trio.open_nursery() as waiting:
            waiting.start_soon(wait)
            while b.stats.shared_polls < 3:  # B keeps listing the claims while the claim stands
                await trio.sleep(0.01)
            assert not got and store.exists(claim_key(key))
            await trio.to_thread.run_sync(a_cache.write, ver, 0, memoryview(data), digest)
            a.share_soon(blk(ver, 0), digest)  # written, then the claim dropped
        assert not store.exists(claim_key(key))

    run(sup, [a, b], body)
    assert got == [digest] and bytes(view) == data
    assert b.stats.shared_waits == 1 and b.stats.shared_hits == 1 and b.stats.shared_misses == 0


@pytest.mark.parametrize("make", STORES)
def test_a_claim_older_than_a_flight_can_last_is_taken_over_at_once(make: MakeStore, tmp_path: Path) -> None:
    """A node claimed an extent and died; its claim stands. Another node that misses the extent waits on a
    claim younger than a flight can last (`stale_after`, by the store's clock: the claim's age), and takes
    over an older one at once: the claim is its own from then on."""
    store, sup = make(tmp_path), Supervisor(Stats())
    b, _ = tier(store, tmp_path, "b", sup)
    block = blk(version(), 0)
    key = b.key(block)
    assert key is not None
    ckey = claim_key(key)
    store.put(ckey, b"a node that died", {})
    assert b.claim(block) is False
    old = b.claims.stale_after + 5
    if isinstance(store, MemoryStore):
        store.backdate(ckey, old)
    else:
        then = time.time() - old
        os.utime(tmp_path / "tier" / ckey, (then, then))
    assert store.age(ckey) > b.claims.stale_after  # type: ignore[operator]
    assert b.claim(block) is True
    age = store.age(ckey)
    assert age is not None and age < b.claims.stale_after  # written again: this node's claim now


def test_an_unreachable_tier_is_suspect_then_skipped(tmp_path: Path) -> None:
    """Every call fails: the tier says "not known" (the origin serves) and counts the error. One failure only
    makes it suspect (a busy tier misses one deadline and answers the next request); one that answers
    nothing for two deadlines is skipped (offline), so the next extents do not ask it again."""
    store, sup = MemoryStore("tier"), Supervisor(Stats())
    store.unreachable = True
    a = SharedTier(store, "test-domain", Stats(), local_cache(tmp_path / "a").read_back, origin(), deadline=0.05,
                   probe_interval=60, node="a", supervisor=sup)
    ver = version(4 * EXTENT)
    view = memoryview(bytearray(EXTENT))

    async def body() -> None:
        assert await trio.to_thread.run_sync(a.fetch, blk(ver, 0), view) is None
        assert await trio.to_thread.run_sync(a.claim, blk(ver, EXTENT)) is None
        assert a.health.suspect and not a.health.offline and a.stats.shared_errors == 2
        await trio.sleep(2 * a.deadline)
        assert await trio.to_thread.run_sync(a.fetch, blk(ver, 2 * EXTENT), view) is None
        assert a.health.offline and a.stats.shared_errors == 3
        assert await trio.to_thread.run_sync(a.fetch, blk(ver, 3 * EXTENT), view) is None  # not asked
        assert a.stats.shared_errors == 3

    run(sup, [a], body)


def test_a_busy_tier_that_answers_again_is_not_skipped(tmp_path: Path) -> None:
    """A request that fails, then one that gets its answer: the tier is trusted again, never skipped."""
    store, sup = MemoryStore("tier"), Supervisor(Stats())
    a, _ = tier(store, tmp_path, "a", sup)
    ver = version(2 * EXTENT)
    view = memoryview(bytearray(EXTENT))

    async def body() -> None:
        store.unreachable = True
        assert await trio.to_thread.run_sync(a.fetch, blk(ver, 0), view) is None
        assert a.health.suspect
        store.unreachable = False
        assert await trio.to_thread.run_sync(a.fetch, blk(ver, EXTENT), view) is None  # a miss: an answer
        assert not a.health.suspect and not a.health.offline
        assert a.stats.shared_errors == 1 and a.stats.shared_misses == 1

    run(sup, [a], body)


class _WrittenBeforeClaim(MemoryStore):
    """An in-memory tier where another node's write of the block lands between this node's miss and its
    claim (on a busy tier, seconds apart): `before_claim` runs once, just before the first claim is made."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.before_claim: Callable[[], object] | None = None

    def put(self, key: str, body: bytes | BinaryIO, metadata: dict[str, str], if_absent: bool = False) -> bool:
        if if_absent and self.before_claim is not None:
            hook, self.before_claim = self.before_claim, None
            hook()
        return super().put(key, body, metadata, if_absent)


def test_a_block_shared_between_a_miss_and_the_claim_is_read_from_the_tier_not_the_origin(tmp_path: Path) -> None:
    store, sup, data = _WrittenBeforeClaim("tier"), Supervisor(Stats()), os.urandom(EXTENT)
    behind = origin()
    b, _ = tier(store, tmp_path, "b", sup, behind=behind)
    ver, digest = version(), content_hash(data)
    key = b.key(blk(ver, 0))
    assert key is not None
    store.before_claim = lambda: store.put(key, data, {"xxh3": digest.hex()})  # node A's write-back
    view = memoryview(bytearray(EXTENT))
    arrived: list[tuple[int, bytes | None]] = []

    def got(i: int, d: bytes | None) -> Stored:
        arrived.append((i, d))
        return Stored(d or b"", True, None)

    async def body() -> None:
        await trio.to_thread.run_sync(b.fill, ver.info, ver.blocks([(0, EXTENT)]), [view], got, float("inf"))

    run(sup, [b], body)
    assert arrived == [(0, digest)] and bytes(view) == data
    assert behind.stats.gets == 0 and behind.stats.store_errors == 0  # nothing asked of the origin
    assert not store.exists(claim_key(key))  # the claim it won was dropped at once
    assert b.stats.shared_misses == 1 and b.stats.shared_hits == 1 and b.pending == 0


@pytest.mark.parametrize("others_land", [True, False], ids=["claims-landing", "no-claim-landing"])
def test_a_waiter_waits_on_while_the_fleet_s_claims_keep_landing(others_land: bool, tmp_path: Path) -> None:
    """B waits for an extent A claimed. While A's other claims keep landing (A is alive, its writes only
    behind), B waits past `wait_least` and gets the block from the tier; when no claim lands for `wait_least`
    (a claimer that died), B gives up and the origin serves it (`shared_wait_expired`). Timed by a clock the
    test moves: each landing is seen by B's claim watch before the clock moves on."""
    store, sup, data, clock = MemoryStore("tier"), Supervisor(Stats()), os.urandom(EXTENT), Clock()
    (a, a_cache), (b, _) = tier(store, tmp_path, "a", sup), tier(store, tmp_path, "b", sup, 0.5, clock=clock)
    ver, digest = version(8 * EXTENT), content_hash(data)
    view = memoryview(bytearray(EXTENT))
    got: list[bytes | None] = []
    step = b.claims.wait_least / 4  # each landing a quarter of the wait after the last: 7 of them outlast it
    assert 7 * step < b.claims.wait_most  # (and stay within the longest wait)

    async def body() -> None:
        for k in range(8):
            assert await trio.to_thread.run_sync(a.claim, blk(ver, k * EXTENT)) is True
        assert await trio.to_thread.run_sync(b.claim, blk(ver, 0)) is False

        async def wait() -> None:
            got.append(await trio.to_thread.run_sync(b.wait_for, blk(ver, 0), view))

        async with trio.open_nursery() as waiting:
            waiting.start_soon(wait)
            while b.stats.shared_polls < 2:  # B's watch lists the claims
                await trio.sleep(0.01)
            if not others_land:
                clock.now += b.claims.wait_least + step  # nothing lands: the nursery waits for B to give up
                return
            for k in range(1, 8):
                clock.now += step
                await trio.to_thread.run_sync(a.release, blk(ver, k * EXTENT))
                while b.claims._progress != clock.now:  # B's watch saw it land
                    await trio.sleep(0.01)
            assert clock.now - 1000.0 > b.claims.wait_least and not got, "gave up while claims kept landing"
            await trio.to_thread.run_sync(a_cache.write, ver, 0, memoryview(data), digest)
            a.share_soon(blk(ver, 0), digest)

    run(sup, [a, b], body)
    if others_land:
        assert got == [digest] and bytes(view) == data and b.stats.shared_wait_expired == 0
    else:
        assert got == [None] and b.stats.shared_wait_expired == 1
