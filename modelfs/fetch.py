"""The fetcher: a bounded pool of ranged GETs, single-flight per extent, that fills cache and index.

An extent is fetched at most once at a time however many readers want it: the first asks, the rest
wait on the same flight. Flights run in the daemon's nursery, not in the reader's task, so a reader
that goes away never cancels a GET that others wait for.

GET slots are shared by demand reads and prefetch, and a freed slot goes to a waiting demand read
first: prefetch never delays a loader's own read by more than one GET. Memory is bounded: at most
`slots` GET buffers plus as many prefetched extents waiting to be pushed, i.e. 2 x slots x extent
<= fetch.memory_budget.

Every flight has a deadline (`fetch.deadline`): past it, its readers get EIO and the flight is
forgotten, so the next read starts a fresh GET instead of joining a stuck one. The stuck GET's thread is
abandoned, not killed; it ends at botocore's read timeout, and keeps its thread token until then, so
abandoned GETs can never pile up beyond the thread limit.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import trio

from modelfs.cache import BlockCache, CacheFull, block_hash
from modelfs.errors import StoreError, StoreUnreachable, VersionChanged
from modelfs.health import Health
from modelfs.index import ChunkIndex, version_id
from modelfs.remote import ObjectInfo, Store
from modelfs.stats import Stats

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview


@dataclass(eq=False)
class FileVersion:
    """One immutable version of a file, and what is known of its extents (offset -> (hash, length)).

    Extents are fixed-size (`extent_size`) unless a manifest gave this version a content-following
    `layout` (sorted starts); then `known` starts out with every extent's hash, so extents whose content
    is already cached are served without a GET, whichever version or file stored them.
    """

    info: ObjectInfo
    vid: bytes
    extent_size: int
    known: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    layout: list[int] | None = None

    @classmethod
    def of(cls, identity: str, info: ObjectInfo, extent_size: int,
           extents: list[tuple[int, int, bytes]] | None = None) -> FileVersion:
        ver = cls(info, version_id(identity, info), extent_size)
        if extents:
            ver.layout = [off for off, _, _ in extents]
            ver.known = {off: (digest, length) for off, length, digest in extents}
        return ver

    def lookup(self, index: ChunkIndex, start: int, length: int) -> tuple[bytes, int] | None:
        """(hash, length) of the extent at `start`, if this version or the index knows it (then
        remembered here, so the index is asked once per extent per version)."""
        ext = self.known.get(start)
        if ext is None:
            ext = index.lookup(self.vid, start)
            if ext is None or ext[1] != length:
                return None
            self.known[start] = ext
        return ext

    def extent_at(self, offset: int) -> tuple[int, int]:
        """(start, length) of the extent holding byte `offset`."""
        if self.layout is not None:
            start = self.layout[bisect.bisect_right(self.layout, offset) - 1]
            return start, self.known[start][1]
        start = offset - offset % self.extent_size
        return start, min(self.extent_size, self.info.size - start)

    def extents(self) -> list[tuple[int, int]]:
        """Every (start, length) of the file, in file order."""
        return self.starts_in(0, self.info.size)

    def starts_in(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """(start, length) of every extent overlapping [lo, hi), in file order."""
        out: list[tuple[int, int]] = []
        pos = max(0, lo)
        while pos < min(hi, self.info.size):
            start, length = self.extent_at(pos)
            out.append((start, length))
            pos = start + length
        return out


class PrioritySlots:
    """A counting semaphore whose waiters for demand reads are woken before waiters for prefetch."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._demand: deque[trio.Event] = deque()
        self._prefetch: deque[trio.Event] = deque()
        self._many = trio.Lock()

    @property
    def waiting(self) -> int:
        return len(self._demand) + len(self._prefetch)

    async def acquire(self, demand: bool) -> None:
        if self.free > 0 and (demand or not self._demand):
            self.free -= 1
            await trio.lowlevel.checkpoint()
            return
        ev = trio.Event()
        queue = self._demand if demand else self._prefetch
        queue.append(ev)
        try:
            await ev.wait()  # a releaser hands its slot over by setting ev
        except BaseException:
            if ev.is_set():
                self.release()  # granted, but we are cancelled: pass it on
            else:
                queue.remove(ev)
            raise

    async def acquire_many(self, n: int) -> None:
        """`n` slots at prefetch priority (one coalesced GET's share of the memory budget). One task at a
        time gathers several, so two can never each hold part of what the other waits for."""
        async with self._many:
            got = 0
            try:
                while got < n:
                    await self.acquire(demand=False)
                    got += 1
            except BaseException:
                for _ in range(got):
                    self.release()
                raise

    def release(self) -> None:
        queue = self._demand or self._prefetch
        if queue:
            queue.popleft().set()
        else:
            self.free += 1


@dataclass(eq=False)
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    data: Buffer = b""
    error: BaseException | None = None


class Fetcher:
    """Turns cache misses into ranged GETs."""

    def __init__(self, store: Store, cache: BlockCache, index: ChunkIndex, stats: Stats, slots: int,
                 deadline: float = 30.0, health: Health | None = None) -> None:
        self.store = store
        self.cache = cache
        self.index = index
        self.stats = stats
        self.deadline = deadline
        self.health = health
        self.observe: Callable[[float], None] | None = None  # fetch latency, seconds (metrics)
        self.slots = PrioritySlots(slots)
        # Twice the slots: abandoned GETs (past their deadline) hold a thread until botocore gives up.
        self.threads = trio.CapacityLimiter(2 * slots)
        self._inflight: dict[tuple[bytes, int], _Flight] = {}
        self._nursery: trio.Nursery | None = None
        self._write_error_logged = False

    def start(self, nursery: trio.Nursery) -> None:
        """Flights run in `nursery`, which owns them: cancelling it cancels every wait."""
        self._nursery = nursery

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def fetch(self, ver: FileVersion, start: int, length: int) -> Buffer:
        """The whole extent [start, start+length) of `ver` for a demand read: joins a flight or starts one."""
        flight = self._inflight.get((ver.vid, start))
        if flight is None:
            self._refuse_if_offline(ver, start, demand=True)
            flight = self._launch(ver, start, length, slot_held=False)
        return await self._wait(flight)

    def _refuse_if_offline(self, ver: FileVersion, start: int, demand: bool = False) -> None:
        """While the store is unreachable, uncached bytes fail at once instead of waiting out retries."""
        if self.health is not None and self.health.offline:
            if demand:
                self.stats.add(offline_misses=1)
            raise self.health.unreachable_error(f"{ver.info.key} at {start}")

    async def prefetch(self, ver: FileVersion, start: int, length: int) -> Buffer | None:
        """Fetch an extent that is not cached, at prefetch priority. None if it is cached after all."""
        key = (ver.vid, start)
        flight = self._inflight.get(key)
        if flight is None:
            self._refuse_if_offline(ver, start)
            await self.slots.acquire(demand=False)
            flight = self._inflight.get(key)  # someone may have started it while we waited
            if flight is None and ver.known.get(start) is not None and await trio.to_thread.run_sync(
                    self.cache.contains, ver.known[start][0]):
                self.slots.release()  # fetched by a flight that finished while we waited
                return None
            flight = self._inflight.get(key)  # ... or while we looked in the cache
            if flight is None:
                flight = self._launch(ver, start, length, slot_held=True)
            else:
                self.slots.release()
        return await self._wait(flight)

    def slots_for(self, nbytes: int, extent_size: int) -> int:
        """GET slots a request of `nbytes` takes: each slot's share of the budget is 2 x extent_size."""
        return max(1, min(self.slots.total, -(-nbytes // (2 * extent_size))))

    async def prefetch_run(self, ver: FileVersion, run: list[tuple[int, int]]) -> int:
        """Fetch adjacent uncached extents with one ranged GET per stretch not already in flight, at
        prefetch priority. Every extent gets its flight at once (no await before), so demand reads of any
        of them join it instead of fetching it again. Returns the bytes this call fetched."""
        self._refuse_if_offline(ver, run[0][0])
        assert self._nursery is not None, "Fetcher.start() was not called"
        groups: list[tuple[list[tuple[int, int]], list[_Flight]]] = []
        waits: list[_Flight] = []
        current: tuple[list[tuple[int, int]], list[_Flight]] | None = None
        for start, length in run:
            key = (ver.vid, start)
            flight = self._inflight.get(key)
            if flight is not None:  # someone else's: wait for it, and start a new stretch after it
                waits.append(flight)
                current = None
                continue
            flight = self._inflight[key] = _Flight()
            if current is None:
                current = ([], [])
                groups.append(current)
            current[0].append((start, length))
            current[1].append(flight)
            waits.append(flight)
        for extents, flights in groups:
            n = self.slots_for(sum(length for _, length in extents), ver.extent_size)
            self._nursery.start_soon(self._fly, ver, extents, flights, partial(self.slots.acquire_many, n), n,
                                     partial(self._fetch_run_blocking, ver, extents))
        for flight in waits:
            await self._wait(flight)
        return sum(length for extents, _ in groups for _, length in extents)

    def _launch(self, ver: FileVersion, start: int, length: int, slot_held: bool) -> _Flight:
        """Start the one flight for (version, extent); callers check `_inflight` with no await since."""
        assert self._nursery is not None, "Fetcher.start() was not called"
        key = (ver.vid, start)
        assert key not in self._inflight
        flight = self._inflight[key] = _Flight()
        acquire = trio.lowlevel.checkpoint if slot_held else partial(self.slots.acquire, demand=True)
        self._nursery.start_soon(self._fly, ver, [(start, length)], [flight], acquire, 1,
                                 lambda: [self._fetch_blocking(ver, start, length)])
        return flight

    @staticmethod
    async def _wait(flight: _Flight) -> Buffer:
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.data

    async def _fly(self, ver: FileVersion, run: list[tuple[int, int]], flights: list[_Flight],
                   acquire: Callable[[], Awaitable[None]], slots: int, blocking: Callable[[], list[Buffer]]) -> None:
        """Carry out the flights of `run` (one extent, or adjacent ones in one GET): take `slots` GET slots
        with `acquire`, run `blocking` in a worker thread, all within fetch.deadline, then hand each
        flight its bytes or the error and forget it."""
        error: BaseException | None = None
        try:
            with trio.fail_after(self.deadline):
                await acquire()
                try:
                    parts = await trio.to_thread.run_sync(blocking, limiter=self.threads, abandon_on_cancel=True)
                finally:
                    for _ in range(slots):
                        self.slots.release()
            for flight, part in zip(flights, parts, strict=True):
                flight.data = part
        except trio.TooSlowError:
            self.stats.add(read_timeouts=1)
            error = StoreError(f"{ver.info.key}: no data from the store within fetch.deadline ({self.deadline:g} s)")
            log.warning("%s", error)
        except (StoreError, OSError) as e:
            error = e
        except BaseException as e:
            error = StoreError(f"fetch of {ver.info.key} was cancelled")
            if not isinstance(e, trio.Cancelled):
                error = StoreError(f"internal error fetching {ver.info.key}: {type(e).__name__}")
                log.exception("fetch of %s at %d failed", ver.info.key, run[0][0])
            raise
        finally:
            for (start, _), flight in zip(run, flights, strict=True):
                flight.error = error
                if self._inflight.get((ver.vid, start)) is flight:
                    del self._inflight[(ver.vid, start)]
                flight.done.set()

    def _fetch_blocking(self, ver: FileVersion, start: int, length: int) -> Buffer:
        """GET, hash, store block, record extent. Runs in a worker thread."""
        known = ver.known.get(start)
        if known is not None:
            # A flight for this extent may have completed between the reader's cache check and this
            # flight's start: serve what it stored instead of fetching the same bytes twice.
            cached = self.cache.read(known[0], length, 0, length)
            if cached is not None:
                return cached
        data = self._get(ver, start, length)
        return self._store_extent(ver, start, data)

    def _fetch_run_blocking(self, ver: FileVersion, run: list[tuple[int, int]]) -> list[Buffer]:
        """One GET for adjacent extents, each then hashed, stored and recorded on its own."""
        first = run[0][0]
        total = run[-1][0] + run[-1][1] - first
        view = memoryview(self._get(ver, first, total))
        return [self._store_extent(ver, start, view[start - first:start - first + length]) for start, length in run]

    def _get(self, ver: FileVersion, start: int, length: int) -> Buffer:
        began = time.monotonic()
        try:
            data = self.store.get_range(ver.info, start, length)
        except VersionChanged:
            self.stats.add(version_changes=1)
            raise
        except StoreUnreachable as e:
            self.stats.add(store_errors=1)
            if self.health is not None:
                self.health.mark_unreachable(e)
            raise
        except StoreError as e:
            self.stats.add(store_errors=1)
            log.warning("%s", e)
            raise
        self.stats.add(gets=1, bytes_fetched=len(data))
        if self.observe is not None:
            self.observe(time.monotonic() - began)
        return data

    def _store_extent(self, ver: FileVersion, start: int, data: Buffer) -> Buffer:
        """Hash one extent's bytes, store the block (unless full) and record it in the index."""
        known = ver.known.get(start)
        digest = block_hash(data)
        if known is not None and known[0] != digest:
            log.warning("%s at %d: the store returned other bytes than the manifest or index says; re-indexed",
                        ver.info.key, start)
        try:
            if not self.cache.put(digest, data):
                self.stats.add(dedup_bytes_saved=len(data))
        except CacheFull as e:
            # Quota reached with every block in use, or the disk is full: serve this extent from memory.
            self.stats.add(cache_full_skips=1)
            log.debug("%s at %d not cached: %s", ver.info.key, start, e.strerror)
            return data
        except OSError as e:
            self.stats.add(cache_write_errors=1)
            if not self._write_error_logged:
                self._write_error_logged = True
                log.warning("cannot write to the block cache (%s): serving from memory without caching",
                            e.strerror or e)
            return data
        self.index.record(ver.vid, self.store.identity, ver.info, start, digest, len(data))
        ver.known[start] = (digest, len(data))
        return data
