"""The file cache: each file version the daemon serves has one file on local disk, written in place as its
extents arrive; once every extent is in, that same file is what the kernel serves by FUSE passthrough.

Layout (`cachedir.CacheDir.files`): `<cache>/files/<vid hex>`, a sparse file of the version's size. The bytes
of an extent are at the extent's own offset once it is present (the index's present table says which). So
a cold byte is received once (into a GET buffer), hashed once (there), written once (here) and then served
from this file: by READs through the daemon until the file is complete, by the kernel after that. No
second copy of it is ever made on disk.

Identical content is stored once per trust domain (one source bucket by default: xxh3 is fast, not
collision-resistant): an extent whose hash another present extent has is not fetched again. Where the
filesystem shares extents (btrfs, XFS: `FICLONERANGE`), it is cloned into the version's own file, which
costs no disk; elsewhere (ext4) it is read from the file that holds it (`locate`), and only copied into the
version's own file (`copy_in`, in the kernel) once that version has been loaded often enough to be worth a
second copy on disk and passthrough (`cache.copy_shared_after`).

Trust: files are not fsync'ed, and anything running as root may write them. A present extent is served only
once this process trusts it: it wrote it from bytes it hashed, or read it back and hashed it (`verify`). An
extent found damaged is punched out, unrecorded and fetched again (`drop`).

Concurrency: every method that touches the disk blocks (worker threads), except `pread` with `nowait`, which
the trio thread may call (it reads only what the page cache holds). In-memory state is guarded by one lock
held only for bookkeeping, never across I/O. An extent is punched out (eviction, damage) only while no read
of it is in progress (`_File.reading`, counted under the lock around every read), after it was marked
absent under the lock: no read can ever see the hole.

Space: present extents of every domain count against `cache.max_size` (in whole pages: what the disk
holds), and the cache filesystem keeps `cache.min_free` free. Room is made least recently used first: a file
still filling gives up single extents, punched out of it (out to page edges no other extent uses), never one
being read; a complete file is deleted whole, never punched, unless a passthrough open holds it (`hold`). A
complete file may have been handed to the kernel for passthrough, by this daemon or an earlier one, and a
loader that mapped it keeps that mapping after its fd, the backing id and even the daemon are gone: its
bytes must never change under it, and a deleted file stays whole for such a mapping until it goes (its disk
space with it). A file left with no extent is deleted. When no room can be made, or the disk is full
regardless (ENOSPC), `write` raises CacheFull and the caller serves the bytes from memory: a full cache
costs warmth, never a failed read.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import xxhash

from modelfs import integrity
from modelfs.cachedir import CacheDir
from modelfs.digest import content_hash
from modelfs.index import ChunkIndex
from modelfs.libc import LIBC
from modelfs.mapped import private
from modelfs.version import FileVersion

log = logging.getLogger(__name__)

#: Open files kept at most for reading and writing (those in use stay open; idle ones are closed first).
MAX_FDS = 256
PAGE = 4096
#: What a check reads at a time into its thread's buffer (`FileCache._digest_of`): the hash is streamed.
CHECK_CHUNK = 1 << 20


class CacheFull(OSError):
    """No room for an extent: quota reached with every extent in use, kept or protected, or the disk is full."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.ENOSPC, why)


LIBC.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
LIBC.fallocate.restype = ctypes.c_int
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
#: _IOW(0x94, 13, struct file_clone_range {s64 src_fd; u64 src_offset, src_length, dest_offset})
_FICLONERANGE = 0x4020940D


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2); False where the filesystem cannot (then the caller does without); OSError otherwise."""
    if LIBC.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def preallocate(fd: int, offset: int, length: int) -> bool:
    """Reserve an extent's disk space in one call before writing it: on ext4, writing 8 MiB into preallocated
    space cost a third to a tenth of the CPU of a write that allocates as it goes (measured here), and a full
    disk shows up as ENOSPC before any byte is copied. Never falls back to writing zeros."""
    return _fallocate(fd, 0, offset, length)


def punch(fd: int, offset: int, length: int) -> None:
    """Give an extent's disk space back (the file keeps its size; the range reads as zeros)."""
    if not _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
        # No hole punching (tmpfs before 3.5, some FUSE filesystems): overwrite with zeros instead, so a
        # stale byte is never mistaken for the extent's.
        os.pwrite(fd, bytes(length), offset)


def clone_range(src: int, src_off: int, dst: int, dst_off: int, length: int) -> None:
    """Share a range of one file with another on disk (FICLONERANGE: btrfs, XFS); OSError where it cannot."""
    arg = struct.pack("=qQQQ", src, src_off, length, dst_off)
    fcntl.ioctl(dst, _FICLONERANGE, arg)


def copy_range(src: int, src_off: int, dst: int, dst_off: int, length: int) -> None:
    """Copy a range between files inside the kernel (no bytes through Python)."""
    done = 0
    while done < length:
        n = os.copy_file_range(src, dst, length - done, src_off + done, dst_off + done)
        if n <= 0:
            raise OSError(errno.EIO, "short copy")
        done += n


def pages(start: int, length: int) -> int:
    """Bytes of the whole pages that bytes [start, start+length) touch: what an extent takes on disk at most."""
    return (-(-(start + length) // PAGE) - start // PAGE) * PAGE


#: Bytes per pwrite. The page cache sizes a new folio by the write that creates it, and on this VM large
#: folios of pages the guest has not used lately cost far more to fill (our reading: they fault in the
#: hypervisor on first touch). A bare single-threaded pwrite of 2 GiB into a new file here: 8 MiB pwrites
#: 0.6-2.2 ms of CPU per MiB, 1 MiB 0.65-0.9, 256 KiB 0.18-0.21, 64 KiB 0.23 (not yet shown in the daemon's
#: own CPU by an interleaved A/B).
WRITE_SLICE = 256 << 10


def write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view[:WRITE_SLICE], offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write")
        view, offset = view[n:], offset + n


def read_all(fd: int, view: memoryview, offset: int) -> int:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            break
        got += n
    return got


class _File:
    """One version's file and what this process knows of it."""

    __slots__ = ("domain", "durable", "fd", "generation", "holds", "immutable", "orphan", "pending", "present",
                 "present_bytes", "punching", "reading", "sealed", "size", "trusted", "vid", "writer")

    def __init__(self, vid: bytes, size: int, domain: str) -> None:
        self.vid = vid
        self.size = size
        self.domain = domain
        self.present: dict[int, tuple[bytes, int]] = {}  # start -> (hash, length) of extents in the file
        self.present_bytes = 0
        self.trusted: set[int] = set()  # present extents this process wrote or read back and hashed
        self.fd = -1
        self.reading: dict[int, int] = {}  # extent start -> reads of it in progress (it is not punched meanwhile)
        # start -> [lo, hi): extents marked absent and not punched out yet, and the range each punch frees (its
        # pages, out to page edges no other extent uses); no write into those pages until the punch is done
        self.punching: dict[int, tuple[int, int]] = {}
        self.generation: dict[int, int] = {}  # start -> which write put the present bytes there
        self.holds = 0  # passthrough registrations: the kernel may read any byte at any time
        self.pending = 0  # writes into the file in progress
        self.sealed = False  # complete at some point: it may be mapped through passthrough; never punched again
        self.durable = False  # a seal of it as it is now is in the index (`seal`; `integrity`, invariants 1-3)
        self.immutable = False  # an fs-verity file: opened read-only; damage means deleting it whole
        self.orphan = False  # deleted while reads of it were in progress: the last one closes its fd
        # One writer at a time: concurrent pwrites into one file queue on its inode lock, which the kernel's
        # waiters spin on while the owner copies (12-18 % of the daemon's CPU in some perf profiles of a cold
        # fetch, none in others); waiting here sleeps instead.
        self.writer = threading.Lock()

    @property
    def idle(self) -> bool:
        """Nothing reads, writes, punches or holds the file now (it may be closed, or deleted once empty: a
        file is never deleted, and a new one made at its path, while a punch of it is pending, which would
        then punch the new file)."""
        return not (self.reading or self.holds or self.pending or self.punching)

    def in_use(self, lo: int, hi: int, writing: dict[tuple[bytes, int], int]) -> bool:
        """Whether bytes [lo, hi) of the file belong to a present extent or one being written (lock held)."""
        return any(s < hi and lo < s + n for s, (_, n) in self.present.items()) or \
            any(v == self.vid and s < hi and lo < s + n for (v, s), n in writing.items())

    def punched_over(self, lo: int, hi: int) -> bool:
        """Whether a punch in progress frees any of bytes [lo, hi) (lock held)."""
        return any(a < hi and lo < b for a, b in self.punching.values())

    @property
    def complete(self) -> bool:
        return self.present_bytes == self.size

    @property
    def all_trusted(self) -> bool:
        return self.complete and len(self.trusted) == len(self.present)


@dataclass(frozen=True)
class _Victim:
    """An extent marked absent, to be punched out: its bytes [start, start+length), the range the punch frees
    [lo, hi), and the pages it was counted for."""

    file: _File
    start: int
    length: int
    lo: int
    hi: int
    charge: int


class FileCache:
    """Version files on local disk, for one daemon (whose store's trust domain is `domain`). Blocking
    methods run in worker threads; `pread(nowait=True)` and the properties may run on the trio thread."""

    def __init__(self, root: str, index: ChunkIndex, domain: str, identity: str = "", *, max_size: int = 0,
                 min_free: int = 0,
                 on_evict: Callable[[int, int], None] | None = None,
                 on_corrupt: Callable[[int], None] | None = None, preallocate: bool = True,
                 trust_restarts: bool = False) -> None:
        self.dir = CacheDir(root)
        self.root = self.dir.files
        self.dir.remove_old_layout()
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self.index = index
        self.domain = domain
        self.identity = identity  # the store's: index records name their source
        self.max_size = max_size
        self.min_free = min_free
        self._on_evict = on_evict
        self._on_corrupt = on_corrupt
        self._preallocate = preallocate  # and until the cache filesystem says it cannot
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a read ended, or a punch is done
        self._local = threading.local()  # each worker thread's read buffer for checks (`_digest_of`)
        self._writes = 0  # writes stored so far: each present extent's generation
        self._files: dict[bytes, _File] = {}
        # Present extents, least recently used first: (vid, start) -> time.monotonic() of last use (-1: before
        # this process).
        self._lru: OrderedDict[tuple[bytes, int], float] = OrderedDict()
        self._by_hash: dict[bytes, set[tuple[bytes, int]]] = {}  # hash -> present extents with that content
        self._fds: OrderedDict[bytes, None] = OrderedDict()  # files with an open fd, least recently used first
        self._writing: dict[tuple[bytes, int], int] = {}  # extents being written -> their lengths
        self._kept: set[bytes] = set()  # hashes of pinned models' extents (`modelfs cache pin`)
        # The quota counts whole pages (`pages`): what the disk holds, not the extents' lengths. `_charged` is
        # the pages of present extents (a page two extents share counted twice: never less than the disk).
        self._charged = 0
        self._reserved = 0  # pages of writes in progress, already counted against the quota
        self._unlinking = 0  # pages being punched out: still on disk, so still counted
        self._fs_free_value = 0
        self._fs_free_at = -1.0
        self.bytes_stored = 0
        self.reads_verified = 0  # extents read back from disk and hashed (`verify`)
        self.reflinks = self._probe_reflink()
        self.storage = integrity.probe(self.root)  # whether the kernel checks what it reads of these files
        # Whether complete, checked files are sealed for the next daemon: always on verifying storage; elsewhere
        # with `cache.trust_restarts`, for the next daemon of this boot only (`integrity`, invariant 5).
        self._boot = "" if self.storage.verifies else integrity.boot_id()
        self.seals = self.storage.verifies or (trust_restarts and bool(self._boot))
        self.files_trusted_sealed = 0  # files trusted at start by their seal: not read back
        self._scan()

    # -- layout ---------------------------------------------------------------------------------------------

    def path(self, vid: bytes) -> str:
        return os.path.join(self.root, vid.hex())

    def _probe_reflink(self) -> bool:
        """Whether the cache filesystem shares extents between files (a one-block clone of two scratch
        files: swept at start if a crash leaves them)."""
        a, b = (os.path.join(self.root, f"probe.tmp.{os.getpid()}.{i}") for i in (0, 1))
        try:
            fa = os.open(a, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            fb = os.open(b, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.pwrite(fa, bytes(PAGE), 0)
                clone_range(fa, 0, fb, 0, PAGE)
                return True
            except OSError:
                return False
            finally:
                os.close(fa)
                os.close(fb)
        except OSError:
            return False
        finally:
            for p in (a, b):
                with contextlib.suppress(OSError):
                    os.unlink(p)

    def _scan(self) -> None:
        """Reconcile the files on disk with the index at start: a file no present entry names, or of the wrong
        size, is deleted; entries whose file is gone are dropped. Nothing is trusted yet."""
        present = self.index.present()
        records = self.index.versions()
        on_disk: dict[bytes, int] = {}
        for name in os.listdir(self.root):
            p = os.path.join(self.root, name)
            try:
                vid = bytes.fromhex(name)
                size = os.stat(p).st_size
            except (ValueError, OSError):
                vid, size = b"", -1
            rec = records.get(vid)
            if len(vid) != 16 or vid not in present or rec is None or int(str(rec["size"])) != size:
                if rec is not None and vid in present:  # truncated or extended under us: damaged
                    log.warning("cache file %s is %d bytes, not %s: dropped, its %d extents will be fetched again",
                                name, size, rec["size"], len(present[vid]))
                    if self._on_corrupt:
                        self._on_corrupt(len(present[vid]))
                with contextlib.suppress(OSError):
                    os.unlink(p)
                continue
            on_disk[vid] = size
        gone = [(vid, start) for vid, ext in present.items() if vid not in on_disk for start in ext]
        if gone:
            self.index.unmark(gone)
        order: list[tuple[float, bytes]] = []
        for vid, size in on_disk.items():
            rec = records[vid]
            f = self._files[vid] = _File(vid, size, str(rec.get("domain", "")))
            for start, (digest, length) in present[vid].items():
                if start + length > size:
                    continue
                f.present[start] = (digest, length)
                f.present_bytes += length
                self._by_hash.setdefault(digest, set()).add((vid, start))
                self.bytes_stored += length
                self._charged += pages(start, length)
            f.sealed = f.complete
            if f.complete and self.seals:
                self._trust_sealed(f, rec.get("seal"))
            order.append((float(str(rec.get("last_used", 0))), vid))
        for _, vid in sorted(order):
            for start in sorted(self._files[vid].present):
                self._lru[(vid, start)] = -1.0

    # -- reading --------------------------------------------------------------------------------------------

    def _fd(self, f: _File, create: bool = False) -> int:
        """The file's fd (opened, and made at its full size, on first use); call with the lock held."""
        if f.fd < 0:
            path = self.path(f.vid)
            flags = (os.O_RDONLY if f.immutable else os.O_RDWR) | os.O_CLOEXEC | (os.O_CREAT if create else 0)
            fd = os.open(path, flags, 0o600)
            try:
                if create and os.fstat(fd).st_size != f.size:
                    os.ftruncate(fd, f.size)
            except BaseException:
                os.close(fd)
                raise
            f.fd = fd
            self._close_idle_fds()
        self._fds[f.vid] = None
        self._fds.move_to_end(f.vid)
        return f.fd

    def _close_idle_fds(self) -> None:
        for vid in list(self._fds):
            if len(self._fds) < MAX_FDS:
                return
            f = self._files.get(vid)
            if f is not None and not f.idle:
                continue
            del self._fds[vid]
            if f is not None and f.fd >= 0:
                os.close(f.fd)
                f.fd = -1

    @contextlib.contextmanager
    def _reading(self, vid: bytes, start: int, trusted: bool) -> Iterator[tuple[int, bytes, int, int] | None]:
        """(fd, hash, length, generation) of `vid`'s extent at `start` while a read of it is in progress (no
        punch and no close meanwhile); None if it is not present (or, with `trusted`, not trusted)."""
        with self._lock:
            f = self._files.get(vid)
            got = None
            if f is not None and start in (f.trusted if trusted else f.present):
                try:
                    got = (self._fd(f), *f.present[start], f.generation.get(start, 0))
                except OSError as e:  # its file was deleted or damaged under us: nothing of it is present
                    self._lost(f, e)
                else:
                    f.reading[start] = f.reading.get(start, 0) + 1
                    key = (vid, start)
                    if key in self._lru:
                        self._lru[key] = time.monotonic()
                        self._lru.move_to_end(key)
        if got is None or f is None:
            yield None
            return
        try:
            yield got
        finally:
            with self._lock:
                n = f.reading.pop(start) - 1
                if n:
                    f.reading[start] = n
                elif f.punching:
                    self._changed.notify_all()
                self._close_orphan(f)

    def _lost(self, f: _File, e: OSError) -> None:
        """The file cannot be opened (lock held): forget it and every extent of it; they are fetched again."""
        log.warning("cache file of version %s cannot be opened (%s): its extents will be fetched again",
                    f.vid.hex(), e.strerror or e)
        starts = list(f.present)
        for start in starts:
            self._unlinking -= self._unpresent(f, start).charge  # nothing to punch
            del f.punching[start]
        if f.idle:
            del self._files[f.vid]
            self._fds.pop(f.vid, None)
        self.index.unmark([(f.vid, s) for s in starts])

    def pread(self, vid: bytes, start: int, offset: int, view: memoryview, nowait: bool = False) -> int:
        """Read bytes [offset, offset+len(view)) of the trusted extent of `vid` at `start` into `view`. Returns
        the bytes read; -1 if the extent is not trusted here (check or fetch it). With `nowait` (the trio
        thread), 0 or short when the page cache does not hold them all (then read in a worker thread). A read
        the disk fails (EIO: a checksumming filesystem found rot, a bad sector), or that ends short (the file
        was cut), drops the extent: it is fetched again."""
        why = ""
        with self._reading(vid, start, trusted=True) as got:
            if got is None:
                return -1
            generation = got[3]
            try:
                if nowait:
                    return os.preadv(got[0], [view], start + offset, os.RWF_NOWAIT)
                n = read_all(got[0], view, start + offset)
                if n == len(view):
                    return n
                why = f"short ({n} of {len(view)} bytes at {offset})"
            except BlockingIOError:
                return 0
            except OSError as e:
                if nowait:
                    return 0  # the worker thread's read meets it again, and drops it there
                why = f"unreadable ({e.strerror or e})"
        self.drop(vid, start, why, generation)
        return -1

    def verify(self, vid: bytes, start: int, length: int) -> bool:
        """Read a present extent back and hash it (worker thread), CHECK_CHUNK at a time through the thread's
        small buffer: trusted from now on if it matches; else dropped (punched out, unrecorded, counted).
        False then, or if it is not present."""
        return self._verify(vid, start, length, None)

    def read_verified(self, vid: bytes, start: int, length: int) -> memoryview | None:
        """As `verify`, with the extent's bytes read into memory of their own and returned if they match."""
        view = memoryview(private(length))[:length]
        return view if self._verify(vid, start, length, view) else None

    def _verify(self, vid: bytes, start: int, length: int, into: memoryview | None) -> bool:
        with self._reading(vid, start, trusted=False) as got:
            if got is None:
                return False
            fd, digest, known, generation = got
            f = self._files[vid]
            why = "damaged"
            try:
                if known != length:
                    ok = False
                elif into is not None:
                    ok = read_all(fd, into, start) == length and content_hash(into) == digest
                else:
                    ok = self._digest_of(fd, start, start, length) == digest
            except OSError as e:  # the disk failed to read it (EIO): as bad as a wrong byte
                ok, why = False, f"unreadable ({e.strerror or e})"
            with self._lock:
                self.reads_verified += 1
                if ok and start in f.present:
                    f.trusted.add(start)
        if ok:
            return True
        self.drop(vid, start, why, generation)
        return False

    def _digest_of(self, fd: int, lo: int, start: int, length: int) -> bytes | None:
        """xxh3-128 of bytes [start, start+length) of `fd`, read from `lo` (<= start; page-aligned for an
        O_DIRECT fd) in whole pages, CHECK_CHUNK at a time, through this thread's buffer; None if the file
        ends first. A check of a whole file so holds one small buffer per thread, not an extent's worth."""
        buf: mmap.mmap | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = private(CHECK_CHUNK)  # page-aligned, as O_DIRECT needs
        scratch = memoryview(buf)
        h = xxhash.xxh3_128()
        end, pos = start + length, lo
        while pos < end:
            view = scratch[:min(CHECK_CHUNK, -(-(end - pos) // PAGE) * PAGE)]
            n = read_all(fd, view, pos)
            a, b = max(start, pos) - pos, min(end, pos + n) - pos
            if b > a:
                h.update(view[a:b])
            if n < len(view) and pos + n < end:
                return None
            pos += n
        return h.digest()

    def read_back(self, vid: bytes, start: int, length: int, digest: bytes) -> memoryview | None:
        """An extent's bytes read from its file, or from any file holding the same content, and hashed (what
        the shared tier writes back: bytes damaged on disk are never shared); None if the cache holds them
        nowhere (each damaged copy found is dropped on the way)."""
        while True:
            where = (vid, start) if self.present(vid, start) else self.locate(digest, length)
            if where is None:
                return None
            view = self.read_verified(*where, length)
            if view is not None:
                return view if content_hash(view) == digest else None

    def drop(self, vid: bytes, start: int, why: str, generation: int | None = None) -> None:
        """An extent found damaged: punched out and unrecorded (its readers refetch it); counted once. With the
        `generation` of the bytes that were found damaged, nothing is done if other bytes are there since (two
        readers found the same damage; the first dropped it, and a refetch wrote it again)."""
        with self._lock:
            f = self._files.get(vid)
            if f is None or start not in f.present or (generation is not None and
                                                         f.generation.get(start, 0) != generation):
                return  # dropped already by another reader (and maybe written again since)
            if f.immutable:  # an fs-verity file cannot be punched or written: deleted whole, fetched anew
                gone = [(vid, s) for s in f.present]
                self._discard(f)
            else:
                gone = []
                victim = self._unpresent(f, start)
        if gone:
            log.warning("fs-verity cache file of version %s: extent at %d is %s: the file is deleted, will refetch",
                        vid.hex(), start, why)
            self.index.unmark(gone)
            if self._on_corrupt:
                self._on_corrupt(1)
            return
        log.warning("cache file of version %s: extent at %d is %s: dropped, will refetch", vid.hex(), start, why)
        self._punch([victim])
        if self._on_corrupt:
            self._on_corrupt(1)

    # -- what is where (any thread) ----------------------------------------------------------------------------

    def present(self, vid: bytes, start: int) -> bool:
        f = self._files.get(vid)
        return f is not None and start in f.present

    def trusted(self, vid: bytes, start: int) -> bool:
        f = self._files.get(vid)
        return f is not None and start in f.trusted

    def complete(self, vid: bytes) -> bool:
        """Every byte of the version is in its own file (passthrough may serve it once it is trusted)."""
        f = self._files.get(vid)
        return f is not None and f.complete

    def all_trusted(self, vid: bytes) -> bool:
        """Complete, and every extent trusted by this process: the kernel may serve the file as it is."""
        f = self._files.get(vid)
        return f is not None and f.all_trusted

    def immutable(self, vid: bytes) -> bool:
        """Whether the file is an fs-verity file (read-only: healed by deleting it, not by writing it)."""
        f = self._files.get(vid)
        return f is not None and f.immutable

    def untrusted(self, vid: bytes) -> list[tuple[int, int]]:
        """(start, length) of the present extents this process has not checked yet, in file order."""
        with self._lock:
            f = self._files.get(vid)
            if f is None:
                return []
            return sorted((s, n) for s, (_, n) in f.present.items() if s not in f.trusted)

    def read_ahead(self, vid: bytes) -> None:
        """Ask the kernel to read the whole file from disk now, in the background (before a check reads it
        extent by extent, and the loader after it): one sequential sweep instead of small read-aheads. Only a
        hint: a file evicted meanwhile is simply not read."""
        try:
            fd = os.open(self.path(vid), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def present_bytes(self, vid: bytes) -> int:
        f = self._files.get(vid)
        return f.present_bytes if f is not None else 0

    def locate(self, digest: bytes, length: int, besides: tuple[bytes, int] | None = None) -> tuple[bytes, int] | None:
        """(vid, start) of a present extent of this daemon's trust domain with this content (trusted ones
        first), other than `besides`; None if there is none."""
        with self._lock:
            best: tuple[bytes, int] | None = None
            for vid, start in self._by_hash.get(digest, ()):
                f = self._files[vid]
                if (vid, start) == besides or f.domain != self.domain or f.present[start][1] != length:
                    continue
                if start in f.trusted:
                    return vid, start
                best = best or (vid, start)
            return best

    @property
    def files(self) -> int:
        return len(self._files)

    @property
    def files_complete(self) -> int:
        return sum(1 for f in self._files.values() if f.complete)

    # -- writing (worker threads) ------------------------------------------------------------------------------

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
                f = self._files[ver.vid] = _File(ver.vid, ver.info.size, self.domain)
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

    def _delete(self, f: _File) -> None:
        """Forget a file with no extent and nothing using it, and delete it (lock held: the path never names a
        file the cache has forgotten while a new one is being made under it)."""
        del self._files[f.vid]
        self._fds.pop(f.vid, None)
        if f.fd >= 0:
            os.close(f.fd)
            f.fd = -1
        with contextlib.suppress(OSError):
            os.unlink(self.path(f.vid))

    @staticmethod
    def _unfill(fd: int, start: int, length: int) -> None:
        """A write that failed half-way: give back what it allocated (nothing of it counts as present)."""
        with contextlib.suppress(OSError):
            punch(fd, start, length)

    # -- space ------------------------------------------------------------------------------------------------

    def keep(self, digests: set[bytes]) -> None:
        """Never evict extents with these hashes (pinned models), in any file."""
        with self._lock:
            self._kept = set(digests)

    def hold(self, vid: bytes, n: int) -> None:
        """Add `n` (negative: remove) passthrough registrations of the file: one held is never punched."""
        with self._lock:
            f = self._files.get(vid)
            if f is not None:  # (an fs-verity file dropped whole while held: its registration's release
                f.holds = max(0, f.holds + n)  # finds the new file, whose count it must not drive below 0)

    def _fs_free(self, fresh: bool = False) -> int:
        """Free bytes on the cache filesystem; re-measured at most every 0.5 s, and when `fresh` is asked."""
        now = time.monotonic()
        if fresh or now - self._fs_free_at > 0.5:
            st = os.statvfs(self.root)
            self._fs_free_value, self._fs_free_at = st.f_bavail * st.f_frsize, now
        return self._fs_free_value

    def _used(self) -> int:
        """Pages counted against max_size: present extents', being punched, reserved for writes."""
        return self._charged + self._unlinking + self._reserved

    def fits(self, nbytes: int) -> bool:
        """Whether `nbytes` fit with no eviction (no I/O most of the time: callable from the trio thread)."""
        if self.max_size and self._used() + nbytes > self.max_size:
            return False
        return not self.min_free or self._fs_free() - self._reserved - nbytes >= self.min_free

    def _evictable(self, key: tuple[bytes, int]) -> bool:
        """Not in a file read, written or held now, and not of a pinned model (call with the lock held)."""
        f = self._files[key[0]]
        return not f.holds and key[1] not in f.reading and f.present[key[1]][0] not in self._kept

    def _whole_evictable(self, f: _File) -> bool:
        """A sealed file nothing reads, writes, punches or holds now, of no pinned model (lock held)."""
        return f.idle and not any(digest in self._kept for digest, _ in f.present.values())

    def _candidates(self, protect_since: float | None, enough: int) -> tuple[list[tuple[bytes, int]], list[_File], int]:
        """What eviction may take, least recently used first, until `enough` bytes (lock held): extents of
        files still filling, to punch out, and files that were ever complete (`sealed`), to delete whole. Those
        are never punched: they may have been handed to the kernel for passthrough (by this daemon or an
        earlier one), and a process that mapped one keeps that mapping after its fd and the backing id are
        gone, so its bytes must never change; deleted, the file stays whole for such a mapping until it goes."""
        chosen: list[tuple[bytes, int]] = []
        whole: dict[bytes, _File] = {}
        seen: set[bytes] = set()  # sealed files decided on: each is weighed once, not once per extent
        freed = 0
        for key, used in self._lru.items():
            if freed >= enough or (protect_since is not None and used >= protect_since):
                break
            f = self._files[key[0]]
            if f.sealed:
                if key[0] not in seen:
                    seen.add(key[0])
                    if self._whole_evictable(f):
                        whole[key[0]] = f
                        freed += sum(pages(s, n) for s, (_, n) in f.present.items())
            elif self._evictable(key):
                chosen.append(key)
                freed += pages(key[1], f.present[key[1]][1])
        return chosen, list(whole.values()), freed

    def headroom(self, protect_since: float | None = None) -> int:
        """Bytes that fit now, counting extents that could be evicted (only those last used before
        `protect_since`, a time.monotonic() value, when given)."""
        room = self.max_size - self._used() if self.max_size else 1 << 62
        if self.min_free:
            room = min(room, self._fs_free() - self.min_free)
        with self._lock:
            room += self._candidates(protect_since, 1 << 62)[2]
        return max(0, room)

    def make_room(self, nbytes: int, protect_since: float | None = None, reserve: bool = False,
                  partial: bool = False) -> bool:
        """Evict least recently used extents until `nbytes` fit (punched out of files still filling; complete
        files deleted whole: `_candidates`); False (evicting nothing) if they cannot.

        Extents last used at or after `protect_since` are kept (prefetch must not evict what the load it serves
        has just fetched or read). `reserve` holds the room for a write in progress, so concurrent writers
        cannot together overshoot the quota. `partial` evicts what it can even when that is not enough
        (`modelfs cache gc` with pinned models)."""
        if self.max_size and nbytes > self.max_size:
            return False
        if not reserve and self.fits(nbytes):
            return True
        fs_free = self._fs_free(fresh=True) if self.min_free else 0
        with self._lock:
            need = 0
            if self.max_size:
                need = self._used() + nbytes - self.max_size
            if self.min_free:
                need = max(need, self.min_free + self._reserved + nbytes - fs_free)
            chosen, whole, freed = self._candidates(protect_since, need)
            if freed < need and not (partial and (chosen or whole)):
                return False
            if reserve:
                self._reserved += nbytes
            victims = [self._unpresent(self._files[vid], start) for vid, start in chosen]
            deleted = [(f.vid, start, n) for f in whole for start, (_, n) in f.present.items()]
            for f in whole:
                self._forget(f)
        if deleted:
            self.index.unmark([(vid, start) for vid, start, _ in deleted])
        self._punch(victims)
        count = len(victims) + len(deleted)
        if count and self._on_evict:
            self._on_evict(count, sum(v.length for v in victims) + sum(n for _, _, n in deleted))
        return freed >= need

    def _discard(self, f: _File) -> None:
        """Delete a damaged fs-verity file whole (lock held), even while reads of it are in progress (they end
        on the deleted file; the last closes its fd) or the kernel holds it for passthrough (it keeps the inode:
        a read of the rotten block fails there, never returns wrong bytes). The next load fetches it anew."""
        self._empty(f)
        del self._files[f.vid]
        self._fds.pop(f.vid, None)
        with contextlib.suppress(OSError):
            os.unlink(self.path(f.vid))
        f.orphan = True
        self._close_orphan(f)

    @staticmethod
    def _close_orphan(f: _File) -> None:
        """A deleted file's fd, closed once no read or write uses it (lock held; a passthrough hold has an fd
        of its own)."""
        if f.orphan and f.fd >= 0 and not (f.reading or f.pending or f.punching):
            os.close(f.fd)
            f.fd = -1

    def _forget(self, f: _File) -> None:
        """Evict a sealed file whole (lock held): every extent absent, the file deleted. (Its index entries
        go right after; a crash between leaves entries for a file that is gone, dropped at the next start.)"""
        self._empty(f)
        self._delete(f)

    def _empty(self, f: _File) -> None:
        """Every extent of `f` absent, uncounted and out of the eviction order (lock held), before it is
        deleted whole."""
        for start, (digest, length) in f.present.items():
            self._unindex(f, start, digest)
            self.bytes_stored -= length
            self._charged -= pages(start, length)
        f.present.clear()
        f.trusted.clear()
        f.present_bytes = 0

    def _unindex(self, f: _File, start: int, digest: bytes) -> None:
        """Take an extent out of the eviction order and the by-hash map (lock held)."""
        self._lru.pop((f.vid, start), None)
        where = self._by_hash.get(digest)
        if where is not None:
            where.discard((f.vid, start))
            if not where:
                del self._by_hash[digest]

    def _unpresent(self, f: _File, start: int) -> _Victim:
        """Mark an extent absent (lock held): from now on no read starts on it, and no write into the pages its
        punch frees. The punch frees its bytes and, out to the page edges, bytes no other extent uses (a page
        shared with a present extent stays: that extent counts it)."""
        digest, length = f.present.pop(start)
        f.present_bytes -= length
        f.trusted.discard(start)
        f.durable = False
        self._unindex(f, start, digest)
        lo, hi = start, start + length
        if lo % PAGE and not f.in_use(lo - lo % PAGE, lo, self._writing):
            lo -= lo % PAGE
        if hi % PAGE and not f.in_use(hi, hi + PAGE - hi % PAGE, self._writing):
            hi = min(f.size, hi + PAGE - hi % PAGE)
        victim = _Victim(f, start, length, lo, hi, pages(start, length))
        self.bytes_stored -= length
        self._charged -= victim.charge
        self._unlinking += victim.charge
        f.punching[start] = (lo, hi)
        return victim

    def _punch(self, victims: list[_Victim]) -> None:
        """Unrecord, then punch out, extents marked absent (invariant 1 of `index`); a file left with no extent
        and nothing using it is deleted. A read that began before the extent was marked absent ends first; a
        write into the pages being punched waits for the punch (it would otherwise punch out the new bytes).
        Each punch opens the file anew: an fd of the cache's may be closed and its number reused meanwhile."""
        if not victims:
            return
        self.index.unmark([(v.file.vid, v.start) for v in victims])
        try:
            for v in victims:
                f = v.file
                with self._lock:
                    while f.reading.get(v.start):
                        self._changed.wait()
                    live = self._files.get(f.vid) is f  # and stays so: its pending punch keeps it
                try:
                    if live:
                        own = os.open(self.path(f.vid), os.O_WRONLY | os.O_CLOEXEC)
                        try:
                            punch(own, v.lo, v.hi - v.lo)
                        finally:
                            os.close(own)
                except OSError as e:
                    log.warning("cannot free %d bytes of cache file %s: %s", v.length, f.vid.hex(), e)
                finally:
                    with self._lock:
                        del f.punching[v.start]
                        self._changed.notify_all()
                        if live and not f.present and f.idle:
                            self._delete(f)
        finally:
            with self._lock:
                self._unlinking -= sum(v.charge for v in victims)

    def writable(self) -> bool:
        """Whether the cache takes a write now (`modelfs health`): a probe file written and removed."""
        path = os.path.join(self.root, f"probe.tmp.{os.getpid()}")
        try:
            with open(path, "wb") as fh:
                fh.write(b"x")
            os.unlink(path)
            return True
        except OSError:
            return False

    # -- the scrub: extents read back from disk, and healed in place (`scrub`) -------------------------------------

    def scrub_order(self) -> list[bytes]:
        """Files of this store's domain with extents present, least recently used first."""
        with self._lock:
            seen: dict[bytes, None] = {}
            for vid, _ in self._lru:
                f = self._files.get(vid)
                if f is not None and f.domain == self.domain:
                    seen.setdefault(vid, None)
            return list(seen)

    def extents_of(self, vid: bytes) -> list[tuple[int, int]]:
        """(start, length) of the file's present extents, in file order."""
        with self._lock:
            f = self._files.get(vid)
            return sorted((s, n) for s, (_, n) in f.present.items()) if f is not None else []

    def scrub_read(self, vid: bytes, start: int, length: int) -> bool | None:
        """Read a present extent back from the disk itself (O_DIRECT where the filesystem has it: the page cache
        would answer with the bytes it holds, not those on disk) and hash it (worker thread). True if right,
        False if wrong or unreadable (nothing is dropped: `rewrite` heals it), None if it is not present."""
        with self._reading(vid, start, trusted=False) as got:
            if got is None:
                return None
            _, digest, known, _ = got
            if known != length:
                return None
            lo = start - start % PAGE
            path = self.path(vid)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
                direct = True
            except OSError:  # tmpfs and some others have no O_DIRECT: read, then let the pages go
                fd, direct = os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
            try:
                return self._digest_of(fd, lo, start, length) == digest
            except OSError as e:
                log.warning("cache file of version %s: extent at %d unreadable (%s)", vid.hex(), start,
                            e.strerror or e)
                return False
            finally:
                if not direct:
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(fd, lo, start + length - lo, os.POSIX_FADV_DONTNEED)
                os.close(fd)

    def heal_range(self, vid: bytes, starts: list[int]) -> tuple[int, int, list[tuple[int, int, bytes]]] | None:
        """The range to write anew for damaged extents `starts`: out to page edges, and out to whole extents
        again until both hold, so the write reads nothing from disk (a partial page would be read first, and a
        rotten one fails) and every byte written belongs to an extent whose hash is checked. Returns (lo, hi,
        [(start, length, hash)] of the extents in it), or None if the file is gone."""
        with self._lock:
            f = self._files.get(vid)
            starts = [s for s in starts if f is not None and s in f.present]
            if f is None or not starts:
                return None
            lo, hi = min(starts), max(s + f.present[s][1] for s in starts)
            while True:
                plo, phi = lo - lo % PAGE, min(f.size, -(-hi // PAGE) * PAGE)
                inside = [(s, n, d) for s, (d, n) in f.present.items() if s < phi and plo < s + n]
                nlo, nhi = min([lo, *(s for s, _, _ in inside)]), max([hi, *(s + n for s, n, _ in inside)])
                if (nlo, nhi) == (lo, hi) and plo >= lo and phi <= hi:
                    return lo, hi, sorted(inside)
                if (nlo, nhi) == (lo, hi):  # page edges reach past every extent: bytes no extent holds
                    return None
                lo, hi = nlo, nhi

    def rewrite(self, vid: bytes, lo: int, data: memoryview, starts: list[int]) -> bool:
        """Write right bytes (checked by the caller against each extent's hash) over [lo, lo+len(data)) of the
        file, in whole pages, where a scrub found damage: the file is healed in place, its bytes going from
        wrong or unreadable back to the version's (worker thread). False if the file is gone."""
        with self._lock:
            f = self._files.get(vid)
            if f is None or f.immutable or any(s not in f.present for s in starts):
                return False
            try:
                fd = os.dup(self._fd(f))
            except OSError:
                return False
            f.pending += 1
        try:
            with f.writer:
                write_all(fd, data, lo)
            with self._lock:
                for s in starts:
                    if s in f.present:
                        f.trusted.add(s)
                        self._writes += 1
                        f.generation[s] = self._writes
                f.durable = False  # sealed again once it is checked whole (a write moved its mtime anyway)
            return True
        finally:
            os.close(fd)
            with self._lock:
                f.pending -= 1

    # -- seals: trust that outlives the daemon (`integrity`) ------------------------------------------------------

    def _trust_sealed(self, f: _File, seal: object) -> None:
        """At start, a complete file: trusted whole if the seal recorded for it still names it as it is
        (`integrity`, invariants 2-3 and 5; one open, one fstat, on fs-verity one MEASURE). An fs-verity file is
        read-only whether or not its seal holds (a crash between turning verity on and recording the seal
        leaves one without)."""
        try:
            fd = os.open(self.path(f.vid), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            ident = integrity.identity(os.fstat(fd))
            if self.storage.kind == integrity.VERITY:
                try:
                    digest = integrity.measure_verity(fd).hex()
                except OSError:
                    return  # verity not on: checked like on any other storage
                f.immutable = True
                holds = isinstance(seal, dict) and digest == seal.get("verity") and \
                    (ident["ino"], ident["size"]) == (seal.get("ino"), seal.get("size"))
            elif self.storage.verifies:
                holds = ident == seal and not integrity.no_cow(fd)
            else:
                holds = {**ident, "boot": self._boot} == seal
        except OSError:
            return
        finally:
            os.close(fd)
        if holds:
            f.trusted.update(f.present)  # the storage checks every block read, or a daemon of this boot did
            f.durable = True
            self.files_trusted_sealed += 1

    def unsealed(self) -> list[bytes]:
        """Files to seal: complete, every extent checked by this process, no seal of them as they are now."""
        with self._lock:
            return [f.vid for f in self._files.values() if f.all_trusted and not f.durable and not f.pending]

    def seal(self, vid: bytes) -> bool:
        """Record a complete, checked file's identity, its data made durable first on verifying storage, so
        that a later daemon trusts it without reading it back (worker thread; `integrity`, invariants 1 and 5).
        False if it changed meanwhile or the storage keeps no checksums of it."""
        verity = self.storage.kind == integrity.VERITY
        with self._lock:
            f = self._files.get(vid)
            if f is None or not f.all_trusted or f.durable or f.pending or (verity and f.reading):
                return False
            was_immutable = f.immutable  # an fs-verity file already (its seal did not hold at start): stays so
            try:
                if verity:  # no writable fd may be open for verity to go on: the cache's own is closed first
                    if f.fd >= 0:
                        os.close(f.fd)
                        f.fd = -1
                        self._fds.pop(vid, None)
                    f.immutable = True  # from now on it is opened read-only
                    fd = os.open(self.path(vid), os.O_RDONLY | os.O_CLOEXEC)
                else:
                    fd = os.dup(self._fd(f))
            except OSError:
                f.immutable = was_immutable
                return False
            f.pending += 1  # not deleted under the seal
            writes = self._writes
        try:
            if self.storage.verifies:  # else the seal names this boot: an OS crash, which could lose data, ends it
                if not verity and integrity.no_cow(fd):
                    return False
                os.fdatasync(fd)
            if verity:
                integrity.enable_verity(fd)  # reads and hashes the whole file once more (SHA-256)
            ident: dict[str, int | str] = dict(integrity.identity(os.fstat(fd)))
            if verity:
                ident["verity"] = integrity.measure_verity(fd).hex()
            elif not self.storage.verifies:
                ident["boot"] = self._boot
            with self._lock:
                if not f.all_trusted or self._files.get(vid) is not f or any(
                        f.generation.get(s, 0) > writes for s in f.present):
                    return False  # an extent dropped or written again meanwhile: sealed another time
            if not self.index.seal(vid, ident):
                return False
            with self._lock:
                f.durable = f.all_trusted
            return True
        except OSError as e:
            log.debug("cache file of version %s not sealed: %s", vid.hex(), e.strerror or e)
            if verity:
                with self._lock:
                    f.immutable = was_immutable  # verity did not go on: writable again, unless it was on before
            return False
        finally:
            os.close(fd)
            with self._lock:
                f.pending -= 1

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
