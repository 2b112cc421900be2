"""The block cache: one file per content hash on local disk, identical content stored once.

Layout: `<cache>/blocks/<domain>/<h[0:2]>/<h[2:4]>/<h>` where `h` is the hex xxh3-128 of the block and
`<domain>` a short hash of the trust domain (by default one source bucket: content is shared by hash
only between objects of one domain, because xxh3 is fast, not collision-resistant).

A block is written under `<name>.tmp.<pid>.<n>` and renamed, so a crash never leaves a partial block
under a real name; temp files are swept at start. Blocks are not fsync'ed (see `index`): what a crash or
the disk does to one is caught when it is read. Every read of a block (`load`) copies it into memory the
daemon owns and hashes it there, and only that copy is served (`mapped`): a block file changed under the
daemon by anything (a write in place, a truncation, bit rot, a bad sector under pages the kernel reads
again) is found at its next read, dropped and refetched, and no byte of it is ever served. The fd is
closed as soon as the block is read, so open files never grow with the cache.

Space: blocks of every domain under `<cache>/blocks` count against `cache.max_size`, and the cache
filesystem keeps `cache.min_free` free. Room is made by evicting the least recently used blocks; a block
that is being mapped is held (`held`) and never evicted (an unlinked file that is open stays readable
anyway). When no room can be made, or the disk is full regardless (ENOSPC), `put` raises CacheFull and
the caller serves the bytes from memory: a full cache costs warmth, never a failed read.

Spare copies (the whole-file backing files of FUSE passthrough, `backing`) count against the same quota
and are evicted before any block, least recently registered first, unless one is in use (`hold_spare`):
they are copies of blocks, and the blocks are what the cache exists to keep.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import itertools
import logging
import mmap
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

import xxhash

from modelfs.cachedir import CacheDir
from modelfs.mapped import private

log = logging.getLogger(__name__)


class CacheFull(OSError):
    """No room for a block: quota reached with every block held, kept or protected, or the disk is full."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.ENOSPC, why)


def block_hash(data: bytes | memoryview) -> bytes:
    """The 16-byte content hash that names a block."""
    return xxhash.xxh3_128_digest(data)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_libc.fallocate.restype = ctypes.c_int


def preallocate(fd: int, size: int) -> bool:
    """Reserve a new block file's disk space in one call before writing it. On ext4 (as measured for
    `make bench`), writing 8 MiB into a preallocated file cost about a tenth of the CPU of a write that
    allocates as it goes (delayed allocation, page by page), and a full disk shows up here as ENOSPC
    before any byte is copied. False where the filesystem cannot preallocate (then plain writes do);
    raises OSError for ENOSPC/EDQUOT and other real failures. Unlike posix_fallocate, never falls back
    to writing zeros."""
    if _libc.fallocate(fd, 0, 0, size) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64), ("nr_writeback", ctypes.c_uint64),
                ("nr_evicted", ctypes.c_uint64), ("nr_recently_evicted", ctypes.c_uint64)]


_SYS_CACHESTAT = 451  # Linux >= 6.5, the same number on every architecture
_libc.syscall.restype = ctypes.c_long


def _all_cached(fd: int, size: int) -> bool | None:
    """Whether the page cache holds every page of the file's first `size` bytes (cachestat(2): no I/O,
    no mapping); None where the kernel cannot tell."""
    rng, st = _CacheStatRange(0, size), _CacheStat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
        return None
    return bool(st.nr_cache >= -(-size // mmap.PAGESIZE))


def read_block(fd: int, view: memoryview) -> int:
    """Read a whole block file into `view` (page-aligned `private` memory); the bytes read.

    A block the page cache holds whole (written or read moments ago) is copied from it: no disk read, no
    writeback of dirty pages. Any other is read with O_DIRECT straight into `view`, so its pages do not
    stay in the page cache beside the copy (loaders' reads are cached in the mount's own page cache). A
    read that may start I/O before O_DIRECT (RWF_NOWAIT still queues readahead) was measured here at
    twice the time of O_DIRECT alone. Filesystems without O_DIRECT read through the page cache."""
    size = len(view)
    got = 0
    if not _all_cached(fd, size):
        whole = view.obj  # the private mapping, ALIGN-rounded: aligned lengths
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError:
            pass
        else:
            try:
                while got < size:
                    n = os.preadv(fd, [memoryview(whole)[got:]], got)
                    if n <= 0:
                        return got
                    got += n
                return got
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                got = 0
            finally:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    while got < size:  # buffered
        n = os.preadv(fd, [view[got:]], got)
        if n <= 0:
            break
        got += n
    return got


def _digest_of(path: str) -> bytes:
    try:
        return bytes.fromhex(os.path.basename(path))
    except ValueError:
        return b""


def _private_dirs(path: str, depth: int) -> None:
    """makedirs, with mode 0700 on the last `depth` levels too (makedirs gives parents 0777 & ~umask)."""
    parts = [path]
    for _ in range(depth - 1):
        parts.append(os.path.dirname(parts[-1]))
    for p in reversed(parts):
        os.makedirs(p, mode=0o700, exist_ok=True)


class BlockCache:
    """Content-addressed blocks on local disk. All methods block: call them from worker threads."""

    def __init__(self, root: str, domain: str, on_corrupt: Callable[[bytes], None] | None = None,
                 max_size: int = 0, min_free: int = 0, on_evict: Callable[[int, int], None] | None = None,
                 preallocate: bool = True) -> None:
        self.blocks_root = CacheDir(root).blocks
        self.root = self.domain_root(domain)
        _private_dirs(self.root, depth=2)
        self.max_size = max_size
        self.min_free = min_free
        self._on_evict = on_evict
        # Every block file of every domain, least recently used first: path -> (size, last use, monotonic).
        self._lru: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._held: dict[str, int] = {}  # path -> mappings being made of it now
        self._kept: set[str] = set()  # block names of pinned models (`modelfs cache pin`)
        self._reserved = 0  # bytes of writes in progress, already counted against the quota
        self._unlinking = 0  # bytes of evicted blocks not unlinked yet: on disk, so still counted
        self._spares: OrderedDict[str, int] = OrderedDict()  # spare copies (backing files): path -> size
        self._spares_held: dict[str, int] = {}  # spare path -> users (open passthrough files)
        self.spare_bytes = 0
        self._fs_free_value = 0
        self._fs_free_at = -1.0
        self._verified: set[bytes] = set()  # blocks this process wrote or read back intact (`complete`)
        self._writing: set[bytes] = set()
        self._lock = threading.Lock()
        self._tmp_seq = itertools.count()
        self._preallocate = preallocate  # and until the cache filesystem says it cannot
        self._on_corrupt = on_corrupt
        self.bytes_stored = 0
        self.blocks_stored = 0
        self.maps_made = 0  # blocks read from disk (`load`), and hashed: every one of them
        self.verifications = 0
        self.scan()

    def domain_root(self, domain: str) -> str:
        """The block dir of a trust domain (by default one source bucket or directory)."""
        return os.path.join(self.blocks_root, xxhash.xxh3_64_hexdigest(domain.encode()))

    def keep(self, names: set[str]) -> None:
        """Never evict blocks with these names (hex hashes of pinned models' extents), in any domain."""
        with self._lock:
            self._kept = set(names)

    def path(self, digest: bytes) -> str:
        h = digest.hex()
        return os.path.join(self.root, h[0:2], h[2:4], h)

    def scan(self) -> None:
        """Sweep temp files left by a crash and list what is stored, oldest use first (run at start,
        before any `put`: a temp file here is never one of this process's writes in progress)."""
        swept = 0
        found: list[tuple[float, str, int]] = []
        for dirpath, _dirs, files in os.walk(self.blocks_root):
            for name in files:
                p = os.path.join(dirpath, name)
                try:
                    if ".tmp." in name:
                        os.unlink(p)
                        swept += 1
                        continue
                    st = os.stat(p)
                except OSError:
                    continue
                found.append((max(st.st_atime, st.st_mtime), p, st.st_size))
        found.sort()
        with self._lock:
            self._lru = OrderedDict((p, (size, -1.0)) for _, p, size in found)
            self.bytes_stored = sum(size for _, _, size in found)
            self.blocks_stored = len(found)
        if swept:
            log.info("swept %d temporary block files left by an interrupted run", swept)

    # -- space ------------------------------------------------------------------------------------

    def _touch(self, path: str) -> None:
        with self._lock:
            ent = self._lru.get(path)
            if ent is not None:
                self._lru[path] = (ent[0], time.monotonic())
                self._lru.move_to_end(path)

    @contextlib.contextmanager
    def held(self, digest: bytes) -> Iterator[str]:
        """Keep the block from eviction while the caller reads it; yields its path."""
        path = self.path(digest)
        with self._lock:
            self._held[path] = self._held.get(path, 0) + 1
        try:
            yield path
        finally:
            with self._lock:
                n = self._held.pop(path) - 1
                if n:
                    self._held[path] = n

    def _fs_free(self, fresh: bool = False) -> int:
        """Free bytes on the cache filesystem; re-measured at most every 0.5 s (a statvfs per block
        written showed in profiles), and whenever `fresh` is asked (before evicting)."""
        now = time.monotonic()
        if fresh or now - self._fs_free_at > 0.5:
            st = os.statvfs(self.blocks_root)
            self._fs_free_value, self._fs_free_at = st.f_bavail * st.f_frsize, now
        return self._fs_free_value

    def fits(self, nbytes: int) -> bool:
        """Whether `nbytes` fit with no eviction (no I/O most of the time: callable from the trio thread)."""
        if self.max_size and self._used() + nbytes > self.max_size:
            return False
        return not self.min_free or self._fs_free() - self._reserved - nbytes >= self.min_free

    def _used(self) -> int:
        """Bytes counted against max_size: blocks, spare copies, evictions in progress, writes reserved."""
        return self.bytes_stored + self.spare_bytes + self._unlinking + self._reserved

    # -- spare copies (backing files) ---------------------------------------------------------------

    def reserve(self, nbytes: int) -> bool:
        """Room for a spare copy about to be written (evicting older spares, then blocks not used for a
        minute: a copy never evicts what a load is using); False if there is none. `add_spare` or
        `unreserve` settles it."""
        return self.make_room(nbytes, protect_since=time.monotonic() - 60, reserve=True)

    def unreserve(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes

    def add_spare(self, path: str, nbytes: int, reserved: bool = True) -> None:
        """Count a spare copy written at `path` (its room reserved by `reserve`, or found at start)."""
        with self._lock:
            if reserved:
                self._reserved -= nbytes
            old = self._spares.pop(path, None)
            self.spare_bytes += nbytes - (old or 0)
            self._spares[path] = nbytes

    def drop_spare(self, path: str) -> None:
        """Forget and delete a spare copy (a damaged one, or one of a version that is gone)."""
        with self._lock:
            size = self._spares.pop(path, None)
            if size is not None:
                self.spare_bytes -= size
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def has_spare(self, path: str) -> bool:
        with self._lock:
            return path in self._spares

    def hold_spare(self, path: str, users: int) -> None:
        """Add `users` (negative: remove) to a spare copy in use; one in use is never evicted."""
        with self._lock:
            n = self._spares_held.get(path, 0) + users
            if n > 0:
                self._spares_held[path] = n
            else:
                self._spares_held.pop(path, None)

    @property
    def spares(self) -> int:
        return len(self._spares)

    def _evictable(self, path: str) -> bool:
        """Not being read or mapped, and not of a pinned model (call with the lock held)."""
        return path not in self._held and os.path.basename(path) not in self._kept

    def headroom(self, protect_since: float | None = None) -> int:
        """Bytes that fit now, counting blocks that could be evicted (only those last used before
        `protect_since`, a time.monotonic() value, when given)."""
        room = self.max_size - self._used() if self.max_size else 1 << 62
        if self.min_free:
            room = min(room, self._fs_free() - self.min_free)
        with self._lock:
            for path, (size, used) in self._lru.items():
                if protect_since is not None and used >= protect_since:
                    break
                if self._evictable(path):
                    room += size
            room += sum(size for path, size in self._spares.items() if path not in self._spares_held)
        return max(0, room)

    def make_room(self, nbytes: int, protect_since: float | None = None, reserve: bool = False,
                  partial: bool = False) -> bool:
        """Evict least recently used blocks (not held, not kept) until `nbytes` fit; False (evicting nothing) if
        they cannot.

        Blocks last used at or after `protect_since` are kept (prefetch must not evict what the load it
        serves has just fetched or read); with None any block not held or kept may go. `reserve` holds the room
        for a write in progress, so concurrent writers cannot together overshoot the quota. `partial`
        evicts what it can even when that is not enough (`modelfs cache gc` with pinned models).
        """
        if self.max_size and nbytes > self.max_size:
            return False
        if self.fits(nbytes) and not reserve:
            return True
        fs_free = self._fs_free(fresh=True) if self.min_free else 0
        victims: list[tuple[str, int]] = []
        with self._lock:
            need = 0
            if self.max_size:  # bytes being unlinked are still on disk: not yet room for anyone
                need = self._used() + nbytes - self.max_size
            if self.min_free:
                need = max(need, self.min_free + self._reserved + nbytes - fs_free)
            freed = 0
            spares: list[tuple[str, int]] = []
            for path, size in self._spares.items():  # copies go before any block
                if freed >= need:
                    break
                if path not in self._spares_held:
                    spares.append((path, size))
                    freed += size
            for path, (size, used) in self._lru.items():
                if freed >= need or (protect_since is not None and used >= protect_since):
                    break
                if self._evictable(path):
                    victims.append((path, size))
                    freed += size
            if freed < need and not (partial and (victims or spares)):
                return False
            if reserve:
                self._reserved += nbytes
            for path, size in spares:
                del self._spares[path]
                self.spare_bytes -= size
            for path, size in victims:
                del self._lru[path]
                self.bytes_stored -= size
                self.blocks_stored -= 1
                self._verified.discard(_digest_of(path))
            victims += spares
            unlinking = sum(size for _, size in victims)
            self._unlinking += unlinking
        try:
            for path, _ in victims:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        finally:
            with self._lock:
                self._unlinking -= unlinking
        if victims and self._on_evict:
            self._on_evict(len(victims), sum(size for _, size in victims))
        return freed >= need

    def writable(self) -> bool:
        """Whether the cache takes a write now (`modelfs health`): a probe file written and removed (a temp
        name, swept at start if a crash leaves it)."""
        path = os.path.join(self.blocks_root, f"probe.tmp.{os.getpid()}")
        try:
            with open(path, "wb") as f:
                f.write(b"x")
            os.unlink(path)
            return True
        except OSError:
            return False

    def contains(self, digest: bytes) -> bool:
        return os.path.exists(self.path(digest))

    def verified(self, digest: bytes) -> bool:
        """Whether this process has checked the block against its hash (or wrote it itself) and not found
        it bad or evicted it since."""
        return digest in self._verified

    def read(self, digest: bytes, length: int, offset: int, size: int) -> bytes | None:
        """A copy of `size` bytes at `offset` of the block (for administration and tests; the daemon serves
        views of `load` instead), or None if it is missing or bad."""
        view = self.load(digest, length)
        return None if view is None else bytes(view[offset:offset + size])

    def load(self, digest: bytes, length: int) -> memoryview | None:
        """The whole block, read into memory of its own (`mapped.private`) and checked against its hash
        there; None if it is missing, short or bad (then dropped, counted and refetched by the caller).

        Every load hashes what it read, the first of this process or not: the view returned holds exactly
        the bytes that were hashed, and nothing done to the file afterwards (a write in place, a
        truncation, corruption under pages the kernel reads again from disk) can change them. The block is
        held against eviction while it is read; no fd stays open.
        """
        with self.held(digest) as path:
            view = self._load_held(digest, path, length)
        if view is not None:
            self._touch(path)
        return view

    def _load_held(self, digest: bytes, path: str, length: int) -> memoryview | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        view: memoryview | None = None
        got, why, inode = 0, "corrupt", None
        try:
            st = os.fstat(fd)
            inode = st.st_ino
            if st.st_size == length and length:
                view = memoryview(private(length))[:length]
                got = read_block(fd, view)
            elif st.st_size < length:
                why = "truncated"
        except OSError as e:  # the disk failed to read it (EIO): as bad as a wrong byte
            why = f"unreadable ({e.strerror or e})"
        finally:
            os.close(fd)
        ok = view is not None and got >= length and block_hash(view) == digest
        with self._lock:
            self.maps_made += view is not None
            self.verifications += view is not None
            if ok:
                self._verified.add(digest)
        if not ok:
            self.drop(digest, why, inode)
            return None
        return view

    def drop(self, digest: bytes, why: str, inode: int | None = None) -> None:
        """Remove a block that failed verification (only the file `inode` when given: a block refetched
        and stored again meanwhile is a new file, and good); the caller refetches. Counted once per bad
        file, however many readers found it."""
        path = self.path(digest)
        with self._lock:
            self._verified.discard(digest)
        try:
            if inode is not None and os.stat(path).st_ino != inode:
                return  # stored again meanwhile: a new file, and good
            os.unlink(path)
        except FileNotFoundError:
            return  # two readers found the same bad file at once: the other one dropped and counted it
        log.warning("cache block %s is %s: dropped, will refetch", digest.hex(), why)
        with self._lock:
            ent = self._lru.pop(path, None)
            if ent is not None:
                self.bytes_stored -= ent[0]
                self.blocks_stored -= 1
        if self._on_corrupt:
            self._on_corrupt(digest)

    def put(self, digest: bytes, data: bytes | memoryview) -> bool:
        """Store a block whose hash the caller computed. False if it was already stored (dedup).

        Evicts least recently used blocks to make room. Raises CacheFull when there is no room, or
        another OSError if the block cannot be written; nothing partial is left behind.
        """
        path = self.path(digest)
        size = len(data)
        with self._lock:
            if digest in self._verified or digest in self._writing or os.path.exists(path):
                return False
            self._writing.add(digest)
        written = False
        try:
            if not self.make_room(size, reserve=True):
                raise CacheFull(f"no room for a {size}-byte block under the cache quota")
            try:
                try:
                    written = self._write(path, data)
                except OSError as e:
                    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    # The disk filled up under us (other writers, or no min_free): keep two blocks of
                    # slack from now on, evict, and try once more.
                    self.min_free = max(self.min_free, 2 * size)
                    if not self.make_room(0):
                        raise CacheFull("the cache filesystem is full") from None
                    written = self._write(path, data)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(e, CacheFull):
                    raise CacheFull("the cache filesystem is full") from None
                raise
            finally:
                with self._lock:
                    self._reserved -= size
                    if written:
                        self._verified.add(digest)
                        self._lru[path] = (size, time.monotonic())
                        self.bytes_stored += size
                        self.blocks_stored += 1
        finally:
            with self._lock:
                self._writing.discard(digest)
        return True

    def _write(self, path: str, data: bytes | memoryview) -> bool:
        """Write a block under a temp name and rename it into place."""
        tmp = f"{path}.tmp.{os.getpid()}.{next(self._tmp_seq)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            _private_dirs(os.path.dirname(path), depth=2)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if self._preallocate and data:
                self._preallocate = preallocate(fd, len(data))
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                if n == 0:
                    raise OSError(errno.ENOSPC, "short write")
                view = view[n:]
            os.close(fd)
            fd = -1
            os.rename(tmp, path)
            return True
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def close(self) -> None:
        """Nothing is held open between calls (mappings close their fds at once); kept for symmetry."""
