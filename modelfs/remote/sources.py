"""Where an extent's bytes come from: the origin, or the fleet tier in front of it, behind one small interface.

A fetch asks a `Source` to fill a run of adjacent extents of one file version into its buffers. The origin
(`Origin`) makes ranged GETs of the origin store. The fleet tier (`shared.SharedTier`) wraps the origin: it
serves what the fleet holds, fetches the rest through the origin it was built with, and writes that back for
the fleet. The fetcher knows neither; it stores each extent as the source hands it over (`Arrived`).

Calls run in the fetch's worker thread and block (GETs, retries, the tier's claims); the deadline `until`
(time.monotonic()) is the flight's: nothing is tried again past it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from modelfs.errors import StoreError, StoreUnreachable, VersionChanged
from modelfs.health import Health
from modelfs.remote import ObjectInfo, Store
from modelfs.retry import STORE_PAUSES, Resume
from modelfs.stats import Stats

log = logging.getLogger(__name__)


class Block(NamedTuple):
    """One extent wanted: its version (`index.version_id`) and place in it, and its content hash where the
    version's manifest gives it before any byte arrives (the fleet tier keys such extents by content)."""

    vid: bytes
    start: int
    length: int
    digest: bytes | None = None


class Landed(Protocol):
    """What the fetcher made of an extent handed over (`version.Stored`): its hash, and whether the cache
    holds it now (only then can the fleet tier read it back to share it)."""

    @property
    def digest(self) -> bytes: ...

    @property
    def cached(self) -> bool: ...


#: Extent i of the run is in its buffer: (i, its hash if the source checked it already, else None) -> what
#: the fetcher made of it. Called from the fetch's worker thread, in the order the bytes arrive.
Arrived = Callable[[int, "bytes | None"], Landed]


class Source(Protocol):
    def fill(self, info: ObjectInfo, blocks: Sequence[Block], views: Sequence[memoryview], arrived: Arrived,
             until: float) -> None:
        """Fill `views[i]` with the bytes of `blocks[i]` of the object `info` names (its ETag pins the
        version), calling `arrived(i, ..)` as each is in; raises StoreError (VersionChanged, StoreUnreachable)
        if some could not be had by `until`."""


class Origin:
    """The origin store as a source: one ranged GET per stretch of adjacent extents. A transient failure (the
    store refused, stalled or 5xx'd past botocore's own retries: an overloaded store, not an outage) is tried
    again from the first buffer not yet whole (`retry`), until the flight's deadline or offline mode."""

    def __init__(self, store: Store, stats: Stats, health: Health,
                 observe: Callable[[float], None] | None = None) -> None:
        self.store = store
        self.stats = stats
        self.health = health
        self.observe = observe  # fetch latency in seconds (metrics), from worker threads

    def fill(self, info: ObjectInfo, blocks: Sequence[Block], views: Sequence[memoryview], arrived: Arrived,
             until: float) -> None:
        k = 0
        while k < len(blocks):
            j = k + 1
            while j < len(blocks) and blocks[j].start == blocks[j - 1].start + blocks[j - 1].length:
                j += 1
            self._get(info, blocks[k].start, views[k:j], until, _Handed(arrived, k))
            k = j

    def _get(self, info: ObjectInfo, start: int, views: Sequence[memoryview], until: float,
             filled: Callable[[int], None]) -> None:
        began = time.monotonic()
        resume, pauses = Resume(start, views, filled), STORE_PAUSES.start()
        while True:
            at, rest = resume.attempt()
            try:
                self.store.read_into(info, at, rest, resume.complete)
                break
            except VersionChanged:
                self.stats.add(version_changes=1)
                raise
            except StoreError as e:
                self.stats.add(store_errors=1)
                if isinstance(e, StoreUnreachable):
                    self.health.mark_unreachable(e)
                if not e.transient or self.health.offline or time.monotonic() + pauses.upcoming >= until:
                    if not isinstance(e, StoreUnreachable):
                        log.warning("%s", e)
                    raise
                self.stats.add(store_retries=1)
                pause = pauses.draw()
                log.debug("GET %s at %d: %s; trying again in %.2f s", info.key, at, e, pause)
                time.sleep(pause)
        self.health.answered()
        self.stats.add(gets=1, bytes_fetched=sum(len(v) for v in views))
        if self.observe is not None:
            self.observe(time.monotonic() - began)


class _Handed:
    """View k of one GET is whole: extent `first + k` of the run, handed over with no hash (the fetcher
    hashes it)."""

    __slots__ = ("arrived", "first")

    def __init__(self, arrived: Arrived, first: int) -> None:
        self.arrived = arrived
        self.first = first

    def __call__(self, k: int) -> None:
        self.arrived(self.first + k, None)
