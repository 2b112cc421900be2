"""The scrub: every extent in the cache read back from the disk itself, at a bounded pace while the daemon is
idle, and healed in place where it fails.

Why: a daemon checks an extent once (when it writes it, or reads it back before first use); after that it and
the kernel (passthrough) serve the cache file as it is. Rot under a file after that check is served as wrong
bytes on storage that verifies nothing (ext4), or as EIO on storage that does (btrfs checksums: `integrity`),
until something rewrites the bytes. The scrub bounds how long: one pass over the cache takes its size over
`cache.scrub_rate`, and it starts once the daemon has had no READ and no GET for `cache.scrub_after`
seconds (a load in progress keeps the disk to itself). Each extent is read with O_DIRECT (the page cache would
answer with the bytes it holds), hashed and compared with its hash in the index.

Healing (an fs-verity file is read-only: it is deleted whole instead, and the next load fetches it anew): a
damaged extent's right bytes are fetched from the store (a ranged GET of the version, If-Match:
never another version's bytes) and checked against the hashes of every extent they cover, then written over
the damaged range in whole pages (`FileCache.heal_range`, `rewrite`): a partial page would be read from disk
first, and a rotten one fails. The file is never punched or replaced: a loader that has it mapped, or a
passthrough open, sees its bytes go from wrong or unreadable back to the version's, never to zeros, and the
next read of a block that gave EIO gets the right bytes. Counted: `scrub_bytes`, `scrub_damaged` (extents
found), `scrub_healed` (extents written anew).

Priority: each read runs in the idle I/O class (`idle_io`: ioprio_set on the worker thread, put back after),
so on a scheduler that honours classes (mq-deadline, BFQ) a loader's reads of the same disk go first even
when a READ arrives in the middle of a scrub step. Its CPU (a hash per extent, about 0.05-0.08 s per GiB) is
left at the daemon's.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

import trio

from modelfs.cache import FileCache
from modelfs.catalog.index import ChunkIndex
from modelfs.digest import content_hash
from modelfs.errors import ModelfsError
from modelfs.libc import LIBC
from modelfs.remote import ObjectInfo, Store
from modelfs.stats import Stats

log = logging.getLogger(__name__)

#: Seconds between looks at whether the daemon is idle enough to scrub, and between passes over an empty cache.
POLL = 1.0

#: ioprio_set / ioprio_get system call numbers by machine (the C library has no wrapper for them).
_IOPRIO_CALLS = {"x86_64": (251, 252), "aarch64": (30, 31), "riscv64": (30, 31), "ppc64le": (273, 274),
                 "s390x": (282, 283)}
IOPRIO_WHO_PROCESS = 1  # with 0: the calling thread
IOPRIO_CLASS_IDLE = 3
IOPRIO_CLASS_SHIFT = 13


_CALLS = _IOPRIO_CALLS.get(os.uname().machine)  # this machine's (set, get), or None


def io_priority() -> int:
    """The calling thread's I/O priority (class << 13 | level), or -1 where it cannot be read."""
    return -1 if _CALLS is None else int(LIBC.syscall(_CALLS[1], IOPRIO_WHO_PROCESS, 0))


@contextlib.contextmanager
def idle_io() -> Iterator[None]:
    """Run the body with the calling thread in the idle I/O class, then put its priority back (a worker
    thread runs other jobs later). Where the machine's calls are unknown or refused, the body runs as is."""
    before = io_priority()
    if _CALLS is None or before < 0 or LIBC.syscall(_CALLS[0], IOPRIO_WHO_PROCESS, 0,
                                                     IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT) != 0:
        yield
        return
    try:
        yield
    finally:
        LIBC.syscall(_CALLS[0], IOPRIO_WHO_PROCESS, 0, before)


class Scrub:
    """Reads back and heals the cache's extents; `run` is the supervised task."""

    def __init__(self, cache: FileCache, index: ChunkIndex, store: Store, stats: Stats, rate: int, after: float,
                 active: Callable[[], int]) -> None:
        self.cache = cache
        self.index = index
        self.store = store
        self.stats = stats
        self.rate = rate  # bytes per second read back, at most
        self.after = after  # seconds with no READ and no GET before a scrub step
        self.active = active  # a number that moves with every READ and GET (idle: it stays)
        self._limiter = trio.CapacityLimiter(1)  # one read at a time: a pace, not a burst
        self._seen = (-1, 0.0)  # (activity, when it last moved)

    async def run(self) -> None:
        """Pass after pass over the cache, least recently used files first."""
        while True:
            vids = self.cache.scrub_order()
            if not vids:
                await trio.sleep(POLL)
            for vid in vids:
                await self._file(vid)

    async def _idle(self) -> None:
        """Return once nothing has been read or fetched for `after` seconds."""
        while True:
            now, activity = trio.current_time(), self.active()
            if activity != self._seen[0]:
                self._seen = (activity, now)
            if now - self._seen[1] >= self.after:
                return
            await trio.sleep(max(POLL / 10, min(POLL, self.after - (now - self._seen[1]))))

    async def _file(self, vid: bytes) -> None:
        for start, length in self.cache.extents_of(vid):
            await self._idle()
            began = trio.current_time()
            ok = await trio.to_thread.run_sync(self._read, vid, start, length, limiter=self._limiter)
            if ok is None:
                continue
            self.stats.add(scrub_bytes=length)
            if not ok:
                self.stats.add(scrub_damaged=1)
                await self._heal(vid, start)
            await trio.sleep(max(0.0, length / self.rate - (trio.current_time() - began)))

    def _read(self, vid: bytes, start: int, length: int) -> bool | None:
        """`FileCache.scrub_read` in the idle I/O class (worker thread)."""
        with idle_io():
            return self.cache.scrub_read(vid, start, length)

    async def _heal(self, vid: bytes, start: int) -> None:
        """Fetch the right bytes of a damaged extent (and of the extents sharing its edge pages) and write
        them over it."""
        if self.cache.immutable(vid):  # fs-verity: read-only; deleted whole, and the next load fetches it anew
            await trio.to_thread.run_sync(self.cache.drop, vid, start, "damaged on disk (scrub)",
                                          limiter=self._limiter)
            return
        rec = await trio.to_thread.run_sync(self.index.version, vid)
        span = await trio.to_thread.run_sync(self.cache.heal_range, vid, [start])
        if rec is None or span is None:
            log.warning("cache file of version %s: damaged extent at %d could not be healed here; the next "
                        "daemon's check drops it", vid.hex(), start)
            return
        lo, hi, extents = span
        info = ObjectInfo(str(rec["key"]), int(str(rec["size"])), str(rec["etag"]), 0.0)
        data = memoryview(bytearray(hi - lo))  # rare: a buffer of its own, not one of the GET pool's
        try:
            await trio.to_thread.run_sync(self.store.read_into, info, lo, [data], abandon_on_cancel=True)
        except (ModelfsError, OSError) as e:
            log.warning("cache file of %s: damaged extent at %d not healed now (the store: %s)", info.key, start, e)
            return
        self.stats.add(gets=1, bytes_fetched=hi - lo)
        if any(content_hash(data[s - lo:s - lo + n]) != digest for s, n, digest in extents):
            log.warning("cache file of %s: the store's bytes at %d do not match the index: not healed", info.key,
                        start)
            return
        if await trio.to_thread.run_sync(self.cache.rewrite, vid, lo, data, [s for s, _, _ in extents],
                                         limiter=self._limiter):
            self.stats.add(scrub_healed=len(extents))
            log.warning("cache file of %s: extent at %d was damaged on disk; healed in place (%d bytes from the "
                        "store)", info.key, start, hi - lo)
