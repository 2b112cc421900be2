"""The fetcher: single-flight fetches of extents into pooled buffers, from a source (`sources.Source`: the
origin, or the fleet tier in front of it; which one is the composition's business, not the fetcher's).

What a source brings is handed to the block store (`BlockStore`, implemented by `extents.Blocks`) in one
call per extent, which writes it into the version's file; the fetcher knows nothing of the cache, the chunk
index or the memory pool.

An extent is fetched at most once at a time however many readers want it: the first asks, the rest wait
on the same flight. Flights run in the daemon's nursery, not in the reader's task, so a reader that goes
away never cancels a GET that others wait for.

Memory: a GET runs only while it holds a pooled buffer (`buffers.BufferPool`, fetch.memory_budget) of one
extent, however many extents it fetches: the worker thread reads the body into the buffer one extent at a
time, hashes it there and hands it to the block store, which writes it into the version's file before the
next extent is read into the same buffer. Each byte is received once, hashed once and written once, and a
GET of many extents (fewer requests: each costs the client as much CPU as megabytes of body) costs no more
memory than a GET of one. Readers waiting on a flight are woken once its extent is stored and read it from
the version's file, as any later reader does (from the page cache: the one more copy); an extent the cache
had no room for is handed to them as a copy in memory. Demand reads get buffers and bandwidth before
prefetch (`buffers`): buffers prefetch never takes, so a demand GET starts at once, and while one waits or
runs prefetch starts new GETs only below fetch.prefetch_during_demand.

Buffer lifetime (a `Lease`): a GET's buffer goes back to the pool when its worker thread has ended, which for
a GET abandoned at its deadline can be long after the flight failed.

Every flight has a deadline (`fetch.deadline`): past it, its readers get EIO and the flight is forgotten,
so the next read starts a fresh GET instead of joining a stuck one. The stuck GET's thread is abandoned,
not killed; it ends at botocore's read timeout, and keeps its thread token and buffers until then, so
abandoned GETs can never pile up beyond the thread limit.
"""

from __future__ import annotations

import logging
import mmap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from modelfs.catalog.version import Extent, FileVersion, Stored
from modelfs.errors import StoreError
from modelfs.faults import NONE as NO_FAULTS
from modelfs.faults import Faults
from modelfs.fetch.buffers import Ask, BufferPool, Lease
from modelfs.health import Health
from modelfs.remote.sources import Source
from modelfs.stats import Stats
from modelfs.supervise import Supervisor

log = logging.getLogger(__name__)


Buffer = bytes | bytearray | memoryview


class BlockStore(Protocol):
    """Where fetched extents go (`extents.Blocks`). `store` blocks on the disk (worker threads); `has`,
    `cached` and `keep` never block."""

    def has(self, ver: FileVersion, start: int) -> bool: ...

    def cached(self, ver: FileVersion, start: int) -> bytes | None: ...

    def store(self, ver: FileVersion, start: int, data: memoryview, digest: bytes | None = None) -> Stored: ...

    def keep(self, digest: bytes, copy: memoryview) -> memoryview: ...


@dataclass(eq=False)
class _Flight:
    """One extent being fetched. After `done`: `error`, or stored (its readers read the cache), or `data`: the
    whole extent in memory, when the cache had no room for it."""

    done: trio.Event = field(default_factory=trio.Event)
    data: memoryview | None = None
    error: BaseException | None = None
    ask: Ask | None = None  # its GET's request for a buffer, while a coalesced prefetch GET waits for it


class Fetcher:
    """Turns cache misses into ranged GETs."""

    def __init__(self, source: Source, blocks: BlockStore, stats: Stats, pool: BufferPool, deadline: float,
                 health: Health, faults: Faults = NO_FAULTS, *, supervisor: Supervisor) -> None:
        self.source = source
        self.faults = faults
        self.blocks = blocks
        self.stats = stats
        self.pool = pool
        self.deadline = deadline
        self.health = health  # the origin's: while it is offline, a miss fails at once
        # Twice the buffers: abandoned GETs (past their deadline) hold a thread until botocore gives up.
        self.threads = trio.CapacityLimiter(2 * pool.total)
        self._inflight: dict[tuple[bytes, int], _Flight] = {}
        # Flights run supervised in the daemon's nursery, which owns them: cancelling it cancels every
        # wait, and no failure in one reaches the FUSE loop.
        self._supervisor = supervisor

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def flight(self, ver: FileVersion, start: int) -> _Flight | None:
        return self._inflight.get((ver.vid, start))

    # -- demand ------------------------------------------------------------------------------------

    async def fetch(self, ver: FileVersion, start: int, length: int) -> memoryview | None:
        """Fetch an extent for a demand read: joins its flight or starts one. None once it is stored (read it
        from the cache), or the whole extent in memory when the cache had no room for it."""
        flight = self._inflight.get((ver.vid, start))
        if flight is None:
            self._refuse_if_offline(ver, start, demand=True)
            flight = self._launch(ver, [(start, length)], self._buffers_for(length, demand=True))
        return await self.wait(flight)

    async def wait(self, flight: _Flight) -> memoryview | None:
        """A flight's outcome, as `fetch` gives it. A reader that joins a coalesced prefetch GET still waiting
        for its buffer raises it to demand priority (`BufferPool.promote`): a demand read never queues
        behind prefetch's buffer limits."""
        if flight.ask is not None:
            self.pool.promote(flight.ask)
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.data

    @staticmethod
    async def settle(flight: _Flight) -> None:
        """Wait for a flight without taking its data (prefetch): raises its error, holds no buffer."""
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error

    def _refuse_if_offline(self, ver: FileVersion, start: int, demand: bool = False) -> None:
        """While the store is unreachable, uncached bytes fail at once instead of waiting out retries."""
        if self.health.offline:
            if demand:
                self.stats.add(offline_misses=1)
            raise self.health.unreachable_error(f"{ver.info.key} at {start}")

    # -- prefetch ----------------------------------------------------------------------------------

    async def prefetch_run(self, ver: FileVersion, run: list[Extent]) -> int:
        """Fetch adjacent uncached extents with one ranged GET per stretch not already in flight, at
        prefetch priority. Every extent gets its flight at once (no await before), so demand reads of any
        of them join it instead of fetching it again. Returns the bytes this call fetched."""
        self._refuse_if_offline(ver, run[0][0])
        stretches: list[list[Extent]] = []
        waits: list[_Flight] = []
        current: list[Extent] | None = None
        size = self.pool.size
        for start, length in run:
            flight = self._inflight.get((ver.vid, start))
            if flight is not None:  # someone else's: wait for it, and start a new stretch after it
                waits.append(flight)
                current = None
                continue
            if self.blocks.has(ver, start):  # stored by a flight that ended since the caller looked
                current = None
                continue
            # One GET per stretch, through one buffer; an extent larger than a buffer goes alone.
            if current is None or length > size:
                current = []
                stretches.append(current)
            current.append((start, length))
            if length > size:
                current = None
        fetched = 0
        for stretch in stretches:
            ask = self.pool.ask(self._tokens(stretch[0][1]), demand=False)
            flights = self._launch_many(ver, stretch, self._asked(ask))
            for flight in flights:
                flight.ask = ask  # a demand read that joins one of them raises the request (`wait`)
            waits.extend(flights)
            fetched += sum(length for _, length in stretch)
        for flight in waits:
            await self.settle(flight)
        return fetched

    # -- flights -----------------------------------------------------------------------------------

    def _tokens(self, length: int) -> int:
        return min(self.pool.total, -(-length // self.pool.size))

    def _buffers_for(self, length: int, demand: bool) -> Callable[[], Awaitable[list[mmap.mmap]]]:
        """How a GET of one extent takes its buffers: one, or (an extent larger than a buffer, from a
        manifest with larger extents) as many as its length needs, held as tokens for a buffer of its own."""
        if length <= self.pool.size:
            async def one() -> list[mmap.mmap]:
                return [await self.pool.acquire(demand)]
            return one
        return self._asked(self.pool.ask(self._tokens(length), demand))

    def _asked(self, ask: Ask) -> Callable[[], Awaitable[list[mmap.mmap]]]:
        async def take() -> list[mmap.mmap]:
            return await self.pool.take(ask)
        return take

    @staticmethod
    def _given(bufs: list[mmap.mmap]) -> Callable[[], Awaitable[list[mmap.mmap]]]:
        async def given() -> list[mmap.mmap]:
            return bufs
        return given

    def _give_back(self, bufs: list[mmap.mmap]) -> None:
        for buf in bufs:
            self.pool.release(buf)

    def _launch(self, ver: FileVersion, run: list[Extent], acquire: Callable[[], Awaitable[list[mmap.mmap]]]
                ) -> _Flight:
        return self._launch_many(ver, run, acquire)[0]

    def _launch_many(self, ver: FileVersion, run: list[Extent],
                     acquire: Callable[[], Awaitable[list[mmap.mmap]]]) -> list[_Flight]:
        """Start the one flight of each extent of `run` (one GET); callers check `_inflight` with no await
        since."""
        flights = []
        for start, _ in run:
            key = (ver.vid, start)
            assert key not in self._inflight
            flights.append(self._inflight.setdefault(key, _Flight()))
        self._supervisor.spawn(self._fly, ver, run, flights, acquire, name=f"fetch of {ver.info.key}")
        return flights

    def _views(self, run: list[Extent], bufs: list[mmap.mmap]) -> list[memoryview]:
        """Where each extent's bytes go: the start of the GET's one pooled buffer, every extent in turn (each
        is stored before the next is read), or a buffer of its own for an extent larger than a pooled one."""
        if len(run) == 1 and run[0][1] > self.pool.size:
            return [memoryview(bytearray(run[0][1]))]
        whole = memoryview(bufs[0])
        return [whole[:length] for _, length in run]

    async def _fly(self, ver: FileVersion, run: list[Extent], flights: list[_Flight],
                   acquire: Callable[[], Awaitable[list[mmap.mmap]]]) -> None:
        """Carry out the flights of `run` (one extent, or adjacent ones in one GET): take buffers, run the
        GET in a worker thread, all within fetch.deadline, then hand each flight its bytes or the error."""
        error: BaseException | None = None
        lease: Lease | None = None
        until = time.monotonic() + self.deadline  # the worker thread's retries end with the flight
        try:
            with trio.fail_after(self.deadline):
                bufs = await acquire()
                lease = Lease(self.pool, bufs)
                views = self._views(run, bufs)
                token = trio.lowlevel.current_trio_token()
                try:
                    got = await trio.to_thread.run_sync(self._fetch_blocking, ver, run, views, flights, lease, token,
                                                        until, limiter=self.threads, abandon_on_cancel=True)
                except BaseException:
                    lease.thread_never_ran()
                    raise
            for flight, (digest, kept) in zip(flights, got, strict=True):
                if not flight.done.is_set():  # else answered as its bytes arrived (`_complete_early`)
                    flight.data = None if kept is None else self.blocks.keep(digest, kept)
        except trio.TooSlowError:
            self.stats.add(read_timeouts=1)
            error = StoreError(f"{ver.info.key}: no data from the store within fetch.deadline ({self.deadline:g} s)")
            log.warning("%s", error)
        except (StoreError, OSError) as e:
            error = e
        except trio.Cancelled:
            error = StoreError(f"fetch of {ver.info.key} was cancelled")
            raise
        except Exception as e:  # a bug: this flight's readers get EIO, the mount keeps serving
            error = StoreError(f"internal error fetching {ver.info.key}: {type(e).__name__}")
            self._supervisor.failed(f"the fetch of {ver.info.key} at {run[0][0]}", e)
        finally:
            for (start, _), flight in zip(run, flights, strict=True):
                if not flight.done.is_set():
                    flight.error = error
                    self._land(ver, start, flight)
            if lease is not None:
                lease.drop()

    def _complete_early(self, ver: FileVersion, start: int, flight: _Flight, digest: bytes,
                        kept: memoryview | None) -> None:
        """On the trio thread: one extent of a longer GET has arrived and is stored: its readers are
        answered now, not when the last byte of the GET is in."""
        if flight.done.is_set():  # cannot happen (callbacks run in order, before the GET's end): be safe
            return
        flight.data = None if kept is None else self.blocks.keep(digest, kept)
        self._land(ver, start, flight)

    def _land(self, ver: FileVersion, start: int, flight: _Flight) -> None:
        """A flight is stored, or has its data or its error: forget it, and wake its readers."""
        if self._inflight.get((ver.vid, start)) is flight:
            del self._inflight[(ver.vid, start)]
        flight.done.set()

    def _fetch_blocking(self, ver: FileVersion, run: list[Extent], views: list[memoryview], flights: list[_Flight],
                        lease: Lease, token: trio.lowlevel.TrioToken, until: float
                        ) -> list[tuple[bytes, memoryview | None]]:
        """GET, hash, store blocks (with a copy of the new block of a flight a reader waits on).
        Runs in a worker thread; drops the thread's hold on the buffers when it ends, however it ends."""
        if not lease.thread_begins():
            return []
        try:
            self.faults.check("flight", ver.info.key)
            if len(run) == 1:
                # A flight for this extent may have completed between the reader's cache check and this
                # flight's start: serve what it stored instead of fetching the same bytes twice.
                digest = self.blocks.cached(ver, run[0][0])
                if digest is not None:
                    return [(digest, None)]
            return self._gather(ver, run, views, flights, token, until)
        finally:
            try:
                token.run_sync_soon(lease.drop)
            except trio.RunFinishedError:
                pass  # the daemon is gone: nothing to hand back to

    def _gather(self, ver: FileVersion, run: list[Extent], views: list[memoryview], flights: list[_Flight],
                token: trio.lowlevel.TrioToken, until: float) -> list[tuple[bytes, memoryview | None]]:
        """Have the source fill every extent of `run`; store each as it arrives and, in a run of several,
        answer its flight at once (a demand read that joined a long prefetch GET waits for its extent, not
        for the whole GET)."""
        out: list[tuple[bytes, memoryview | None] | None] = [None] * len(run)

        def arrived(i: int, digest: bytes | None) -> Stored:
            start = run[i][0]
            stored = self.blocks.store(ver, start, views[i], digest)
            # The last extent is answered when this thread ends (`_fly`): a GET's flights have all landed only
            # once its thread is done (its counters and its buffer settled).
            out[i] = (stored.digest, stored.copy)
            if i < len(run) - 1:
                try:
                    token.run_sync_soon(self._complete_early, ver, start, flights[i], stored.digest, stored.copy)
                    out[i] = (stored.digest, None)  # answered; the copy is the trio thread's now
                except trio.RunFinishedError:
                    pass
            return stored

        self.source.fill(ver.info, ver.blocks(run), views, arrived, until)
        got = [o for o in out if o is not None]
        if len(got) != len(run):
            raise StoreError(f"{ver.info.key}: the store answered {len(got)} of {len(run)} extents")
        return got
