"""FUSE passthrough: a file whose every byte is in its cache file, and checked, is opened with a backing id
for that very file, and the kernel serves it itself. Reads, mmap page faults and read-ahead of that file go
straight to the cache file inside the kernel: no READ reaches the daemon, so a load runs at local-disk speed.

There is no copy to build: the cache file a cold load wrote (`cache.FileCache`) is the backing file. So the
open after the one that completed a file is already a passthrough open, in the same daemon; the first open
of a checkpoint file waits for its last byte (`mount.passthrough_wait`, `Prefetcher.fill_for_open`) and is
one too; and a daemon that starts on a cache where files are complete opens them by passthrough once it has
checked them.

Rules kept:
- The kernel is handed only a file this daemon trusts whole: every extent written by it from bytes it
  hashed, or read back and hashed before this open (`check`; single-flight; the other files of the same
  directory are checked ahead of the loader, one at a time, `check_ahead`, but for the checkpoint files
  whose opens wait for their whole-file prefetch: its jobs check them; and from the daemon's start, the
  files loaded most recently, before anything opens them, `check_at_start`). A damaged extent is dropped
  and fetched again; the open meanwhile is served through the daemon.
- A file is never evicted while a backing id of it is registered (`FileCache.hold`): the kernel may read
  any byte at any time. After that, a complete file is only ever deleted whole, never punched: a loader
  that mapped it keeps its mapping after the fd and the backing id are gone. Eviction or a new ETag never
  changes bytes under an open or mapped file.
- One backing id per version while any passthrough handle of it is open.
- An inode with a handle open in cached mode (served through READs) gets no passthrough open until that
  handle is released: the kernel refuses the mix. Each open's mode is decided under its inode's lock
  (`open_handle`), and the handles of each mode are counted here.
- A partial file is never handed to the kernel: it would read the holes as zeros, and no kernel
  mechanism makes such a read wait for the bytes. Until a file is complete its READs come to the daemon.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass

import trio

from modelfs.cache import FileCache
from modelfs.catalog.version import FileVersion
from modelfs.passthrough.kernel import Kernel
from modelfs.stats import Stats

log = logging.getLogger(__name__)


@dataclass
class _Open:
    backing_id: int
    handles: int


class Passthrough:
    """Backing ids of complete, checked cache files while opens use them. Blocking work runs in worker
    threads; the rest on trio's."""

    def __init__(self, cache: FileCache, stats: Stats, kernel: Kernel) -> None:
        self.cache = cache
        self.stats = stats
        self.kernel = kernel
        self._open: dict[bytes, _Open] = {}  # vid -> registration while passthrough handles are open
        self._checking: dict[bytes, trio.Event] = {}
        self._ahead: dict[bytes, FileVersion] = {}  # files to check before their open asks (`check_ahead`)
        self._ahead_wake = trio.Event()
        self._check_limiter = trio.CapacityLimiter(1)  # one check at a time: one sequential read of the disk
        self._refused = False
        self._mode_locks: dict[int, trio.Lock] = {}  # inode -> lock held while an open's mode is decided
        self._cached: dict[int, int] = {}  # inode -> handles open in cached mode
        self._handles: set[int] = set()  # file handles open by passthrough
        # Directories of the files opened, while the check at start may still run (it keeps to them); None once
        # it has ended: nothing more to record.
        self._opened_dirs: set[str] | None = set()

    @property
    def available(self) -> bool:
        """Whether opens may be answered with passthrough now."""
        return not self._refused and self.kernel.negotiated()

    # -- opens (trio thread) -------------------------------------------------------------------------

    def in_cached_mode(self, inode: int) -> bool:
        """Whether a handle of `inode` is open in cached mode (a new open cannot be passthrough then)."""
        return self._cached.get(inode, 0) > 0

    def opening(self, ver: FileVersion) -> None:
        """An open of `ver` began: the checks at start keep to its directory from now on (`check_at_start`)."""
        if self._opened_dirs is not None:
            self._opened_dirs.add(ver.info.key.rpartition("/")[0])

    async def open_handle(self, fh: int, inode: int, ver: FileVersion) -> int:
        """The mode of an open just made: a backing id (passthrough) unless a handle of the inode is open in
        cached mode or the file cannot be handed over (`open`), else 0 (cached mode). Decided under the
        inode's lock, so two opens racing cannot end in both modes."""
        lock = self._mode_locks.setdefault(inode, trio.Lock())
        async with lock:
            backing_id = 0 if self.in_cached_mode(inode) else await self.open(ver)
            if backing_id:
                self._handles.add(fh)
            else:
                self._cached[inode] = self._cached.get(inode, 0) + 1
        if not lock.statistics().tasks_waiting and self._mode_locks.get(inode) is lock and not lock.locked():
            del self._mode_locks[inode]
        return backing_id

    def release_handle(self, fh: int, inode: int, ver: FileVersion) -> None:
        """A handle `open_handle` decided was released."""
        if fh in self._handles:
            self._handles.discard(fh)
            self.release(ver)
        elif inode in self._cached:
            self._cached[inode] -= 1
            if not self._cached[inode]:
                del self._cached[inode]

    async def open(self, ver: FileVersion) -> int:
        """A backing id for a passthrough open of `ver`, or 0 (serve it through the daemon): the file is not
        complete in the cache, or a check found it damaged."""
        reg = self._open.get(ver.vid)
        if reg is None:
            if not self.available or not self.cache.complete(ver.vid):
                return 0
            if not self.cache.all_trusted(ver.vid) and not await self._check(ver):
                return 0
            try:
                backing_id = await trio.to_thread.run_sync(self._register, ver.vid)
            except OSError as e:
                self._refuse(e)
                return 0
            reg = self._open.get(ver.vid)  # registered meanwhile by another open: keep one id per version
            if reg is not None:
                self.kernel.unregister(backing_id)
                self.cache.hold(ver.vid, -1)
            else:
                reg = self._open[ver.vid] = _Open(backing_id, 0)
        reg.handles += 1
        self.stats.add(passthrough_opens=1)
        return reg.backing_id

    def release(self, ver: FileVersion) -> None:
        """A passthrough handle of `ver` was released; the last one gives the backing id back."""
        reg = self._open.get(ver.vid)
        if reg is None:
            return
        reg.handles -= 1
        if reg.handles:
            return
        del self._open[ver.vid]
        self.cache.hold(ver.vid, -1)
        try:
            self.kernel.unregister(reg.backing_id)
        except OSError as e:
            log.debug("backing id %d of %s: %s", reg.backing_id, ver.info.key, e)

    def _register(self, vid: bytes) -> int:
        """Register the cache file (worker thread), held first: from the moment the kernel has it nothing of it
        is punched. The hold is the registration's from then on (`release` gives it back)."""
        self.cache.hold(vid, 1)
        try:
            if not self.cache.all_trusted(vid):  # evicted or dropped since the check
                raise FileNotFoundError(errno.ENOENT, "no longer complete")
            fd = os.open(self.cache.path(vid), os.O_RDONLY | os.O_CLOEXEC)
            try:
                return self.kernel.register(fd)
            finally:
                os.close(fd)
        except BaseException:
            self.cache.hold(vid, -1)
            raise

    def _refuse(self, e: OSError) -> None:
        """The kernel would not take a backing file: no CAP_SYS_ADMIN, a stacked filesystem under the cache, a
        kernel without it. Latched off: every later open is served through the daemon. A file that stopped
        being complete meanwhile is not a refusal."""
        if isinstance(e, FileNotFoundError):
            return
        self.stats.add(passthrough_refused=1)
        self._refused = True
        log.warning("FUSE passthrough refused by the kernel (%s, cache files in %s): files are served through "
                    "the daemon from now on", errno.errorcode.get(e.errno or 0, e), self.cache.root)

    async def _check(self, ver: FileVersion) -> bool:
        """Read back and hash every extent of the file this daemon has not checked (single-flight: concurrent
        opens wait for one check). True if the file is complete and trusted after it."""
        while (busy := self._checking.get(ver.vid)) is not None:
            await busy.wait()
        if self.cache.all_trusted(ver.vid):
            return True
        done = self._checking[ver.vid] = trio.Event()
        try:
            good = await trio.to_thread.run_sync(self.check, ver, limiter=self._check_limiter)
        finally:
            del self._checking[ver.vid]
            done.set()
        return good

    def check(self, ver: FileVersion) -> bool:
        """Every unchecked extent of the file read back and hashed (worker thread); a damaged one is dropped
        and counted (`files_corrupt`: its bytes are fetched again)."""
        bad = 0
        self.cache.read_ahead(ver.vid)
        for start, length in self.cache.untrusted(ver.vid):
            bad += self.cache.check_once(ver.vid, start, length) is False  # another check's find is counted there
        if bad:
            self.stats.file_damaged(ver.info.key, bad)
        return self.cache.all_trusted(ver.vid)

    async def check_at_start(self, budget: int) -> None:
        """From the daemon's start: read back and check the complete cache files loaded most recently (up to
        `budget` bytes, in the order a loader opens them: `FileCache.to_check_at_start`), so that a loader that
        comes after opens them by passthrough with no wait. Once files are opened, only those of the opened
        files' directories are checked on (the opens' own checks go ahead, and share each extent's check:
        `FileCache.verify`); a checkpoint opened elsewhere gets the disk to itself. Nothing to do where files
        are trusted at start (sealed on storage that verifies, or `cache.trust_restarts`). One extent per
        worker-thread call: an open, or the end of the mount, is heeded within one extent."""
        try:
            await self._check_at_start(budget)
        finally:
            self._opened_dirs = None

    async def _check_at_start(self, budget: int) -> None:
        files = await trio.to_thread.run_sync(self.cache.to_check_at_start, budget, limiter=self._check_limiter)
        began, done, nbytes = time.monotonic(), 0, 0
        opened = self._opened_dirs if self._opened_dirs is not None else set()

        def wanted(key: str) -> bool:
            return not opened or key.rpartition("/")[0] in opened

        for vid, key in files:
            if not wanted(key):
                continue
            await trio.to_thread.run_sync(self.cache.read_ahead, vid, limiter=self._check_limiter)
            bad = 0
            for start, length in self.cache.untrusted(vid):
                if not wanted(key):
                    break
                found = await trio.to_thread.run_sync(self.cache.check_once, vid, start, length,
                                                      limiter=self._check_limiter)
                bad += found is False  # damage another check found is counted there
                nbytes += length
            if bad:
                self.stats.file_damaged(key, bad)
            if self.cache.all_trusted(vid):
                done += 1
                self.stats.add(files_checked_at_start=1)
        if files:
            log.info("checked %d of %d recently loaded cache files (%.1f MiB read back) from start in %.1f s", done,
                     len(files), nbytes / 2**20, time.monotonic() - began)

    def check_ahead(self, versions: list[FileVersion]) -> None:
        """A loader opened one file of a set by passthrough: check the files of the others now, in this order,
        so that their opens find them checked (the disk reads them once, ahead of the loader, and the kernel
        then serves them from the page cache)."""
        for ver in versions:
            if self.cache.complete(ver.vid) and not self.cache.all_trusted(ver.vid):
                self._ahead.setdefault(ver.vid, ver)
        if self._ahead:
            self._ahead_wake.set()

    async def run_checks(self) -> None:
        """Check the files `check_ahead` asked for, one at a time (an open waits for a check in progress)."""
        while True:
            if not self._ahead:
                self._ahead_wake = trio.Event()
                await self._ahead_wake.wait()
            vid = next(iter(self._ahead))
            ver = self._ahead.pop(vid)
            if self.available and not self.cache.all_trusted(vid):
                await self._check(ver)
