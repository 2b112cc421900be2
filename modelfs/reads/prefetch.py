"""The prefetcher: decides what to fetch before the loader asks.

Three triggers, all feeding one FIFO of per-file jobs (`jobs.Job`) served by a fixed pool of worker tasks:
- whole file: the first READ of an open checkpoint file (`prefetch.patterns`) schedules every extent
  in file order, which is the order `load_file` reads a safetensors file (the header, then tensors by
  data offset);
- checkpoint sets (`shards`): the first READ of the index of a sharded checkpoint, or of one shard,
  schedules the other shards into the cache, within the free space of the cache filesystem;
- sequential streams (`readahead.StreamTracker`) for any other file read sequentially.

The first READ, not the open: a file the kernel page cache holds whole is opened and read without a
READ reaching the daemon, and must cost no GET. (Prefetching on open refetched every evicted block of
such a file; under a cache quota smaller than the working set that was many times the bytes served.)
In a cold load the first READ follows the open at once, so nothing is lost there. One exception, for
passthrough (`fill_for_open`): the open of a checkpoint file this mount never answered a READ of (so the
kernel holds none of its pages) starts the prefetch itself and waits for the file's last byte, so that the
open is answered with the cache file as backing file and no byte of the load goes through a READ.

Adjacent extents to fetch go in one ranged GET of up to `fetch.max_request` bytes (fewer requests: the
client's cost per GET is as large as that of megabytes of body). Extents whose bytes the cache already
holds are not fetched: in a file being read through the daemon, bytes written before this daemon started
are checked ahead of the loader (read back and hashed), so its READs find them trusted in the page cache;
bytes another version's file holds (dedup) are cloned into this version's file where the filesystem shares
extents, or copied once the version has been loaded `cache.copy_shared_after` times (else read from there).
With page-cache push on (`prefetch.page_cache_push`, off by default: it cost more than it saved when
measured), extents of a file that is open are also handed to the kernel page cache (`push.Pusher`, through
`push.PushGate` over FUSE's notify_store, given by the mount; the core knows nothing of FUSE).

Workers take GET buffers at prefetch priority (`buffers.BufferPool`): never those reserved for demand GETs,
and while a demand GET waits or runs, a worker pauses before its GET until prefetch holds fewer than
`fetch.prefetch_during_demand` buffers, so the loader's own GET shares the link with few others.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from modelfs.cache import FileCache
from modelfs.catalog.version import Extent, FileVersion
from modelfs.config import PrefetchConfig
from modelfs.errors import ModelfsError
from modelfs.faults import NONE as NO_FAULTS
from modelfs.faults import Faults
from modelfs.reads import shards
from modelfs.reads.extents import Extents, Where
from modelfs.reads.jobs import Job
from modelfs.reads.push import Pusher, PushFn, PushGate
from modelfs.reads.readahead import ReadaheadPolicy, StreamTracker
from modelfs.shared import SharedTier
from modelfs.stats import Stats
from modelfs.supervise import Supervisor
from modelfs.tree.namespace import Namespace, Node

log = logging.getLogger(__name__)

#: Seconds between a file's last close and its next open below which the open is part of the same load
#: (`load_file` opens a shard more than once; a loader reading it again later is a new load).
LOAD_GAP = 2.0


class OpenFiles(Protocol):
    """What the prefetcher needs of the open-file table (`openfiles`): a node's version, and whether it is
    open (pushes and checks ahead are for open files only)."""

    def version(self, node: Node) -> FileVersion: ...

    def is_open(self, inode: int) -> bool: ...

    def handles_of(self, inode: int) -> int: ...


class Prefetcher:
    """Schedules prefetch jobs and runs them on `workers` tasks in the daemon's nursery."""

    def __init__(self, cfg: PrefetchConfig, extents: Extents, files: OpenFiles, cache: FileCache,
                 ns: Namespace, stats: Stats, io_limiter: trio.CapacityLimiter, workers: int,
                 max_request: int = 64 << 20, push: PushFn | None = None,
                 shared: SharedTier | None = None, faults: Faults = NO_FAULTS, *,
                 supervisor: Supervisor, copy_shared_after: int = 0) -> None:
        self.cfg = cfg
        self.faults = faults
        self.extents = extents
        self.cache = cache
        self.ns = ns
        self.stats = stats
        self.version_of = files.version
        self.is_open = files.is_open
        self.handles_of = files.handles_of
        self.io_limiter = io_limiter
        self.workers = workers
        self.max_request = max_request
        self.copy_shared_after = copy_shared_after  # loads of a version after which shared extents are copied in
        # page-cache push, behind its gate: None when off
        self.pusher = Pusher(PushGate(push, stats, int(cfg.push_min_available)), extents.whole, files.is_open) \
            if push is not None and cfg.page_cache_push else None
        self.shared = shared  # with a shared tier, nodes start prefetching a file at different points
        # Tolerance above the kernel's own readahead in flight (2 x read_ahead_kb=4096) so its
        # reordering never splits a stream.
        self.policy = ReadaheadPolicy(initial_window=int(cfg.initial_window), max_window=int(cfg.max_window),
                                      tolerance=8 << 20)
        self._jobs: dict[int, Job] = {}  # inode -> active job
        self._queue: deque[Job] = deque()
        self._wakeup = trio.Event()
        self._trackers: dict[int, StreamTracker] = {}
        # Workers and scheduling steps run supervised: a failure stops one job, never the mount.
        self._supervisor = supervisor
        self._started = False
        self._scheduling = 0
        self._armed: set[int] = set()  # inodes opened whose first READ has not come: prefetch starts there
        # inodes this mount has answered a READ of: the kernel may hold their pages (`fill_for_open`)
        self._read: set[int] = set()
        # vid -> time.monotonic() its last handle closed: an open soon after is the same load (`LOAD_GAP`)
        self._closed_at: dict[bytes, float] = {}
        self._new_load: set[bytes] = set()  # versions whose open began a load not counted yet
        #: Checkpoint dirs already reported as not fitting in the cache: said once, not on every open.
        self._told_no_room: set[str] = set()

    def start(self) -> None:
        """Start the workers (in the supervisor's nursery, which must be running)."""
        self._started = True
        for i in range(self.workers):
            self._supervisor.spawn(self._worker, name=f"prefetch worker {i}", restart=True)

    @property
    def queued(self) -> int:
        """Extents waiting for a worker (the prefetch queue depth)."""
        return sum(len(j.pending) for j in self._queue)

    # -- triggers (called by the core; never block) --------------------------------------------------------

    def is_checkpoint(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.cfg.patterns)

    def opened(self, node: Node) -> None:
        """A file was opened: whole-file and checkpoint-set prefetch start at its first READ. An open with no
        other handle of the file open, and none closed in the last LOAD_GAP seconds, begins a new load of it
        (`cache.copy_shared_after` counts loads, not opens: `load_file` opens a shard more than once)."""
        if self._started and (self._whole(node) or self._set(node)):
            self._armed.add(node.inode)
        if self.copy_shared_after and self.handles_of(node.inode) == 1:
            vid = self.version_of(node).vid
            closed = self._closed_at.get(vid)
            if closed is None or time.monotonic() - closed > LOAD_GAP:
                self._new_load.add(vid)

    def _whole(self, node: Node) -> bool:
        return self.cfg.whole_file and self.is_checkpoint(node.name)

    def _set(self, node: Node) -> bool:
        return self.cfg.checkpoint_sets and shards.in_a_set(node.name)

    def _first_read(self, node: Node) -> None:
        """The kernel asked for bytes of an opened file: whole-file and checkpoint-set prefetch as configured."""
        self._armed.discard(node.inode)
        if self._whole(node):
            self._spawn(self._schedule_whole, node, True)
        if self._set(node):
            self._spawn(self._schedule_set, node)

    async def fill_for_open(self, node: Node, bound: float) -> bool:
        """An open of a checkpoint file not complete in the cache: start its whole-file (and set) prefetch now
        rather than at its first READ, and wait up to `bound` seconds for the file's last byte, so that the
        open can be answered by passthrough. A loader then reads the file at local-disk speed while the next
        shards arrive, and no byte of it costs the daemon a READ (a copy and a reply each), where READs of a
        file still arriving would each wait for their bytes anyway. True if the file was filled.

        Never with page-cache push on (`prefetch.page_cache_push`: its pushes are for opens served through the
        daemon, and would go into a page cache a passthrough open never reads).
        No wait where it cannot end in a complete file: whole-file prefetch off or not a checkpoint file,
        extents read from another version's file (not copied in), or an inode this mount has answered READs
        of (the kernel may hold its pages, though its cache file was evicted: a READ-less reopen must cost
        no GET)."""
        if not self.fills_at_open(node) or node.inode not in self._armed or node.inode in self._read:
            return False
        self._armed.discard(node.inode)  # the load starts here, not at the first READ
        try:
            job = await self._schedule_whole(node, True, check=True)
        except (ModelfsError, OSError) as e:
            log.debug("%s: not filled before its open (%s)", node.key, e)
            return False
        finally:
            if self._set(node):  # the other shards checked ahead too: their opens come next
                self._spawn(self._schedule_set, node, True)
        ver = job.ver
        if ver.elsewhere and not (ver.copy_shared or self.cache.reflinks):
            return False
        if not job.done.is_set():
            self.stats.add(open_waits=1)
            with trio.move_on_after(bound):
                await job.done.wait()
            if not job.done.is_set():
                self.stats.add(open_wait_expired=1)
                return False
        return job.error is None

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run a scheduling step, supervised (it may read an index or list a directory)."""
        self._scheduling += 1

        async def step() -> None:
            try:
                await fn(*args)
            finally:
                self._scheduling -= 1

        self._supervisor.spawn(step, name=f"prefetch scheduling ({getattr(fn, '__name__', fn)})")

    @property
    def idle(self) -> bool:
        """Nothing scheduled, queued or running."""
        return not self._jobs and not self._scheduling

    def on_read(self, node: Node, ver: FileVersion, offset: int, size: int, start: int, length: int) -> None:
        """A demand read within the file, whose first byte is in the extent (start, length): feeds the
        stream detector; also tells us what the kernel lost."""
        if node.inode in self._armed:
            self._first_read(node)
        self._read.add(node.inode)
        if self.pusher is not None:
            self.pusher.served(node.inode, offset, size, start, length)
        job = self._jobs.get(node.inode)
        if not self.cfg.sequential or (job is not None and job.reading):
            return  # already being prefetched into the page cache
        tracker = self._trackers.get(node.inode)
        if tracker is None:
            tracker = self._trackers[node.inode] = StreamTracker(ver.info.size, self.policy)
        rng = tracker.on_read(offset, size)
        if rng is not None:
            self._submit(node, ver, [start for start, _ in ver.starts_in(rng[0], rng[1])], reading=True, check=False)

    def forget(self, inode: int) -> None:
        """The namespace dropped `inode`: nothing of it is kept here either (a job still running ends)."""
        self._armed.discard(inode)
        self._read.discard(inode)
        self._trackers.pop(inode, None)
        if self.pusher is not None:
            self.pusher.forget(inode)

    def released(self, node: Node) -> None:
        """The last handle of `node` closed: keep filling the cache, stop checking ahead and pushing."""
        self._armed.discard(node.inode)
        now = time.monotonic()
        if len(self._closed_at) > 4096:  # only recent closes matter
            self._closed_at = {v: t for v, t in self._closed_at.items() if now - t <= LOAD_GAP}
        self._closed_at[self.version_of(node).vid] = now
        job = self._jobs.get(node.inode)
        if job is not None:
            job.reading = False
        self._trackers.pop(node.inode, None)
        if self.pusher is not None:
            self.pusher.closed(node.inode)

    async def warm(self, node: Node) -> Job:
        """Fetch the whole file into the cache (for `modelfs prefetch`); returns the finished job."""
        job = await self._schedule_whole(node, False)
        await job.done.wait()
        if job.error is not None:
            raise job.error
        return job

    # -- scheduling ----------------------------------------------------------------------------------

    def _submit(self, node: Node, ver: FileVersion, starts: list[int], reading: bool, check: bool) -> Job:
        job = self._jobs.get(node.inode)
        if job is None or job.ver is not ver:
            job = self._jobs[node.inode] = Job(node, ver, reading, check)
            self._queue.append(job)
        elif (reading and not job.reading) or (check and not job.check):
            # the file was opened, or will be by passthrough: what was only fetched is checked (and pushed) now
            job.reading, job.check = job.reading or reading, job.check or check
            redo, job.completed = job.completed, []
            job.queued.difference_update(redo)
            job.add(redo)
        job.add(starts)
        if job.finished:
            self._finish(job)
        self._wakeup.set()
        return job

    async def _schedule_whole(self, node: Node, reading: bool, check: bool = False) -> Job:
        """Every extent in file order: the order `load_file` reads a safetensors file (the header, then
        tensors by data offset) and `torch.load` a zip, and what a sequential reader needs next."""
        ver = self.version_of(node)
        if not (reading and self._pushing()) and self.extents.complete(ver):
            done = Job(node, ver, reading)  # every extent in its file and checked: nothing to fetch or check
            done.done.set()
            return done
        await trio.to_thread.run_sync(self.extents.learn, ver, limiter=self.io_limiter)
        if reading and ver.vid in self._new_load and not ver.copy_shared:
            # Loaded often: what other versions' files hold is worth a copy in its own (then passthrough).
            self._new_load.discard(ver.vid)
            loads = await trio.to_thread.run_sync(self.extents.note_load, ver, limiter=self.io_limiter)
            ver.copy_shared = loads >= self.copy_shared_after
        starts = [s for s, _ in ver.extents()]
        if self.shared is not None:  # cooperative fetch: each node of a fleet starts somewhere else
            k = self.shared.rotation(ver.vid.hex(), len(starts))
            starts = starts[k:] + starts[:k]
        return self._submit(node, ver, starts, reading, check)

    def _pushing(self) -> bool:
        return self.pusher is not None and self.pusher.on

    def fills_at_open(self, node: Node) -> bool:
        """Whether `fill_for_open` takes charge of the file at its open (its whole-file job fetches and
        checks it, and a shard's job schedules its set, checked too)."""
        return self._started and self.pusher is None and self._whole(node)

    async def _schedule_set(self, node: Node, check: bool = False) -> None:
        """Schedule the other shards of node's checkpoint into the cache, as space allows; with `check`, bytes
        of theirs not checked by this daemon are checked too (their opens will be answered by passthrough)."""
        try:
            parent = self.ns.get(node.parent)
            siblings = await self.ns.children(parent)
            names: list[str] = []
            if shards.is_index(node.name):
                ver = self.version_of(node)
                if ver.info.size > shards.MAX_INDEX:
                    return
                names = shards.named_by_index(bytes(await self.extents.copy(ver, 0, ver.info.size, demand=False)))
            else:
                names = shards.others_of(node.name, siblings)
        except (ModelfsError, OSError, ValueError, AttributeError) as e:
            log.debug("%s: no checkpoint set to prefetch (%s)", node.key, e)
            return
        budget = await trio.to_thread.run_sync(self.cache.headroom, self._protect_since())
        if self.shared is not None and names:
            k = self.shared.rotation(parent.key, len(names))
            names = names[k:] + names[:k]
        for name in names:
            shard = siblings.get(name)
            if shard is None or shard.is_dir or shard.inode in self._jobs or self.extents.complete(
                    self.version_of(shard)):
                continue
            assert shard.info is not None
            if shard.info.size > budget:
                if parent.key not in self._told_no_room and len(self._told_no_room) < 10_000:
                    self._told_no_room.add(parent.key)
                    log.info("not prefetching all shards of /%s: the cache has room for %d more bytes (said once)",
                             parent.key, budget)
                continue
            budget -= shard.info.size
            await self._schedule_whole(shard, False, check)

    def _protect_since(self) -> float:
        """Blocks used since the oldest active job began belong to the load being served: prefetch must
        not evict them (a checkpoint larger than the cache would otherwise evict its own head)."""
        return min((j.started for j in self._jobs.values()), default=time.monotonic())

    def _finish(self, job: Job) -> None:
        if job.check and job.damaged:  # found at the check before the kernel gets the file; said once
            self.stats.file_damaged(job.node.key, job.damaged)
            job.damaged = 0
        if self._jobs.get(job.node.inode) is job:
            del self._jobs[job.node.inode]
        if job in self._queue:
            self._queue.remove(job)
        job.done.set()

    # -- workers -------------------------------------------------------------------------------------

    async def _next(self) -> tuple[Job, int]:
        while True:
            for job in self._queue:
                if job.pending:
                    job.outstanding += 1
                    return job, job.pending.popleft()
            if self._wakeup.is_set():  # a fresh event only once the last one fired: all idle workers share it
                self._wakeup = trio.Event()
            await self._wakeup.wait()

    async def _worker(self) -> None:
        while True:
            job, start = await self._next()
            starts = [start, *job.take_adjacent(start, self.max_request)]
            try:
                if job.error is None:
                    self.faults.check("prefetch", job.node.key)
                    await self._many(job, starts)
            except (ModelfsError, OSError) as e:
                self._stop(job, e)
            except Exception as e:  # a bug: this job stops, the worker and the mount carry on
                self._supervisor.failed(f"the prefetch of {job.node.key}", e)
                self._stop(job, ModelfsError(f"prefetch of {job.node.key} failed: internal error"))
            finally:
                job.outstanding -= len(starts)
                job.completed.extend(starts)
                if job.finished:
                    self._finish(job)

    @staticmethod
    def _stop(job: Job, e: BaseException) -> None:
        if job.error is None:
            job.error = e
            job.pending.clear()
            log.debug("prefetch of %s stopped: %s", job.node.key, e)

    async def _many(self, job: Job, starts: list[int]) -> None:
        """Adjacent extents: those the cache holds are skipped (checked first, in a file being read), each run
        of the others is one ranged GET; then each is pushed if push is on."""
        ver = job.ver
        check = job.check or (job.reading and self.is_open(job.node.inode))
        copy = ver.elsewhere and (ver.copy_shared or self.cache.reflinks)
        if not copy and all(self.extents.where(ver, s) is Where.CACHED for s in starts):
            runs: list[list[Extent]] = []  # all readable already: no thread hop
        else:
            runs = await trio.to_thread.run_sync(self._uncached_runs, job, starts, check, limiter=self.io_limiter)
        for run in runs:
            need = sum(length for _, length in run)
            await self._make_room(need)
            got = await self.extents.fetch_run(ver, run)
            job.fetched += got
            self.stats.add(prefetch_bytes=got)
        if job.reading and self.pusher is not None:
            for start in starts:
                await self.pusher.push(job.node.inode, ver, start)

    async def _make_room(self, nbytes: int) -> None:
        """Room for `nbytes` of prefetch, evicting only blocks older than the load being served."""
        if not self.cache.fits(nbytes) and not await trio.to_thread.run_sync(
                self.cache.make_room, nbytes, self._protect_since(), limiter=self.io_limiter):
            raise ModelfsError("the cache is full of blocks of this load: prefetch paused")

    def _uncached_runs(self, job: Job, starts: list[int], check: bool) -> list[list[Extent]]:
        """From a worker thread: the extents among `starts` the cache holds nowhere, grouped into adjacent runs.
        With `check`, bytes held but not checked by this daemon are checked now (and copied in when wanted);
        those of its own file that fail are counted in `job.damaged`."""
        ver = job.ver
        runs: list[list[Extent]] = []
        end = -1
        for start in starts:
            _, length = ver.extent_at(start)
            present = check and self.cache.present(ver.vid, start)
            if self.extents.holds(ver, start, length, check):
                continue
            if present and not self.cache.present(ver.vid, start):
                job.damaged += 1
            if start == end:
                runs[-1].append((start, length))
            else:
                runs.append([(start, length)])
            end = start + length
        return runs
