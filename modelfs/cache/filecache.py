"""`FileCache`: the whole of the cache, and its writes: an extent is written into its version's file in place,
preallocated first, and recorded (index, then memory) only once it is all there."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable

from modelfs.cache.checks import Checks
from modelfs.cache.diskio import PAGE, clone_range, copy_range, pages, preallocate, punch, write_all
from modelfs.cache.files import CacheFull, File
from modelfs.cache.seals import Seals
from modelfs.catalog.version import FileVersion

log = logging.getLogger(__name__)


class FileCache(Checks, Seals):
    """Version files on local disk, for one daemon (whose store's trust domain is `domain`). Blocking
    methods run in worker threads; `pread(nowait=True)` and the properties may run on the trio thread."""

    # -- writing (worker threads) ----------------------------------------------------------------------------------

    def write(self, ver: FileVersion, start: int, data: bytes | memoryview, digest: bytes) -> bool:
        """Write an extent whose hash the caller computed into the version's file and record it (trusted).
        False if it was present already. Makes room first; raises CacheFull when there is none, or another
        OSError if it cannot be written: then nothing of it counts as present."""
        return self._store(ver, start, len(data), digest, lambda fd: self._write_bytes(fd, start, data))

    def _write_bytes(self, fd: int, start: int, data: bytes | memoryview) -> None:
        if self._preallocate and len(data):
            self._preallocate = preallocate(fd, start, len(data))
        write_all(fd, data, start)

    def copy_in(self, ver: FileVersion, start: int, length: int, digest: bytes, src: tuple[bytes, int]) -> bool:
        """Put an extent into the version's file from another file holding the same content: shared on disk
        where the filesystem can (`reflinks`, the same offset within a page), else copied inside the kernel.
        Trusted if the source was (its bytes were checked); False if the source is gone or not trusted."""
        with self._reading(*src, trusted=True) as got:
            if got is None or got[1:3] != (digest, length):
                return False
            src_fd = got[0]
            return self._store(ver, start, length, digest,
                               lambda fd: self._copy_bytes(src_fd, src[1], fd, start, length))

    def _copy_bytes(self, src: int, src_off: int, dst: int, dst_off: int, length: int) -> None:
        if self.reflinks and (src_off - dst_off) % PAGE == 0:
            head = -dst_off % PAGE
            body = (length - head) // PAGE * PAGE if length > head else 0
            if dst_off + length == os.fstat(dst).st_size:  # a clone may end at the end of the file
                body = length - head
            if body > 0:
                try:
                    clone_range(src, src_off + head, dst, dst_off + head, body)
                except OSError as e:
                    log.debug("clone of %d bytes failed (%s): copying", body, e)
                    copy_range(src, src_off, dst, dst_off, length)
                    return
                copy_range(src, src_off, dst, dst_off, head)
                tail = length - head - body
                copy_range(src, src_off + head + body, dst, dst_off + head + body, tail)
                return
        copy_range(src, src_off, dst, dst_off, length)

    def _store(self, ver: FileVersion, start: int, length: int, digest: bytes, fill: Callable[[int], None]) -> bool:
        key, charge = (ver.vid, start), pages(start, length)
        with self._lock:
            f = self._files.get(ver.vid)
            if f is None:
                f = self._files[ver.vid] = File(ver.vid, ver.info.size, self.domain)
            f.pending += 1  # from now on the file is not deleted under this write
            while f.punched_over(start, start + length):  # write after the punch of these pages, not before
                self._changed.wait()
            if start in f.present or key in self._writing:
                f.pending -= 1
                return False
            self._writing[key] = length
        stored = reserved = False
        try:
            if not self.make_room(charge, reserve=True):
                raise CacheFull(f"no room for a {length}-byte extent under the cache quota")
            reserved = True
            with self._lock:
                fd = self._fd(f, create=True)
            try:
                with f.writer:
                    fill(fd)
            except OSError as e:
                self._unfill(fd, start, length)
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # The disk filled up under us (other writers, or no min_free): keep two extents of slack from
                # now on, evict for it, and try once more.
                self.min_free = max(self.min_free, 2 * charge)
                if not self.make_room(0):
                    raise CacheFull("the cache filesystem is full") from None
                try:
                    fill(fd)
                except OSError as again:
                    self._unfill(fd, start, length)
                    if again.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise CacheFull("the cache filesystem is full") from None
                    raise
            self.index.mark_present(ver.vid, self.identity, self.domain, ver.info, [(start, digest, length)])
            with self._lock:  # the room reserved becomes the extent's: counted all along (no overshoot)
                self._reserved -= charge
                reserved = False
                f.present[start] = (digest, length)
                f.present_bytes += length
                f.trusted.add(start)
                self._writes += 1
                f.generation[start] = self._writes
                self._by_hash.setdefault(digest, set()).add(key)
                self._lru[key] = time.monotonic()
                self.bytes_stored += length
                self._charged += charge
                f.sealed = f.sealed or f.complete
            stored = True
            return True
        finally:
            with self._lock:
                if reserved:
                    self._reserved -= charge
                del self._writing[key]
                f.pending -= 1
                if not stored and not f.present and f.idle and self._files.get(ver.vid) is f:
                    self._delete(f)  # nothing of it was ever stored: no file either

    @staticmethod
    def _unfill(fd: int, start: int, length: int) -> None:
        """A write that failed half-way: give back what it allocated (nothing of it counts as present)."""
        with contextlib.suppress(OSError):
            punch(fd, start, length)

    def close(self) -> None:
        """Seal what is complete and checked (`seals`: the next daemon, started at once, reads nothing back),
        then close the fds of files nothing uses now. A file a GET thread abandoned at shutdown still writes
        keeps its fd (the process exit closes it): closed under it, the number could name another file by
        then."""
        if self.seals:
            for vid in self.unsealed():
                self.seal(vid)
        with self._lock:
            for f in self._files.values():
                if f.fd >= 0 and f.idle:
                    os.close(f.fd)
                    f.fd = -1
            self._fds.clear()
