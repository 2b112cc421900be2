"""Backing files for FUSE passthrough: a whole-file copy of a fully cached version that the kernel serves
itself. After a passthrough open, reads, mmap page faults and read-ahead of that file go straight to the
copy inside the kernel: no READ reaches the daemon, so a warm load runs at local-disk speed.

Layout: `<cache>/backing/<version id hex>` holds the version's bytes, offset for offset (the kernel maps
offsets 1:1). It is built off the READ path, in a worker thread, when the daemon is quiet: every extent is
loaded from the block cache (`BlockCache.load` reads it into private memory and hashes it there, so only
verified bytes are copied), written to `<vid>.tmp.<pid>` and the temp file renamed.

Invariants, and what a crash at each step leaves:
- Under the final name there is only a complete copy: a crash while writing leaves a temp file, which the
  next daemon sweeps at start.
- A copy is never handed to the kernel before this daemon has checked it: every extent read back and
  hashed against the version's extent hashes (`verify`), since the disk under it may have changed since
  it was built, or since the last daemon. A copy that does not match is deleted (`backing_corrupt`) and
  built again from the blocks, which are themselves verified on load; the open is served through the
  daemon meanwhile.
- One backing id per version while any passthrough handle of it is open; the kernel keeps the copy's
  inode open for those handles, so eviction or a new ETag never changes bytes under an open file.
- Copies count against `cache.max_size` with the blocks and are evicted before any block
  (`BlockCache.add_spare`); one in use is never evicted. The cost is a second copy on disk of every file
  that has one: passthrough trades the dedup of those files for warm loads at local-disk speed.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import trio

from modelfs.cache import BlockCache, block_hash
from modelfs.index import ChunkIndex
from modelfs.stats import Stats
from modelfs.version import FileVersion

log = logging.getLogger(__name__)

#: Seconds with no READ and no GET before a copy is built (it must not take a cold load's disk or CPU).
QUIET = 1.0
#: Copies waiting to be built; more are dropped (asked again at their next close).
MAX_PENDING = 256


@dataclass
class _Open:
    backing_id: int
    path: str
    handles: int


class Kernel:
    """What the kernel offers: whether passthrough was negotiated, and registering a backing file (FUSE
    DEV_IOC_BACKING_OPEN / _CLOSE). The live one is pyfuse3's; tests may pass one that refuses."""

    def __init__(self, negotiated: Callable[[], bool], register: Callable[[int], int],
                 unregister: Callable[[int], None]) -> None:
        self.negotiated = negotiated
        self.register = register
        self.unregister = unregister


class BackingFiles:
    """Copies for passthrough: built when a version is fully cached, checked once per daemon, registered
    with the kernel while opens use them. Blocking methods run in worker threads; the rest on trio's."""

    def __init__(self, root: str, cache: BlockCache, index: ChunkIndex, stats: Stats, kernel: Kernel | None,
                 quiet: Callable[[], bool]) -> None:
        self.dir = os.path.join(root, "backing")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.cache = cache
        self.index = index
        self.stats = stats
        self.kernel = kernel
        self._quiet = quiet
        self._open: dict[bytes, _Open] = {}  # vid -> registration while passthrough handles are open
        self._checked: set[bytes] = set()  # vids whose copy this daemon verified
        self._checking: dict[bytes, trio.Event] = {}
        self._pending: dict[bytes, FileVersion] = {}
        self._wake = trio.Event()
        self._ahead: dict[bytes, FileVersion] = {}  # copies to check before their open asks (`check_ahead`)
        self._ahead_wake = trio.Event()
        self._check_limiter = trio.CapacityLimiter(1)  # one check at a time: one sequential read of the disk
        self._refused = False
        self._limiter = trio.CapacityLimiter(1)
        self._scan()

    def path(self, vid: bytes) -> str:
        return os.path.join(self.dir, vid.hex())

    def _scan(self) -> None:
        """Sweep temp files of an interrupted build; count the copies on disk against the quota."""
        for name in os.listdir(self.dir):
            p = os.path.join(self.dir, name)
            try:
                if ".tmp." in name:
                    os.unlink(p)
                    continue
                self.cache.add_spare(p, os.stat(p).st_size, reserved=False)
            except OSError:
                continue

    @property
    def pending(self) -> int:
        """Copies queued or being built."""
        return len(self._pending)

    @property
    def available(self) -> bool:
        """Whether opens may be answered with passthrough now."""
        return self.kernel is not None and not self._refused and self.kernel.negotiated()

    # -- opens (trio thread) -------------------------------------------------------------------------

    async def open(self, ver: FileVersion) -> int:
        """A backing id for a passthrough open of `ver`, or 0 (serve it through the daemon). A version with
        no copy yet is queued to get one."""
        reg = self._open.get(ver.vid)
        if reg is not None:
            reg.handles += 1
            self.stats.add(passthrough_opens=1)
            return reg.backing_id
        if not self.available:
            return 0
        path = self.path(ver.vid)
        if not self.cache.has_spare(path):
            self.want(ver)
            return 0
        if ver.vid not in self._checked and not await self._check(ver, path):
            return 0
        reg = self._open.get(ver.vid)  # another open registered it while this one waited on the check
        if reg is None:
            try:
                backing_id = await trio.to_thread.run_sync(self._register, path)
            except OSError as e:
                self._refuse(e, path)
                return 0
            if ver.vid in self._open:  # registered meanwhile by another open: keep one id per version
                assert self.kernel is not None
                self.kernel.unregister(backing_id)
            else:
                self._open[ver.vid] = _Open(backing_id, path, 0)
                self.cache.hold_spare(path, 1)
            reg = self._open[ver.vid]
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
        self.cache.hold_spare(reg.path, -1)
        assert self.kernel is not None
        try:
            self.kernel.unregister(reg.backing_id)
        except OSError as e:
            log.debug("backing id %d of %s: %s", reg.backing_id, reg.path, e)

    def _register(self, path: str) -> int:
        assert self.kernel is not None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return self.kernel.register(fd)
        finally:
            os.close(fd)

    def _refuse(self, e: OSError, path: str) -> None:
        """The kernel would not take a backing file: no CAP_SYS_ADMIN, a stacked filesystem under the cache,
        a kernel without it. Latched off: every later open is served through the daemon."""
        self.stats.add(passthrough_refused=1)
        self._refused = True
        log.warning("FUSE passthrough refused by the kernel (%s, backing file on %s): files are served "
                    "through the daemon from now on", errno.errorcode.get(e.errno or 0, e), os.path.dirname(path))

    async def _check(self, ver: FileVersion, path: str) -> bool:
        """Verify a copy once per daemon (single-flight: concurrent opens wait for one check)."""
        while (busy := self._checking.get(ver.vid)) is not None:
            await busy.wait()
        if ver.vid in self._checked:
            return True
        if not self.cache.has_spare(path):
            return False
        done = self._checking[ver.vid] = trio.Event()
        try:
            good = await trio.to_thread.run_sync(self.verify, ver, path, limiter=self._check_limiter)
        finally:
            del self._checking[ver.vid]
            done.set()
        if good:
            self._checked.add(ver.vid)
        else:
            self.want(ver)  # built again from the blocks, which are verified as they load
        return good

    def check_ahead(self, versions: list[FileVersion]) -> None:
        """A loader opened one file of a set through its copy: check the copies of the others now, in this
        order, so that their opens find them checked (the disk reads them once, ahead of the loader, and
        the kernel then serves them from the page cache)."""
        for ver in versions:
            if ver.vid not in self._checked and self.cache.has_spare(self.path(ver.vid)):
                self._ahead.setdefault(ver.vid, ver)
        if self._ahead:
            self._ahead_wake.set()

    async def run_checks(self) -> None:
        """Check the copies `check_ahead` asked for, one at a time (an open waits for a check in progress)."""
        while True:
            if not self._ahead:
                self._ahead_wake = trio.Event()
                await self._ahead_wake.wait()
            vid = next(iter(self._ahead))
            ver = self._ahead.pop(vid)
            if self.available and vid not in self._checked:
                await self._check(ver, self.path(vid))

    # -- building (background) -----------------------------------------------------------------------

    def want(self, ver: FileVersion) -> None:
        """Queue `ver` for a copy (a file was closed, or warmed): built when the daemon is quiet."""
        if self.kernel is None or self._refused or ver.vid in self._pending or len(self._pending) >= MAX_PENDING:
            return
        if self.cache.has_spare(self.path(ver.vid)):
            return
        self._pending[ver.vid] = ver
        self._wake.set()

    def forget(self, ver: FileVersion) -> None:
        """The version is gone (a new ETag replaced it, its inode was dropped): its copy goes too, unless
        an open file still uses it (the kernel keeps the inode for those)."""
        self._pending.pop(ver.vid, None)
        self._checked.discard(ver.vid)
        if ver.vid not in self._open:
            self.cache.drop_spare(self.path(ver.vid))

    async def run(self) -> None:
        """Build queued copies one at a time, each only once the daemon has been quiet for QUIET seconds."""
        while True:
            if not self._pending:
                self._wake = trio.Event()
                await self._wake.wait()
            while not self._quiet():
                await trio.sleep(QUIET / 4)
            vid, ver = next(iter(self._pending.items()))
            try:
                await trio.to_thread.run_sync(self.build, ver, limiter=self._limiter)
            finally:
                self._pending.pop(vid, None)

    def build(self, ver: FileVersion) -> bool:
        """Assemble the copy of `ver` from verified blocks (worker thread); False if some extent is not
        cached or there is no room under the quota (tried again at a later close)."""
        path = self.path(ver.vid)
        if self.cache.has_spare(path) or not self.kernel or self._refused:
            return False
        ver.learn(self.index)
        extents = ver.extents()
        if any(ver.known.get(start, (b"", -1))[1] != length for start, length in extents):
            return False  # not every extent fetched yet
        size = ver.info.size
        if not self.cache.reserve(size):
            log.debug("no room under the cache quota for a %d-byte copy of %s", size, ver.info.key)
            return False
        tmp = f"{path}.tmp.{os.getpid()}"
        added = False
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                for start, length in extents:
                    block = self.cache.load(ver.known[start][0], length)
                    if block is None:
                        return False  # evicted, or damaged (dropped, refetched at its next read)
                    _write_all(fd, block, start)
                os.ftruncate(fd, size)
                os.fdatasync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            self.cache.add_spare(path, size)
            added = True
            self._checked.add(ver.vid)  # built from blocks this daemon just verified
            self.stats.add(backing_built=1)
            log.debug("backing file of %s built (%d bytes)", ver.info.key, size)
            return True
        except OSError as e:
            log.warning("backing file of %s not built: %s", ver.info.key, e)
            return False
        finally:
            if not added:
                self.cache.unreserve(size)
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass

    def verify(self, ver: FileVersion, path: str) -> bool:
        """Every extent of the copy hashed against the version's extent hashes (worker thread); a copy that
        does not match is deleted and counted."""
        ver.learn(self.index)
        bad = ""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            size = os.fstat(fd).st_size
            if size != ver.info.size:
                bad = f"size {size}, expected {ver.info.size}"
            else:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                extents = ver.extents()
                view = memoryview(bytearray(max((length for _, length in extents), default=0)))
                for start, length in extents:
                    known = ver.known.get(start)
                    if known is None or known[1] != length:
                        bad = f"extent at {start} unknown"
                        break
                    if os.preadv(fd, [view[:length]], start) != length or block_hash(view[:length]) != known[0]:
                        bad = f"extent at {start} does not match its hash"
                        break
        finally:
            os.close(fd)
        if not bad:
            return True
        self.stats.add(backing_corrupt=1)
        log.warning("backing file of %s is damaged (%s): deleted, built again from the blocks", ver.info.key, bad)
        self.cache.drop_spare(path)
        return False


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
