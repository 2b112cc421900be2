"""Where an extent's bytes are, and the one way to get them.

`Blocks` is the only code that stores an extent (the version's file + the chunk index, `cache.FileCache`)
or finds one; the fetcher hands it what its GETs bring (`Blocks.store`) and knows nothing of the cache or
the index. `Extents` answers readers from it and from the fetcher.

Every reader of extents asks here: the core's READs, the prefetcher, `modelfs du` and the progress of
`modelfs prefetch`. The places, cheapest first:

  file       trusted bytes in the version's own file, or in another version's file with the same content
             (dedup): a READ is a read of the page cache on the trio thread (RWF_NOWAIT), or, when the page
             cache lacks them, a read in a worker thread
  memory     an extent the cache had no room for, held in the daemon's memory (`mapped.MappedBlocks`)
  in flight  a GET is under way (`fetch.Fetcher`): join it, and answer from its buffer
  unchecked  bytes in a file that this daemon has not checked yet (written before it started): read back
             and hashed in a worker thread first (`cache.FileCache.verify`)
  missing    not in any file: a ranged GET, written into the version's file as it arrives

Views handed out follow `buffers`' rule: valid until the caller's next checkpoint (answer a READ with
them, or copy them).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from modelfs.cache import CacheFull, FileCache
from modelfs.catalog.index import ChunkIndex
from modelfs.catalog.version import FileVersion, Stored
from modelfs.digest import content_hash
from modelfs.errors import ModelfsError
from modelfs.fetch.fetcher import Fetcher
from modelfs.mapped import MappedBlocks, private, private_copy
from modelfs.stats import Stats

_T = TypeVar("_T")

log = logging.getLogger(__name__)

#: Bytes of the trio thread's READ reply buffer to begin with (the kernel's READs are 1 MiB at most with
#: read_ahead_kb=4096; it grows to the largest READ seen).
REPLY = 1 << 20


class Where(enum.Enum):
    IN_FLIGHT = "in flight"
    CACHED = "in its own file"
    ELSEWHERE = "in another version's file"
    MISSING = "missing"


@dataclass(eq=False)
class _Pending:
    """An extent being checked by a worker thread (`Extents._check`); `where` once `done`."""

    done: trio.Event = field(default_factory=trio.Event)
    where: Where = Where.MISSING


class Blocks:
    """Where extents are kept: the version files on disk (`cache.FileCache`, found through the chunk index)
    and, for extents the cache could not store, copies in memory (`mapped.MappedBlocks`). Methods marked
    "worker thread" block on the disk; the others are trio-thread only and never block."""

    def __init__(self, index: ChunkIndex, cache: FileCache, stats: Stats, map_budget: int) -> None:
        self.index = index
        self.cache = cache
        self.stats = stats
        self.maps = MappedBlocks(map_budget)
        self._reply = memoryview(private(REPLY))  # READs answered on the trio thread are read into it
        self._write_error_logged = False

    # -- the trio thread ---------------------------------------------------------------------------------

    def fast(self, ver: FileVersion, start: int, inner: int, size: int) -> memoryview | None:
        """Bytes [inner, inner+size) of the extent at `start` if they can be had with no wait: trusted bytes
        the page cache holds (read into the reply buffer: valid until the next call), or a copy in memory."""
        if len(self._reply) < size:
            self._reply = memoryview(private(size))
        view = self._reply[:size]
        if self.cache.pread(ver.vid, start, inner, view, nowait=True) == size:
            return view
        src = ver.elsewhere.get(start)
        if src is not None:
            n = self.cache.pread(src[0], src[1], inner, view, nowait=True)
            if n == size:
                return view
            if n < 0:
                del ver.elsewhere[start]  # evicted or dropped there: look again
        ext = ver.known.get(start)
        return self.maps.view(ext[0], inner, size) if ext is not None else None

    def trusted(self, ver: FileVersion, start: int) -> bool:
        """Its bytes can be read now, with no check: in a file, trusted, or in memory."""
        if self.cache.trusted(ver.vid, start):
            return True
        src = ver.elsewhere.get(start)
        if src is not None and self.cache.trusted(*src):
            return True
        ext = ver.known.get(start)
        return ext is not None and ext[0] in self.maps

    def has(self, ver: FileVersion, start: int) -> bool:
        """The extent is in the version's own file, or referred to another's (no I/O: any thread)."""
        return self.cache.present(ver.vid, start) or start in ver.elsewhere

    def keep(self, digest: bytes, copy: memoryview) -> memoryview:
        """Hold the copy of an extent the cache could not store (`store`); returns the view to serve."""
        return self.maps.put(digest, copy)

    def complete(self, ver: FileVersion) -> bool:
        """Every extent is in the version's own file and trusted: nothing to fetch, check or copy."""
        return self.cache.all_trusted(ver.vid)

    @property
    def held(self) -> int:
        return len(self.maps)

    def trim(self) -> int:
        """Drop every copy held in memory (an idle daemon gives its memory back); returns the bytes let go."""
        freed = self.maps.bytes
        self.maps.clear()
        return freed

    # -- worker threads ----------------------------------------------------------------------------------

    def state(self, ver: FileVersion, start: int, length: int) -> tuple[bytes | None, Where]:
        """The extent's hash if known, and whether its bytes are in the version's own file (CACHED), in
        another version's (ELSEWHERE: `ver.elsewhere` says where) or nowhere (MISSING)."""
        ext = ver.lookup(self.index, start, length)
        if self.cache.present(ver.vid, start):
            return (ext[0] if ext else None), Where.CACHED
        if ext is None:
            return None, Where.MISSING
        src = self.cache.locate(ext[0], length, besides=(ver.vid, start))
        if src is None:
            ver.elsewhere.pop(start, None)
            return ext[0], Where.MISSING
        ver.elsewhere[start] = src
        return ext[0], Where.ELSEWHERE

    def check(self, ver: FileVersion, start: int, length: int, copy: bool) -> Where:
        """Make the extent's bytes readable with no further check, if the cache has them anywhere: bytes this
        daemon has not checked yet are read back and hashed (damaged ones are dropped: MISSING), and with
        `copy` (or where the filesystem shares extents, for free) bytes of another version's file are put
        into this version's own. Returns where they are now."""
        digest, where = self.state(ver, start, length)
        if where is Where.CACHED:
            if self.cache.trusted(ver.vid, start) or self.cache.verify(ver.vid, start, length):
                return Where.CACHED
            return Where.MISSING
        if where is Where.ELSEWHERE:
            assert digest is not None
            src = ver.elsewhere[start]
            if not self.cache.trusted(*src) and not self.cache.verify(*src, length):
                ver.elsewhere.pop(start, None)
                return self.check(ver, start, length, copy)  # another copy, if any
            if copy or self.cache.reflinks:
                try:
                    if self.cache.copy_in(ver, start, length, digest, src):
                        self.stats.add(dedup_bytes_saved=length)
                        ver.elsewhere.pop(start, None)
                        return Where.CACHED
                except OSError as e:  # no room, or the copy failed: the other file still serves it
                    log.debug("%s at %d not copied from another version: %s", ver.info.key, start, e)
                if self.cache.present(ver.vid, start):
                    return Where.CACHED
            return Where.ELSEWHERE
        return where

    def read(self, ver: FileVersion, start: int, inner: int, size: int) -> memoryview | None:
        """Bytes [inner, inner+size) of a trusted extent, wherever they are, read into a new buffer (a READ
        whose bytes the page cache did not hold); None if they are no longer there."""
        out = memoryview(bytearray(size))
        if self.cache.pread(ver.vid, start, inner, out) == size:
            return out
        src = ver.elsewhere.get(start)
        if src is not None and self.cache.pread(src[0], src[1], inner, out) == size:
            return out
        return None

    def cached(self, ver: FileVersion, start: int) -> bytes | None:
        """For a flight about to GET an extent: its hash if the cache holds it by now (stored by a flight
        that ended between the reader's look and this one's start), else None."""
        known = ver.known.get(start)
        return known[0] if known is not None and self.has(ver, start) else None

    def learn(self, ver: FileVersion) -> None:
        ver.learn(self.index)

    def store(self, ver: FileVersion, start: int, data: memoryview, digest: bytes | None = None) -> Stored:
        """Store the bytes a GET brought for one extent: hash them (unless the caller did) and write them into
        the version's file (the chunk index records them). Content another version's file holds already is
        not written again (dedup): it is cloned where the filesystem shares extents, else read from there
        (`ver.elsewhere`) until the version is loaded often enough to copy it in. An extent the cache cannot
        take is recorded as known only, and a private copy comes back for `keep`: its readers are served from
        memory."""
        known = ver.known.get(start)
        if digest is None:
            digest = content_hash(data)
        if known is not None and known[0] != digest:
            log.warning("%s at %d: the store returned other bytes than the manifest or index says; re-indexed",
                        ver.info.key, start)
        ver.known[start] = (digest, len(data))
        try:
            if self._shared(ver, start, len(data), digest):
                self.stats.add(dedup_bytes_saved=len(data))
                return Stored(digest, True, None)
            if not self.cache.write(ver, start, data, digest):
                self.stats.add(dedup_bytes_saved=len(data))  # written by another flight meanwhile
        except CacheFull as e:
            # Quota reached with every extent in use, or the disk is full: serve this extent from memory.
            self.stats.add(cache_full_skips=1)
            log.debug("%s at %d not cached: %s", ver.info.key, start, e.strerror)
            return self._unstored(ver, start, data, digest)
        except OSError as e:
            self.stats.add(cache_write_errors=1)
            if not self._write_error_logged:
                self._write_error_logged = True
                log.warning("cannot write to the cache (%s): serving from memory without caching", e.strerror or e)
            return self._unstored(ver, start, data, digest)
        ver.elsewhere.pop(start, None)
        return Stored(digest, True, None)

    def _shared(self, ver: FileVersion, start: int, length: int, digest: bytes) -> bool:
        """Whether a trusted extent of some file holds these bytes already, and this one now uses it: cloned or
        copied into the version's own file (a filesystem that shares extents; the same file; a version
        loaded often), or read from there (`ver.elsewhere`; its hash recorded, its presence not)."""
        src = self.cache.locate(digest, length, besides=(ver.vid, start))
        if src is None or not self.cache.trusted(*src):
            return False
        if self.cache.reflinks or ver.copy_shared or src[0] == ver.vid:
            return self.cache.copy_in(ver, start, length, digest, src)
        self.index.record(ver.vid, self.cache.identity, self.cache.domain, ver.info, start, digest, length)
        ver.elsewhere[start] = src
        return True

    def _unstored(self, ver: FileVersion, start: int, data: memoryview, digest: bytes) -> Stored:
        self.index.record(ver.vid, self.cache.identity, self.cache.domain, ver.info, start, digest, len(data))
        ver.known[start] = (digest, len(data))
        return Stored(digest, False, private_copy(data))


class Extents:
    """The read path below the core: files, memory, flights, GETs."""

    def __init__(self, blocks: Blocks, fetcher: Fetcher, stats: Stats, io_limiter: trio.CapacityLimiter,
                 prefetch_limiter: trio.CapacityLimiter, deadline: float = 30.0) -> None:
        self.blocks = blocks
        self.fetcher = fetcher
        self.stats = stats  # cache_hits / cache_misses: READ pieces served from the cache / that waited for a GET
        # Cache-disk threads: READs take `io_limiter` tokens, the prefetcher `prefetch_limiter` ones, so
        # prefetch never delays a READ's disk work; a READ waits at most `deadline` for the disk.
        self.io_limiter = io_limiter
        self.prefetch_limiter = prefetch_limiter
        self.deadline = deadline
        # Threads in all, with room for READ threads abandoned at their deadline until they end.
        self._threads = trio.CapacityLimiter(2 * (io_limiter.total_tokens + prefetch_limiter.total_tokens))
        self._checking: dict[tuple[bytes, int], _Pending] = {}

    # -- the trio thread, no I/O wait -------------------------------------------------------------------------

    def fast(self, ver: FileVersion, start: int, inner: int, size: int) -> memoryview | None:
        """Bytes [inner, inner+size) of the extent at `start` if they can be had with no wait (the page
        cache, or memory); else None (then `read`). The view is valid until the next call."""
        view = self.blocks.fast(ver, start, inner, size)
        if view is not None:
            self.stats.cache_hits += 1
        return view

    def where(self, ver: FileVersion, start: int) -> Where | None:
        """In flight, or readable with no check (known without I/O); None: ask `state` in a worker thread."""
        if self.fetcher.flight(ver, start) is not None:
            return Where.IN_FLIGHT
        return Where.CACHED if self.blocks.trusted(ver, start) else None

    def complete(self, ver: FileVersion) -> bool:
        """Every extent is in the version's own file and trusted: prefetch has nothing to do for it (a
        re-open, a hot load, is served by passthrough or the page cache)."""
        return self.blocks.complete(ver)

    # -- async: may wait for a worker thread or a GET ------------------------------------------------------

    async def read(self, ver: FileVersion, start: int, length: int, inner: int, size: int,
                   demand: bool = True) -> memoryview:
        """Bytes [inner, inner+size) of the extent [start, start+length): for a READ (`demand`: counted, a
        miss if it waited for a GET), or for the prefetcher's own parsing. A GET's extent, once stored, is
        read from the cache like any other (it is in the page cache then)."""
        fetched = 0
        while True:
            flight = self.fetcher.flight(ver, start)
            if flight is not None:
                fetched += 1
                data = await self.fetcher.wait(flight)
                if data is not None:  # the cache had no room: a copy in memory
                    return self._counted(demand, fetched, data[inner:inner + size])
            view = self.blocks.fast(ver, start, inner, size)
            if view is not None:
                return self._counted(demand, fetched, view)
            if self.blocks.trusted(ver, start):  # in a file, not in the page cache: read it in a worker
                got = await self._disk(demand, self.blocks.read, ver, start, inner, size)
                if got is not None:
                    return self._counted(demand, fetched, got)
                continue  # evicted meanwhile: look again
            if fetched > 3:  # stored and lost again each time: a cache with no room left for anything
                raise ModelfsError(f"{ver.info.key} at {start}: evicted again as soon as it was stored")
            where = await self._check(ver, start, length, demand)
            if where is Where.MISSING and self.fetcher.flight(ver, start) is None:
                fetched += 1
                data = await self.fetcher.fetch(ver, start, length)
                if data is not None:
                    return self._counted(demand, fetched, data[inner:inner + size])

    def _counted(self, demand: bool, fetched: int, view: memoryview) -> memoryview:
        if demand:
            if fetched:
                self.stats.cache_misses += 1
            else:
                self.stats.cache_hits += 1
        return view

    async def copy(self, ver: FileVersion, offset: int, size: int, demand: bool = True) -> bytearray:
        """Bytes [offset, offset+size) of a version in a new buffer: READs that cross an extent edge, and
        (not `demand`) the headers and indexes the prefetcher parses."""
        end = min(offset + size, ver.info.size)
        out = bytearray(max(0, end - offset))
        pos = offset
        while pos < end:
            start, length = ver.extent_at(pos)
            n = min(end, start + length) - pos
            view = await self.read(ver, start, length, pos - start, n, demand)
            out[pos - offset:pos - offset + n] = view  # copied before the next await
            pos += n
        return out

    async def fetch_run(self, ver: FileVersion, run: list[tuple[int, int]]) -> int:
        """Fetch adjacent uncached extents in as few GETs as the buffers allow; returns bytes fetched."""
        return await self.fetcher.prefetch_run(ver, run)

    async def whole(self, ver: FileVersion, start: int, length: int) -> memoryview | None:
        """The whole extent in a buffer of its own (a page-cache push, from a worker thread: the view stays
        valid as long as it lives); None if the cache does not hold it."""
        ext = ver.known.get(start)
        held = self.blocks.maps.whole(ext[0]) if ext is not None else None
        return held if held is not None else await self._disk(False, self.blocks.read, ver, start, 0, length)

    async def _check(self, ver: FileVersion, start: int, length: int, demand: bool) -> Where:
        """`Blocks.check` in a worker thread, single-flight: READs that arrive together (the kernel's
        readahead sends several) and the prefetcher share one check of an extent."""
        key = (ver.vid, start)
        pending = self._checking.get(key)
        if pending is not None:
            await pending.done.wait()
            return pending.where
        pending = self._checking[key] = _Pending()
        try:
            pending.where = await self._disk(demand, self.blocks.check, ver, start, length, ver.copy_shared)
        finally:
            del self._checking[key]
            pending.done.set()
        return pending.where

    async def _disk(self, demand: bool, fn: Callable[..., _T], *args: object) -> _T:
        """Run blocking cache-disk work in a worker thread: for a READ under its own limiter and within
        fetch.deadline (a disk that stops answering fails that READ with EIO, its thread abandoned); for the
        prefetcher under the prefetcher's."""
        if not demand:
            async with self.prefetch_limiter:
                return await trio.to_thread.run_sync(fn, *args, limiter=self._threads)
        try:
            with trio.fail_after(self.deadline):
                async with self.io_limiter:
                    return await trio.to_thread.run_sync(fn, *args, limiter=self._threads, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise ModelfsError(f"the cache did not answer within fetch.deadline ({self.deadline:g} s)") from None

    # -- worker threads --------------------------------------------------------------------------------

    def learn(self, ver: FileVersion) -> None:
        """Every extent of `ver` the index knows, in one scan (before prefetching a whole file: then the
        prefetcher knows each extent's hash without a lookup per extent)."""
        self.blocks.learn(ver)

    def state(self, ver: FileVersion, start: int, length: int) -> tuple[bytes | None, Where]:
        """The extent's hash if known, and where its bytes are (`Blocks.state`). Worker thread."""
        return self.blocks.state(ver, start, length)

    def holds(self, ver: FileVersion, start: int, length: int, check: bool) -> bool:
        """Whether the cache holds the extent's bytes anywhere (no GET needed). With `check` (a file read
        through the daemon) bytes not yet checked are checked now, ahead of its reader; with
        `ver.copy_shared`, or on a filesystem that shares extents, bytes of another version's file are copied
        into this one's. Worker thread."""
        copy = ver.copy_shared or self.blocks.cache.reflinks
        if self.blocks.trusted(ver, start) and not (copy and start in ver.elsewhere):
            return True
        if check or copy:
            return self.blocks.check(ver, start, length, copy) is not Where.MISSING
        return self.blocks.state(ver, start, length)[1] is not Where.MISSING

    def note_load(self, ver: FileVersion) -> int:
        """One more load of the version began; how many there have been (the index keeps count). Worker
        thread."""
        cache = self.blocks.cache
        return self.blocks.index.note_load(ver.vid, cache.identity, cache.domain, ver.info)


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
