"""The fetcher: a bounded pool of ranged GETs, single-flight per extent, that fills cache and index.

An extent is fetched at most once at a time however many readers want it: the first asks, the rest
wait on the same flight. Flights run in the daemon's nursery, not in the reader's task, so a reader
that goes away never cancels a GET that others wait for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from modelfs.cache import BlockCache, block_hash
from modelfs.errors import StoreError, VersionChanged
from modelfs.index import ChunkIndex, version_id
from modelfs.remote import ObjectInfo, Store
from modelfs.stats import Stats

log = logging.getLogger(__name__)


@dataclass(eq=False)
class FileVersion:
    """One immutable version of a file, and what is known of its extents (offset -> (hash, length))."""

    info: ObjectInfo
    vid: bytes
    extent_size: int
    known: dict[int, tuple[bytes, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, identity: str, info: ObjectInfo, extent_size: int) -> FileVersion:
        return cls(info, version_id(identity, info), extent_size)

    def extent_at(self, offset: int) -> tuple[int, int]:
        """(start, length) of the extent holding byte `offset` (fixed-size layout)."""
        start = offset - offset % self.extent_size
        return start, min(self.extent_size, self.info.size - start)


@dataclass(eq=False)
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes = b""
    error: BaseException | None = None


class Fetcher:
    """Turns cache misses into ranged GETs; at most `concurrency` in flight."""

    def __init__(self, store: Store, cache: BlockCache, index: ChunkIndex, stats: Stats, concurrency: int) -> None:
        self.store = store
        self.cache = cache
        self.index = index
        self.stats = stats
        self.limiter = trio.CapacityLimiter(concurrency)
        self._inflight: dict[tuple[bytes, int], _Flight] = {}
        self._nursery: trio.Nursery | None = None
        self._write_error_logged = False

    def start(self, nursery: trio.Nursery) -> None:
        """Flights run in `nursery`, which owns them: cancelling it cancels every wait."""
        self._nursery = nursery

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def fetch(self, ver: FileVersion, start: int, length: int) -> bytes:
        """The whole extent [start, start+length) of `ver`, from the store, stored in cache and index."""
        key = (ver.vid, start)
        flight = self._inflight.get(key)
        if flight is None:
            assert self._nursery is not None, "Fetcher.start() was not called"
            flight = self._inflight[key] = _Flight()
            self._nursery.start_soon(self._run, key, flight, ver, start, length)
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.data

    async def _run(self, key: tuple[bytes, int], flight: _Flight, ver: FileVersion, start: int, length: int) -> None:
        try:
            flight.data = await trio.to_thread.run_sync(self._fetch_blocking, ver, start, length,
                                                        limiter=self.limiter)
        except (StoreError, OSError) as e:
            flight.error = e
        except BaseException as e:
            flight.error = StoreError(f"internal error fetching {ver.info.key}: {type(e).__name__}")
            if not isinstance(e, trio.Cancelled):
                log.exception("fetch of %s at %d failed", ver.info.key, start)
            raise
        finally:
            del self._inflight[key]
            flight.done.set()

    def _fetch_blocking(self, ver: FileVersion, start: int, length: int) -> bytes:
        """GET, hash, store block, record extent. Runs in a worker thread."""
        known = ver.known.get(start)
        if known is not None:
            # A flight for this extent may have completed between the reader's cache check and this
            # flight's start: serve what it stored instead of fetching the same bytes twice.
            cached = self.cache.read(known[0], length, 0, length)
            if cached is not None:
                return cached
        try:
            data = self.store.get_range(ver.info, start, length)
        except VersionChanged:
            self.stats.add(version_changes=1)
            raise
        except StoreError as e:
            self.stats.add(store_errors=1)
            log.warning("%s", e)
            raise
        self.stats.add(gets=1, bytes_fetched=len(data))
        digest = block_hash(data)
        if known is not None and known[0] != digest:
            log.warning("%s at %d: store returned different bytes for the same version; re-indexed",
                        ver.info.key, start)
        try:
            if not self.cache.put(digest, data):
                self.stats.add(dedup_bytes_saved=len(data))
        except OSError as e:
            self.stats.add(cache_write_errors=1)
            if not self._write_error_logged:
                self._write_error_logged = True
                log.warning("cannot write to the block cache (%s): serving from memory without caching",
                            e.strerror or e)
            return data
        self.index.record(ver.vid, self.store.identity, ver.info, start, digest, length)
        ver.known[start] = (digest, length)
        return data
