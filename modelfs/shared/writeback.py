"""Write-back: what this node fetched from the origin goes to the fleet tier in the background.

A bounded queue drained by supervised writer tasks, never on a reader's path: a full queue drops an extent
(counted), never waits. Extents this node claimed (other nodes wait for them) go in a lane of their own,
written before any other, and their claims are dropped once written, or failed. Writers PUT whole objects
read back from the local cache and checked against their hash (bytes damaged on disk are never shared); S3
makes a PUT visible whole or not at all, so a crash mid-PUT leaves nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
from collections.abc import Callable, Sequence

import trio

from modelfs.errors import StoreError, StoreUnreachable
from modelfs.health import Health
from modelfs.remote import WritableStore
from modelfs.stats import Stats

log = logging.getLogger(__name__)

#: Write-backs waiting for a writer; more are dropped (and counted), never waited for.
QUEUE = 256
WRITERS = 4

#: Reads an extent back from the local cache for a write-back: (vid, start, length, hash) -> its bytes, checked
#: against the hash, or None if the cache no longer holds them (`cache.FileCache.read_back`).
ReadBack = Callable[[bytes, int, int, bytes], "memoryview | None"]


@dataclasses.dataclass(frozen=True)
class WriteBack:
    key: str
    vid: bytes  # the extent is read back from this version's cache file, at `start`
    start: int
    digest: bytes
    length: int
    claimed: bool = False  # this node claimed the extent: the claim is dropped once it is written (or failed)


class WriteBacks:
    """The queue and its writers. `submit` from any thread; the rest on the trio thread."""

    def __init__(self, writer: WritableStore, stats: Stats, health: Health, read_back: ReadBack, *,
                 deadline: float, drop_claim: Callable[[str], None]) -> None:
        self.writer = writer
        self.stats = stats
        self.health = health
        self.read_back = read_back
        self.deadline = deadline
        self.drop_claim = drop_claim
        # Two lanes: extents this node claimed (other nodes wait for them) are written before any other.
        self._claimed: collections.deque[WriteBack] = collections.deque()
        self._queued: collections.deque[WriteBack] = collections.deque()
        self._wake = trio.lowlevel.ParkingLot()
        self._writing = 0
        self._limiter = trio.CapacityLimiter(WRITERS)
        self.token: trio.lowlevel.TrioToken | None = None  # the daemon's, once the tier serves (`SharedTier.start`)

    def submit(self, item: WriteBack) -> None:
        """Queue a write-back (any thread; never waits). Before the writers run, nothing is queued."""
        if self.token is None:
            return
        try:
            self.token.run_sync_soon(self._enqueue, item)
        except trio.RunFinishedError:
            pass

    def _enqueue(self, item: WriteBack) -> None:
        if item.claimed:
            self._claimed.append(item)  # bounded by this node's flights
        elif len(self._queued) < QUEUE:
            self._queued.append(item)
        else:
            self.stats.add(shared_writeback_dropped=1)
            return
        self._wake.unpark()

    async def drain(self) -> None:
        """One writer task (supervised): writes what is queued, claimed extents first."""
        while True:
            while not self._claimed and not self._queued:
                await self._wake.park()
            item = self._claimed.popleft() if self._claimed else self._queued.popleft()
            self._writing += 1
            try:
                await trio.to_thread.run_sync(self._write, item, limiter=self._limiter, abandon_on_cancel=True)
            finally:
                self._writing -= 1

    async def warm(self, items: Sequence[WriteBack]) -> None:
        """Write each of `items` the tier does not hold yet, now (`modelfs prefetch` warms the fleet)."""
        for item in items:
            if self.health.offline:
                return
            await trio.to_thread.run_sync(self._put, item, True, limiter=self._limiter, abandon_on_cancel=True)

    async def flush(self, timeout: float) -> int:
        """At unmount (the mount no longer serves): let the writers finish the write-backs queued, claimed ones
        first, for up to `timeout` seconds, so a node that unmounts right after a load still leaves the fleet
        what it fetched; then drop the rest, and the claims among them (nobody waits for those any longer).
        Returns how many were dropped."""
        with trio.move_on_after(timeout):
            while self.pending:
                await trio.sleep(0.02)
        left = [*self._claimed, *self._queued]
        self._claimed.clear()
        self._queued.clear()
        if left:
            self.stats.add(shared_writeback_dropped=len(left))
            with trio.move_on_after(2 * self.deadline):
                for item in left:
                    if item.claimed:
                        await trio.to_thread.run_sync(self.drop_claim, item.key, abandon_on_cancel=True)
        return len(left)

    @property
    def pending(self) -> int:
        """Write-backs queued or being written (trio thread)."""
        return len(self._claimed) + len(self._queued) + self._writing

    def _write(self, item: WriteBack) -> None:
        """One write-back (skipped while the tier is offline), then the claim it ends, if any: a claim is
        dropped even when the write was not made, so nobody waits for it any longer."""
        if not self.health.offline:
            # An extent nobody claimed came from the origin after a miss, a failed claim or a wait that
            # ran out: another node may have written it meanwhile, and a HEAD costs less than a PUT.
            self._put(item, unless_there=not item.claimed)
        if item.claimed:
            self.drop_claim(item.key)

    def _put(self, item: WriteBack, unless_there: bool) -> None:
        """PUT one extent from the local cache (read back and checked against its hash). A failed write is
        counted; only a tier that cannot be reached at all is skipped for it (a read-only or full tier still
        serves reads)."""
        try:
            if unless_there and self.writer.exists(item.key):
                return
            block = self.read_back(item.vid, item.start, item.length, item.digest)
            if block is None:
                return  # evicted (or never stored: the cache was full) since, or bad: nothing to share
            self.writer.put(item.key, io.BytesIO(block), {"xxh3": item.digest.hex()})  # a file botocore can rewind
        except (StoreError, OSError) as e:
            self.stats.add(shared_write_errors=1)
            log.debug("shared cache tier: write-back of %s failed: %s", item.key, e)
            if isinstance(e, StoreUnreachable):
                self.health.mark_unreachable(e)
            return
        self.health.answered()
        self.stats.add(shared_bytes_written=item.length)
