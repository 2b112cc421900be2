"""The block cache: one file per content hash on local disk, identical content stored once.

Layout: `<cache>/blocks/<domain>/<h[0:2]>/<h[2:4]>/<h>` where `h` is the hex xxh3-128 of the block and
`<domain>` a short hash of the trust domain (by default one source bucket: content is shared by hash
only between objects of one domain, because xxh3 is fast, not collision-resistant).

A block is written under `<name>.tmp.<pid>.<n>` and renamed, so a crash never leaves a partial block
under a real name; temp files are swept at start. A block is verified against its name the first time
this process serves it (blocks are not fsync'ed; see `index`), and dropped if it does not match.
Open block fds are pooled (LRU, bounded), never one per block.
"""

from __future__ import annotations

import errno
import itertools
import logging
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import xxhash

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class _Missing(Exception):
    """The block failed verification in another thread."""


def block_hash(data: bytes | memoryview) -> bytes:
    """The 16-byte content hash that names a block."""
    return xxhash.xxh3_128_digest(data)


def _private_dirs(path: str, depth: int) -> None:
    """makedirs, with mode 0700 on the last `depth` levels too (makedirs gives parents 0777 & ~umask)."""
    parts = [path]
    for _ in range(depth - 1):
        parts.append(os.path.dirname(parts[-1]))
    for p in reversed(parts):
        os.makedirs(p, mode=0o700, exist_ok=True)


class _FdPool:
    """A bounded LRU of read-only block fds; an fd in use is never closed under its reader."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._fds: OrderedDict[str, list[int]] = OrderedDict()  # path -> [fd, users]
        self._lock = threading.Lock()

    def acquire(self, path: str) -> int:
        with self._lock:
            ent = self._fds.get(path)
            if ent is not None:
                ent[1] += 1
                self._fds.move_to_end(path)
                return ent[0]
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with self._lock:
            ent = self._fds.get(path)
            if ent is not None:  # another thread opened it meanwhile: use theirs
                os.close(fd)
                ent[1] += 1
                return ent[0]
            self._fds[path] = [fd, 1]
            self._shrink()
        return fd

    def release(self, path: str) -> None:
        with self._lock:
            ent = self._fds.get(path)
            if ent is not None:
                ent[1] -= 1
            self._shrink()

    def forget(self, path: str) -> None:
        """Close `path`'s fd once idle (the block is being dropped)."""
        with self._lock:
            ent = self._fds.get(path)
            if ent is not None and ent[1] == 0:
                os.close(ent[0])
                del self._fds[path]

    def _shrink(self) -> None:
        if len(self._fds) <= self.capacity:
            return
        for path in list(self._fds):
            if len(self._fds) <= self.capacity:
                break
            fd, users = self._fds[path]
            if users == 0:
                os.close(fd)
                del self._fds[path]

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()


class BlockCache:
    """Content-addressed blocks on local disk. All methods block: call them from worker threads."""

    def __init__(self, root: str, domain: str, open_files: int = 256,
                 on_corrupt: Callable[[bytes], None] | None = None) -> None:
        self.root = os.path.join(root, "blocks", xxhash.xxh3_64_hexdigest(domain.encode()))
        _private_dirs(self.root, depth=2)
        self._pool = _FdPool(open_files)
        self._verified: set[bytes] = set()
        self._writing: set[bytes] = set()
        self._verifying: dict[bytes, threading.Event] = {}
        self._lock = threading.Lock()
        self._tmp_seq = itertools.count()
        self._on_corrupt = on_corrupt
        self.bytes_stored = 0  # maintained after `scan()`
        self.blocks_stored = 0

    def path(self, digest: bytes) -> str:
        h = digest.hex()
        return os.path.join(self.root, h[0:2], h[2:4], h)

    def scan(self) -> None:
        """Sweep temp files left by a crash and count what is stored (run once at start)."""
        swept = total = count = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                p = os.path.join(dirpath, name)
                if ".tmp." in name:
                    try:
                        os.unlink(p)
                        swept += 1
                    except OSError:
                        pass
                    continue
                try:
                    total += os.stat(p).st_size
                    count += 1
                except OSError:
                    pass
        with self._lock:
            self.bytes_stored += total
            self.blocks_stored += count
        if swept:
            log.info("swept %d temporary block files left by an interrupted run", swept)

    def contains(self, digest: bytes) -> bool:
        return os.path.exists(self.path(digest))

    def _first_serve(self, digest: bytes, verify: Callable[[], _T]) -> tuple[bool, _T | None]:
        """Single-flight verification: (True, verify()) for the one thread that verifies the block,
        (False, None) for the others, once it is verified. Raises _Missing if it turned out bad."""
        if digest in self._verified:
            return False, None
        with self._lock:
            waiter = self._verifying.get(digest)
            if waiter is None:
                self._verifying[digest] = threading.Event()
        if waiter is None:
            try:
                return True, verify()
            finally:
                with self._lock:
                    self._verifying.pop(digest).set()
        # Another thread is reading and hashing this block: wait for it rather than do it again.
        waiter.wait()
        if digest not in self._verified:
            raise _Missing
        return False, None

    def read(self, digest: bytes, length: int, offset: int, size: int) -> bytes | None:
        """`size` bytes at `offset` of the block `digest` (of `length` bytes), or None if missing or bad."""
        path = self.path(digest)
        try:
            first, data = self._first_serve(digest, lambda: self._verify_and_read(digest, length, offset, size))
        except _Missing:
            return None
        if first:
            return data
        try:
            fd = self._pool.acquire(path)
        except FileNotFoundError:
            return None
        try:
            data = os.pread(fd, size, offset)
        finally:
            self._pool.release(path)
        if len(data) != size:  # truncated under us since it was verified
            self.drop(digest, "truncated")
            return None
        return data

    def map(self, digest: bytes, length: int) -> mmap.mmap | None:
        """The whole block mapped read-only (populated), verified on first serve; None if missing or bad.

        For pushing whole extents into the page cache: no copy into Python memory, no allocation.
        The caller closes the map.
        """
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size != length:
                self.drop(digest, "truncated" if os.fstat(fd).st_size < length else "corrupt")
                return None
            m = mmap.mmap(fd, length, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

        def verify() -> bool:
            if block_hash(m) != digest:
                return False
            with self._lock:
                self._verified.add(digest)
            return True

        try:
            first, ok = self._first_serve(digest, verify)
        except _Missing:
            m.close()
            return None
        if first and not ok:
            m.close()
            self.drop(digest, "corrupt")
            return None
        return m

    def _verify_and_read(self, digest: bytes, length: int, offset: int, size: int) -> bytes | None:
        path = self.path(digest)
        try:
            with open(path, "rb", buffering=0) as f:
                data = f.read(length + 1)
        except FileNotFoundError:
            return None
        if len(data) != length or block_hash(data) != digest:
            self.drop(digest, "truncated" if len(data) < length else "corrupt")
            return None
        with self._lock:
            self._verified.add(digest)
        return data[offset:offset + size]

    def drop(self, digest: bytes, why: str) -> None:
        """Remove a block that failed verification; the caller refetches."""
        path = self.path(digest)
        log.warning("cache block %s is %s: dropped, will refetch", digest.hex(), why)
        with self._lock:
            self._verified.discard(digest)
        self._pool.forget(path)
        try:
            st = os.stat(path)
            os.unlink(path)
        except FileNotFoundError:
            return
        with self._lock:
            self.bytes_stored -= st.st_size
            self.blocks_stored -= 1
        if self._on_corrupt:
            self._on_corrupt(digest)

    def put(self, digest: bytes, data: bytes | memoryview) -> bool:
        """Store a block whose hash the caller computed. False if it was already stored (dedup).

        Raises OSError (e.g. ENOSPC) if it cannot be written; nothing partial is left behind.
        """
        path = self.path(digest)
        with self._lock:
            if digest in self._verified or digest in self._writing or os.path.exists(path):
                return False
            self._writing.add(digest)
        try:
            self._write(path, data)
        finally:
            with self._lock:
                self._writing.discard(digest)
        with self._lock:
            self._verified.add(digest)
            self.bytes_stored += len(data)
            self.blocks_stored += 1
        return True

    def _write(self, path: str, data: bytes | memoryview) -> None:
        tmp = f"{path}.tmp.{os.getpid()}.{next(self._tmp_seq)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            _private_dirs(os.path.dirname(path), depth=2)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                if n == 0:
                    raise OSError(errno.ENOSPC, "short write")
                view = view[n:]
            os.close(fd)
            fd = -1
            os.rename(tmp, path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def close(self) -> None:
        self._pool.close()
