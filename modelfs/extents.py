"""Where an extent's bytes are, and the one way to get them; the owner of the mapped pool.

`Blocks` is the only code that stores a block (block cache + chunk index + the verified copy in memory)
or looks one up; the fetcher hands it what its GETs bring (`Blocks.store`, then `Blocks.keep`) and knows
nothing of the cache, the index or the pool. `Extents` answers readers from it and from the fetcher.

Every reader of extents asks here: the core's READs, the prefetcher, `modelfs du` and the progress of
`modelfs prefetch`. The places, cheapest first:

  mapped     a verified copy of the block in the daemon's memory (`mapped.MappedBlocks`): a READ is a
             slice of it, answered on the trio thread with no I/O
  in flight  a GET is under way (`fetch.Fetcher`): join it, and answer from its copy or buffer
  cached     a block on disk: a worker thread reads it into memory of its own and verifies it there
  missing    the index does not know the extent, or its block is not on disk: a ranged GET

Views handed out follow `buffers`' rule: valid until the caller's next checkpoint (answer a READ with
them, or copy them).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from modelfs.cache import BlockCache, CacheFull, block_hash
from modelfs.errors import ModelfsError
from modelfs.fetch import Fetcher
from modelfs.index import ChunkIndex
from modelfs.mapped import MappedBlocks, private_copy
from modelfs.stats import Stats
from modelfs.version import Extent, FileVersion, Stored

_T = TypeVar("_T")

log = logging.getLogger(__name__)

#: Seconds the prefetcher waits for the loader to use blocks mapped ahead before it stops protecting them.
AHEAD_WAIT = 2.0


class Where(enum.Enum):
    MAPPED = "mapped"
    IN_FLIGHT = "in flight"
    CACHED = "cached"
    MISSING = "missing"


@dataclass(eq=False)
class _Pending:
    """A block being mapped by a worker thread; `view` once `done` (None: not cached)."""

    done: trio.Event = field(default_factory=trio.Event)
    view: memoryview | None = None


class Blocks:
    """Where blocks are kept: on disk (`cache.BlockCache`, found through the `index.ChunkIndex`) and, as
    verified copies, in memory (`mapped.MappedBlocks`, `cache.map_budget`). Methods marked "worker
    thread" block on the disk; the others are trio-thread only and never block."""

    def __init__(self, index: ChunkIndex, cache: BlockCache, stats: Stats, identity: str, map_budget: int) -> None:
        self.index = index
        self.cache = cache
        self.stats = stats
        self.identity = identity  # the store's: index records are per source
        self.maps = MappedBlocks(map_budget)
        self._write_error_logged = False

    # -- the trio thread ---------------------------------------------------------------------------------

    def view(self, ver: FileVersion, start: int, inner: int, size: int) -> memoryview | None:
        ext = ver.known.get(start)
        return self.maps.view(ext[0], inner, size) if ext is not None else None

    def whole(self, ver: FileVersion, start: int) -> memoryview | None:
        ext = ver.known.get(start)
        return self.maps.whole(ext[0]) if ext is not None else None

    def held(self, ver: FileVersion, start: int) -> bool:
        ext = ver.known.get(start)
        return ext is not None and ext[0] in self.maps

    def keep(self, digest: bytes, copy: memoryview, ahead: bool = False, evict: bool = True) -> memoryview:
        """Hold a verified copy (from `load`, or `store(keep=True)`); returns the view to serve."""
        return self.maps.put(digest, copy, ahead=ahead, evict=evict)

    def verified(self, ver: FileVersion) -> bool:
        """Every extent's block was verified by this daemon (so it is on disk: eviction forgets it)."""
        verified = self.cache.verified
        for start, _ in ver.extents():
            ext = ver.known.get(start)
            if ext is None or not verified(ext[0]):
                return False
        return True

    async def reserve_ahead(self, length: int, patience: float) -> None:
        await self.maps.reserve_ahead(length, patience)

    def unreserve(self, length: int) -> None:
        self.maps.unreserve(length)

    @property
    def mapped(self) -> int:
        return len(self.maps)

    def trim(self) -> int:
        """Drop every copy held (an idle daemon gives its memory back); returns the bytes let go."""
        freed = self.maps.bytes
        self.maps.clear()
        return freed

    # -- worker threads ----------------------------------------------------------------------------------

    def load(self, ver: FileVersion, start: int, length: int) -> tuple[bytes, memoryview] | None:
        """The extent's hash and its block read from disk and verified (`cache.BlockCache.load`), or None
        if it is not cached."""
        ext = ver.lookup(self.index, start, length)
        if ext is None:
            return None
        copy = self.cache.load(ext[0], length)
        return (ext[0], copy) if copy is not None else None

    def contains(self, ver: FileVersion, start: int, length: int) -> bool:
        return self.state(ver, start, length)[1] is Where.CACHED

    def state(self, ver: FileVersion, start: int, length: int) -> tuple[bytes | None, Where]:
        """The extent's hash if known, and whether its block is on disk (CACHED) or not (MISSING)."""
        ext = ver.lookup(self.index, start, length)
        if ext is None:
            return None, Where.MISSING
        return ext[0], Where.CACHED if self.cache.contains(ext[0]) else Where.MISSING

    def learn(self, ver: FileVersion) -> None:
        ver.learn(self.index)

    def store(self, ver: FileVersion, start: int, data: memoryview, digest: bytes | None = None,
              keep: bool = False) -> Stored:
        """Store the bytes a GET brought for one extent: hash them (unless the caller did), write the block
        (unless the cache is full), record the extent in the index; with `keep` (a reader waits on them),
        also a private copy to hand to `keep` (the GET buffer goes back to its pool). A block that cannot be
        written is served from memory this once."""
        known = ver.known.get(start)
        if digest is None:
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
            return Stored(digest, False, None)
        except OSError as e:
            self.stats.add(cache_write_errors=1)
            if not self._write_error_logged:
                self._write_error_logged = True
                log.warning("cannot write to the block cache (%s): serving from memory without caching",
                            e.strerror or e)
            return Stored(digest, False, None)
        self.index.record(ver.vid, self.identity, ver.info, start, digest, len(data))
        ver.known[start] = (digest, len(data))
        return Stored(digest, True, private_copy(data) if keep else None)


class Extents:
    """The read path below the core: mapped blocks, flights, block files, GETs."""

    def __init__(self, blocks: Blocks, fetcher: Fetcher, stats: Stats, io_limiter: trio.CapacityLimiter,
                 prefetch_limiter: trio.CapacityLimiter, deadline: float = 30.0) -> None:
        self.blocks = blocks
        self.fetcher = fetcher
        self.stats = stats  # cache_hits / cache_misses: READ pieces served from the cache / that waited for a GET
        # Cache-disk threads: READs take `io_limiter` tokens, the prefetcher `prefetch_limiter` ones, so
        # prefetch never delays a READ's map; a READ waits at most `deadline` for the disk.
        self.io_limiter = io_limiter
        self.prefetch_limiter = prefetch_limiter
        self.deadline = deadline
        # Threads in all, with room for READ threads abandoned at their deadline until they end.
        self._threads = trio.CapacityLimiter(2 * (io_limiter.total_tokens + prefetch_limiter.total_tokens))
        self._mapping: dict[tuple[bytes, int], _Pending] = {}

    # -- the trio thread, no I/O -------------------------------------------------------------------------

    def mapped(self, ver: FileVersion, start: int, inner: int, size: int) -> memoryview | None:
        """Bytes [inner, inner+size) of the extent at `start` if a verified copy of its block is held;
        else None (then `read`)."""
        view = self.blocks.view(ver, start, inner, size)
        if view is not None:
            self.stats.cache_hits += 1
        return view

    def where(self, ver: FileVersion, start: int) -> Where | None:
        """Mapped or in flight (known without I/O); None: ask `state` in a worker thread."""
        if self.blocks.held(ver, start):
            return Where.MAPPED
        return Where.IN_FLIGHT if self.fetcher.flight(ver, start) is not None else None

    def complete(self, ver: FileVersion) -> bool:
        """Every extent's block was verified by this daemon (so it is on disk: eviction forgets it). Then
        prefetch has nothing to do for the file: a re-open, a hot load, is served by the page cache."""
        return self.blocks.verified(ver)

    # -- async: may wait for a worker thread or a GET ------------------------------------------------------

    async def read(self, ver: FileVersion, start: int, length: int, inner: int, size: int,
                   demand: bool = True) -> memoryview:
        """Bytes [inner, inner+size) of the extent [start, start+length): for a READ (`demand`: counted,
        and its mapping may displace others), or for the prefetcher's own parsing."""
        flight = self.fetcher.flight(ver, start)
        held = self.blocks.view(ver, start, inner, size)
        if held is not None:
            self.stats.cache_hits += demand
            return held
        if flight is None:
            view = await self._map(ver, start, length, evict=demand, demand=demand)
            if view is not None:
                self.stats.cache_hits += demand
                return view[inner:inner + size]
            self.stats.cache_misses += demand
            data = await self.fetcher.fetch(ver, start, length)
        else:
            self.stats.cache_misses += demand
            data = await self.fetcher.wait(flight)
        return data[inner:inner + size]

    async def copy(self, ver: FileVersion, offset: int, size: int, demand: bool = True) -> bytearray:
        """Bytes [offset, offset+size) of a version in a new buffer: READs that cross an extent edge, and
        (not `demand`) the headers and indexes the prefetcher parses."""
        end = min(offset + size, ver.info.size)
        out = bytearray(max(0, end - offset))
        pos = offset
        while pos < end:
            start, length = ver.extent_at(pos)
            n = min(end, start + length) - pos
            view = self.mapped(ver, start, pos - start, n) if demand else None
            if view is None:
                view = await self.read(ver, start, length, pos - start, n, demand)
            out[pos - offset:pos - offset + n] = view  # copied before the next await
            pos += n
        return out

    async def warm(self, ver: FileVersion, start: int, length: int,
                   make_room: Callable[[int], Awaitable[None]], ahead: bool = True) -> bool:
        """Prefetch one extent: fetch it (after `make_room`) unless its block is on disk. With `ahead` (a
        file being read) a block on disk is mapped and verified now, ahead of the reader, so it is read
        from disk, hashed and mapped once (the lead is bounded by the pool: `mapped`). True if fetched."""
        where = self.where(ver, start)
        if where is Where.MAPPED:
            return False
        if where is Where.IN_FLIGHT:
            flight = self.fetcher.flight(ver, start)
            assert flight is not None
            await self.fetcher.settle(flight)
            return False
        if not ahead:
            _, where = await self._disk(False, self.blocks.state, ver, start, length)
            if where is Where.CACHED:
                return False
            await make_room(length)
            return await self.fetcher.prefetch(ver, start, length)
        # The lead over the loader is what the pool holds: wait for it to read what was mapped ahead.
        await self.blocks.reserve_ahead(length, AHEAD_WAIT)
        try:
            if await self._map(ver, start, length, ahead=True, demand=False) is not None:
                return False
        finally:
            self.blocks.unreserve(length)
        await make_room(length)
        return await self.fetcher.prefetch(ver, start, length)

    async def fetch_run(self, ver: FileVersion, run: list[Extent]) -> int:
        """Fetch adjacent uncached extents in as few GETs as the buffers allow; returns bytes fetched."""
        return await self.fetcher.prefetch_run(ver, run)

    async def mapping(self, ver: FileVersion, start: int, length: int) -> memoryview | None:
        """The whole cached extent as a view of its verified copy (for a page-cache push, from a worker
        thread: the copy stays valid as long as the view lives); None if it is not cached."""
        view = self.blocks.whole(ver, start)
        return view if view is not None else await self._map(ver, start, length, evict=False, demand=False)

    async def _map(self, ver: FileVersion, start: int, length: int, ahead: bool = False, evict: bool = True,
                   demand: bool = True) -> memoryview | None:
        """Load the extent's block in a worker thread (read into memory of its own and verified there) and
        keep the copy (`Blocks.keep`); single-flight: READs that arrive together (the kernel's
        readahead sends several) and the prefetcher share one load. A view of the whole block, or None if
        it is not cached."""
        key = (ver.vid, start)
        pending = self._mapping.get(key)
        if pending is not None:
            await pending.done.wait()
            return pending.view
        pending = self._mapping[key] = _Pending()
        try:
            got = await self._disk(demand, self.blocks.load, ver, start, length)
            if got is not None:
                pending.view = self.blocks.keep(*got, ahead=ahead, evict=evict)
        finally:
            del self._mapping[key]
            pending.done.set()
        return pending.view

    async def _disk(self, demand: bool, fn: Callable[..., _T], *args: object) -> _T:
        """Run blocking cache-disk work in a worker thread: for a READ under its own limiter and within
        fetch.deadline (a disk that stops answering fails that READ with EIO, its thread abandoned);
        for the prefetcher under the prefetcher's."""
        if not demand:
            async with self.prefetch_limiter:
                return await trio.to_thread.run_sync(fn, *args, limiter=self._threads)
        try:
            with trio.fail_after(self.deadline):
                async with self.io_limiter:
                    return await trio.to_thread.run_sync(fn, *args, limiter=self._threads, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise ModelfsError(f"the block cache did not answer within fetch.deadline ({self.deadline:g} s)") from None

    # -- worker threads --------------------------------------------------------------------------------

    def learn(self, ver: FileVersion) -> None:
        """Every extent of `ver` the index knows, in one scan (before prefetching a whole file: then the
        prefetcher knows each extent's block without a lookup per extent)."""
        self.blocks.learn(ver)

    def state(self, ver: FileVersion, start: int, length: int) -> tuple[bytes | None, Where]:
        """The extent's hash if known, and whether its block is on disk (CACHED) or not (MISSING). Blocks
        on disk: call from a worker thread."""
        return self.blocks.state(ver, start, length)


def usage(maps: list[tuple[str, dict[str, Any]]]) -> tuple[list[tuple[str, dict[str, int]]], dict[str, int]]:
    """`modelfs du`: from each file's extent map (`ModelFS.extent_map`: size, and [hash or None, length,
    cached] per extent), its logical, unique, cached and still-to-fetch bytes, and the totals with every
    extent shared between files counted once (extents of unknown hash count as their own)."""
    seen: set[str] = set()
    totals = {"logical": 0, "unique": 0, "cached": 0, "to_fetch": 0}
    rows: list[tuple[str, dict[str, int]]] = []
    for path, info in maps:
        row = {"logical": int(info["size"]), "unique": 0, "cached": 0, "to_fetch": 0}
        own: set[str] = set()
        for digest, length, cached in info["extents"]:
            if digest is not None and digest in own:
                continue
            if digest is not None:
                own.add(digest)
            row["unique"] += length
            row["cached" if cached else "to_fetch"] += length
            if digest is None or digest not in seen:
                totals["unique"] += length
                totals["cached" if cached else "to_fetch"] += length
                if digest is not None:
                    seen.add(digest)
        totals["logical"] += row["logical"]
        rows.append((path, row))
    return rows, totals
