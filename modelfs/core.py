"""The filesystem core, without FUSE: namespace -> chunk index -> file cache -> fetcher -> store.

`fs.Operations` is a thin boundary over this class; tests drive it directly, without a mount. A READ of
bytes the page cache holds is answered on the trio thread (a read of the cache file that cannot wait,
`extents`); every blocking step (store listing, LMDB, reading and checking cache files, GETs) runs in a
worker thread under a CapacityLimiter, so the trio thread that serves FUSE never waits on the disk or the
network.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from modelfs.cache import FileCache
from modelfs.cache.scrub import Scrub
from modelfs.catalog.index import ChunkIndex
from modelfs.catalog.version import FileVersion
from modelfs.config import Config
from modelfs.errors import ModelfsError, NotFound, ReadOnly
from modelfs.faults import NONE as NO_FAULTS
from modelfs.faults import Faults
from modelfs.fetch.buffers import BufferPool
from modelfs.fetch.fetcher import Buffer, Fetcher
from modelfs.health import Health
from modelfs.passthrough.kernel import Kernel
from modelfs.passthrough.opens import Passthrough
from modelfs.reads.extents import Blocks, Extents, Where
from modelfs.reads.prefetch import Prefetcher
from modelfs.reads.push import PushFn
from modelfs.remote import Store
from modelfs.remote.sources import Origin
from modelfs.shared import SharedTier
from modelfs.stats import ReadWaits, Stats
from modelfs.supervise import Supervisor
from modelfs.tree.listings import Listings
from modelfs.tree.namespace import Namespace, Node
from modelfs.tree.openfiles import OpenFiles

log = logging.getLogger(__name__)

#: Seconds without READs or GETs after which the daemon gives back its buffers and mappings.
IDLE_TRIM = 30.0
#: Seconds between looks for complete files to seal, on storage that verifies (`integrity`).
SEAL_EVERY = 1.0


def assemble(cfg: Config, store: Store, index: ChunkIndex, cache: FileCache, stats: Stats, *,
             push: PushFn | None = None, observe: Callable[[float], None] | None = None,
             kernel: Kernel | None = None, faults: Faults = NO_FAULTS) -> ModelFS:
    """The core and every part it serves with, built from the config: the one composition root of a mount
    (and of tests that drive the core without one). Given are what holds the daemon's resources, which its
    owner opens after checking them and closes (the store's connections, the index's LMDB, the cache's
    files); everything else is made here, once, and handed down. The fetch path's source is the origin, or
    the fleet tier (`shared.url`) wrapping it; every part gets the one supervisor. `observe` hears each
    GET's latency."""
    supervisor = Supervisor(stats)
    health = Health(store.check, f"store {store.describe()}", cfg.fetch.probe_interval, cfg.fetch.deadline,
                    offline_after=cfg.fetch.offline_after)
    origin = Origin(store, stats, health, observe)
    shared = SharedTier.open(cfg, store.domain, stats, cache.read_back, origin, supervisor) \
        if cfg.shared.url else None
    extent_size = int(cfg.cache.extent_size)
    # Cache-disk threads for demand reads, apart from the prefetcher's: prefetch never starves a READ.
    io_limiter = trio.CapacityLimiter(cfg.fetch.io_threads)
    prefetch_limiter = trio.CapacityLimiter(cfg.fetch.io_threads)
    listings = Listings(store, index, health, cfg.fetch.deadline, trio.CapacityLimiter(4), io_limiter)
    files = OpenFiles(store.identity, extent_size, listings.layout)
    ns = Namespace(listings.list_dir, cfg.mount.metadata_ttl, in_use=files.is_open)
    count = cfg.get_buffers
    buffers = BufferPool(count, extent_size, reserve=cfg.fetch.demand_reserve, cap=cfg.fetch.prefetch_during_demand)
    blocks = Blocks(index, cache, stats, int(cfg.cache.map_budget))
    fetcher = Fetcher(shared or origin, blocks, stats, buffers, cfg.fetch.deadline, health, faults,
                      supervisor=supervisor)
    extents = Extents(blocks, fetcher, stats, io_limiter, prefetch_limiter, cfg.fetch.deadline)
    prefetcher = Prefetcher(cfg.prefetch, extents, files, cache, ns, stats, prefetch_limiter,
                            workers=max(1, min(cfg.prefetch.concurrency, count)),
                            max_request=int(cfg.fetch.max_request), push=push, shared=shared, faults=faults,
                            supervisor=supervisor, copy_shared_after=cfg.cache.copy_shared_after)
    # FUSE passthrough: the kernel serves an open of a complete file from its cache file (`passthrough`);
    # with mount.passthrough = verified, only from storage that checks what the kernel reads.
    storage = cache.storage
    verified_only = cfg.mount.passthrough == "verified"
    log.info("cache storage: %s%s", storage.why, "; passthrough off (mount.passthrough = verified)"
             if verified_only and not storage.verifies and kernel is not None else "")
    passthrough = Passthrough(cache, stats, kernel) \
        if kernel is not None and (storage.verifies or not verified_only) else None
    return ModelFS(cfg, Parts(store, index, cache, stats, supervisor, health, io_limiter, listings, files, ns,
                              buffers, blocks, fetcher, extents, prefetcher, shared, passthrough))


@dataclass(frozen=True)
class Parts:
    """What the core serves with, as `assemble` built it (the core builds none of it)."""

    store: Store
    index: ChunkIndex
    cache: FileCache
    stats: Stats
    supervisor: Supervisor  # owns every background task of the mount (`serving`), the shared tier's too
    health: Health  # the origin's
    io_limiter: trio.CapacityLimiter  # cache-disk threads of demand reads
    listings: Listings
    files: OpenFiles
    ns: Namespace
    buffers: BufferPool
    blocks: Blocks
    fetcher: Fetcher
    extents: Extents
    prefetcher: Prefetcher
    shared: SharedTier | None
    passthrough: Passthrough | None


class ModelFS:
    """Read-only view of a store; serves while `serving()` is entered."""

    def __init__(self, cfg: Config, parts: Parts) -> None:
        self.cfg = cfg
        self.extent_size = int(cfg.cache.extent_size)
        self.deadline = cfg.fetch.deadline
        self.store, self.index, self.cache, self.stats = parts.store, parts.index, parts.cache, parts.stats
        self.supervisor, self.health, self.io_limiter = parts.supervisor, parts.health, parts.io_limiter
        self.listings, self.files, self.ns = parts.listings, parts.files, parts.ns
        self.buffers, self.blocks, self.fetcher = parts.buffers, parts.blocks, parts.fetcher
        self.extents = parts.extents
        self.prefetcher, self.shared, self.passthrough = parts.prefetcher, parts.shared, parts.passthrough
        self.read_wait = ReadWaits()  # how long demand READs waited (`read`; metrics, `modelfs stats`)
        self._ahead_dirs: set[int] = set()  # directories whose files were checked ahead (`_check_siblings`)

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[trio.Nursery]:
        """Serve for as long as the block: background work (fetch flights, prefetch workers, the shared
        tier's writers, the offline probe, the idle trim) runs in the supervisor's nursery, supervised, so
        no failure in it reaches the nursery (`supervise`). Cancel the nursery's scope to stop."""
        async with self.supervisor.running() as nursery:
            self._start()
            yield nursery

    def _start(self) -> None:
        if self.shared is not None:
            self.shared.start()
        self.prefetcher.start()
        self.supervisor.spawn(self.health.probe_loop, name="offline probe", restart=True)
        self.supervisor.spawn(self._trim_when_idle, name="idle trim", restart=True)
        if self.passthrough is not None:
            self.supervisor.spawn(self.passthrough.run_checks, name="passthrough checks", restart=True)
            if self.cfg.cache.check_at_start:
                self.supervisor.spawn(self.passthrough.check_at_start, int(self.cfg.cache.check_at_start),
                                      name="cache file checks at start")
        if self.cache.seals:
            self.supervisor.spawn(self._seal_files, name="cache file seals", restart=True)
        if self.cfg.cache.scrub_rate:
            scrub = Scrub(self.cache, self.index, self.store, self.stats, int(self.cfg.cache.scrub_rate),
                          self.cfg.cache.scrub_after, self._activity)
            self.supervisor.spawn(scrub.run, name="cache scrub", restart=True)

    def _activity(self) -> int:
        """A number that moves with every READ, GET and passthrough open (a passthrough load sends no READ)."""
        return self.stats.bytes_served + self.stats.bytes_fetched + self.stats.passthrough_opens

    async def _seal_files(self) -> None:
        """Seal complete, checked files (`FileCache.seal`), one at a time, so that the next daemon trusts them
        without reading them back: on storage that verifies what it reads, or with `cache.trust_restarts`."""
        limiter = trio.CapacityLimiter(1)
        while True:
            await trio.sleep(SEAL_EVERY)
            for vid in self.cache.unsealed():
                await trio.to_thread.run_sync(self.cache.seal, vid, limiter=limiter)

    async def _trim_when_idle(self) -> None:
        """An inference node's daemon sits idle between loads: after IDLE_TRIM seconds with no READ and no
        GET, give back the GET buffers' memory and the extents held in memory (those the cache had no room
        for: fetched again if read again)."""
        seen, trimmed = (-1, -1), False
        while True:
            await trio.sleep(IDLE_TRIM)
            now = (self.stats.bytes_served, self.buffers.taken)
            if now != seen:
                seen, trimmed = now, False
            elif not trimmed:
                freed = self.buffers.trim() + self.blocks.trim()
                trimmed = True
                log.debug("idle: gave back %d bytes of GET buffers and extents held in memory", freed)

    # -- metadata ---------------------------------------------------------------------------------

    def node(self, inode: int) -> Node:
        return self.ns.get(inode)

    async def lookup(self, parent: int, name: str) -> Node:
        """A name in a directory; the caller tells the kernel, which then holds one more reference to the
        inode (`remember`) until it sends `forget`."""
        node = self.ns.get(parent)
        if not node.is_dir:
            raise NotFound(f"{node.key} is not a directory")
        try:
            return await self.ns.lookup(node, name)
        finally:
            self._let_go()

    def remember(self, node: Node) -> None:
        """The kernel was handed `node` (a LOOKUP reply, or a readdirplus entry)."""
        self.ns.remember(node.inode)

    def forget(self, inode: int, nlookup: int) -> None:
        """The kernel let go of `nlookup` references to `inode` (FUSE FORGET)."""
        self.ns.forget(inode, nlookup)
        self._let_go()

    def _let_go(self) -> None:
        """The inodes the namespace dropped (gone from the store's listing, unknown to the kernel, closed),
        also by a listing the prefetcher asked for: so is everything keyed by them."""
        for inode in self.ns.dropped():
            self.files.forget(inode)
            self.prefetcher.forget(inode)

    async def opendir(self, inode: int) -> int:
        node = self.ns.get(inode)
        if not node.is_dir:
            raise NotADirectoryError(node.key)
        entries = await self.ns.children(node)
        self._let_go()
        return self.files.opendir(sorted(entries.values(), key=lambda n: n.name))

    def readdir(self, fh: int, start: int) -> list[Node]:
        """Entries of an open directory from index `start` on (a snapshot taken at opendir)."""
        return self.files.readdir(fh, start)

    def releasedir(self, fh: int) -> None:
        self.files.releasedir(fh)

    # -- data -------------------------------------------------------------------------------------

    def version(self, node: Node) -> FileVersion:
        return self.files.version(node)

    def open(self, inode: int, flags: int) -> int:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT):
            raise ReadOnly("read-only filesystem")
        node = self.ns.get(inode)
        if node.is_dir:
            raise IsADirectoryError(node.key)
        fh = self.files.open(node)
        self.prefetcher.opened(node)
        return fh

    async def backing_id(self, fh: int) -> int:
        """For an open just made: a backing id if the kernel is to serve it from its cache file (FUSE
        passthrough), else 0 (served through READs, in cached mode). Passthrough needs the file complete and
        checked, and no handle of the inode open in cached mode (the kernel refuses a mix); all passthrough
        opens of one inode share its version's backing id."""
        if self.passthrough is None:
            return 0
        node, ver = self.files.handles[fh]
        self.passthrough.opening(ver)
        if self._opens_wait() and not self.passthrough.in_cached_mode(node.inode):
            await self.prefetcher.fill_for_open(node, self.cfg.mount.passthrough_wait)
        backing_id = await self.passthrough.open_handle(fh, node.inode, ver)
        if backing_id:
            self._check_siblings(node)
        return backing_id

    def _check_siblings(self, node: Node) -> None:
        """The first passthrough open in a directory: the other files of the set (shards) will be opened
        next, so their cache files are checked now, in name order, ahead of the loader. Not the checkpoint
        files whose opens wait for their whole-file prefetch (`fill_for_open`): those jobs check them, a
        shard's set ahead of its other opens, several extents at once (faster than one thread), and a
        second check of the same bytes would only cost CPU."""
        if node.parent in self._ahead_dirs or self.passthrough is None:
            return
        self._ahead_dirs.add(node.parent)
        try:
            siblings = self.ns.get(node.parent).children
        except NotFound:
            return
        filled = self._opens_wait()
        self.passthrough.check_ahead([self.version(n) for name, n in sorted(siblings.items())
                                      if not n.is_dir and n is not node
                                      and not (filled and self.prefetcher.fills_at_open(n))])

    def _opens_wait(self) -> bool:
        """Whether a checkpoint file's first open waits for its file to be filled and checked
        (`mount.passthrough_wait`), to be answered by passthrough."""
        return self.cfg.mount.passthrough_wait > 0 and self.passthrough is not None and self.passthrough.available

    def release(self, fh: int) -> None:
        closed = self.files.release(fh)
        if closed is None:
            return
        if self.passthrough is not None:
            self.passthrough.release_handle(fh, closed.node.inode, closed.ver)
        if closed.last:
            self.prefetcher.released(closed.node)
            self.ns.collect(closed.node.inode)
            self._let_go()

    @property
    def busy(self) -> bool:
        """A GET in flight, or prefetch work scheduled, queued or running."""
        return bool(self.fetcher.in_flight) or not self.prefetcher.idle

    async def idle(self, poll: float = 0.01) -> None:
        """Return once nothing is fetched or prefetched (tests; anything that must see a load's end state).
        Polls: the parts that make work are many, and none of them waits on this."""
        while self.busy:
            await trio.sleep(poll)

    async def read(self, fh: int, offset: int, size: int) -> Buffer:
        """A READ: read from the cache file when the page cache holds the bytes (the common case, no await),
        else through `extents` (read or check them in a worker thread, or join or start their GET). How long
        it waited goes to `read_wait`: the common case counts as no wait, with no clock read."""
        node, ver = self.files.handles[fh]
        end = min(offset + size, ver.info.size)
        if offset >= end:
            return b""
        start, length = ver.extent_at(offset)
        self.prefetcher.on_read(node, ver, offset, size, start, length)
        self.stats.bytes_served += end - offset
        if end <= start + length:
            view = self.extents.fast(ver, start, offset - start, end - offset)
            if view is not None:
                self.read_wait.instant += 1
                return view
        began = time.monotonic()
        try:
            if end > start + length:  # across an extent edge: the pieces are copied into one buffer
                return await self.extents.copy(ver, offset, end - offset)
            return await self.extents.read(ver, start, length, offset - start, end - offset)
        finally:
            self.read_wait.observe(time.monotonic() - began)

    # -- cache warming (`modelfs prefetch`) ----------------------------------------------------------

    async def warm(self, inode: int) -> dict[str, int]:
        """Fetch a whole file into the cache, and into the shared tier if there is one (one
        `modelfs prefetch` warms a fleet); returns its size and the bytes that needed GETs."""
        node = self.ns.get(inode)
        if node.is_dir:
            raise IsADirectoryError(node.key)
        job = await self.prefetcher.warm(node)
        ver = self.version(node)
        if self.shared is not None:
            await self.shared.warm([(block, ver.known[block.start][0]) for block in ver.blocks(ver.extents())
                                    if block.start in ver.known])
        return {"size": ver.info.size, "fetched": job.fetched}

    async def cached_bytes(self, inode: int) -> int:
        """How many bytes of a file the cache holds, in its own file or another's (progress of a warm-up)."""
        _, states = await self._extent_states(inode)
        return sum(length for _, length, cached in states if cached)

    async def extent_map(self, inode: int) -> dict[str, object]:
        """For `modelfs du`: the file's extents as [hash hex or None if unknown, length, cached]."""
        ver, states = await self._extent_states(inode)
        return {"size": ver.info.size, "manifest": ver.layout is not None,
                "extents": [[digest.hex() if digest else None, length, cached] for digest, length, cached in states]}

    async def _extent_states(self, inode: int) -> tuple[FileVersion, list[tuple[bytes | None, int, bool]]]:
        """Every extent of a file: its hash if known, its length, and whether the cache holds it."""
        node = self.ns.get(inode)
        if node.is_dir:
            raise IsADirectoryError(node.key)
        ver = self.version(node)

        def collect() -> list[tuple[bytes | None, int, bool]]:
            out: list[tuple[bytes | None, int, bool]] = []
            for start, length in ver.extents():
                digest, where = self.extents.state(ver, start, length)
                out.append((digest, length, where in (Where.CACHED, Where.ELSEWHERE)))
            return out

        return ver, await trio.to_thread.run_sync(collect, limiter=self.io_limiter)

    async def health_report(self) -> dict[str, object]:
        """Checked now: the store answers (within 10 s, or the deadline if shorter), the cache takes a write."""
        problem = ""
        try:
            with trio.fail_after(min(10.0, self.deadline)):
                await trio.to_thread.run_sync(self.store.check, abandon_on_cancel=True)
            reachable = True
        except (ModelfsError, OSError, trio.TooSlowError) as e:
            reachable, problem = False, str(e) or "the store did not answer in time"
        writable = await trio.to_thread.run_sync(self.cache.writable, limiter=self.io_limiter)
        if not writable:
            problem = problem or f"cannot write to the cache at {self.cache.root}"
        return {"store_reachable": reachable, "cache_writable": writable, "offline": self.health.offline,
                "cache_storage": self.cache.storage.kind, "problem": problem}

    # -- counters ---------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        snap = self.stats.snapshot()
        snap["extents_in_memory"] = self.blocks.held
        snap["inodes"] = len(self.ns)
        snap["versions_held"] = len(self.files)
        snap["extents_verified"] = self.cache.reads_verified
        snap["bytes_in_cache"] = self.cache.bytes_stored
        snap["files_in_cache"] = self.cache.files
        snap["files_complete"] = self.cache.files_complete
        snap["files_trusted_sealed"] = self.cache.files_trusted_sealed
        snap["storage_verifies"] = int(self.cache.storage.verifies)
        snap["hedged_gets"] = self.store.hedged
        snap["unhedged_gets"] = self.store.unhedged
        snap["body_retries"] = self.store.body_retries
        snap["fetches_in_flight"] = self.fetcher.in_flight
        snap["get_buffer_bytes"] = self.buffers.made_bytes
        snap["memory_extent_bytes"] = self.blocks.maps.bytes
        snap["prefetch_queue"] = self.prefetcher.queued
        snap.update(self.read_wait.counters())
        return snap
