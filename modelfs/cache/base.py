"""The cache's state and the reads every other part of it builds on: the file table, fds, reads in progress
(no punch, no close meanwhile), what is where, and the start-up scan that reconciles the files on disk with
the index (`FileCache` in `filecache` is the whole; this module's invariants are the package's)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator

from modelfs.cache import integrity
from modelfs.cache.cachedir import CacheDir
from modelfs.cache.diskio import PAGE, clone_range, pages
from modelfs.cache.files import File, Victim
from modelfs.catalog.index import ChunkIndex
from modelfs.stats import Stats

log = logging.getLogger(__name__)

#: Open files kept at most for reading and writing (those in use stay open; idle ones are closed first).
MAX_FDS = 256


class CacheBase:
    """The state of `FileCache` and its reads; the parts that evict, check, seal and write build on it."""

    def __init__(self, root: str, index: ChunkIndex, domain: str, identity: str = "", *, max_size: int = 0,
                 min_free: int = 0, stats: Stats | None = None, preallocate: bool = True,
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
        self.stats = stats if stats is not None else Stats()  # the mount's (evictions, damage found); else its own
        self._preallocate = preallocate  # and until the cache filesystem says it cannot
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a read ended, or a punch is done
        self._checking: set[tuple[bytes, int]] = set()  # extents a check is reading back now (`Checks.verify`)
        self._checked = threading.Condition(self._lock)  # one of them is done
        self._local = threading.local()  # each worker thread's read buffer for checks (`_digest_of`)
        self._writes = 0  # writes stored so far: each present extent's generation
        self._files: dict[bytes, File] = {}
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

    # -- layout ----------------------------------------------------------------------------------------------------

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
                    self.stats.add(corrupt_extents=len(present[vid]))
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
            f = self._files[vid] = File(vid, size, str(rec.get("domain", "")))
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

    def _trust_sealed(self, f: File, seal: object) -> None:
        """At start, a complete file whose seal may let this daemon trust it without reading it back (`seals`)."""

    # -- reading ---------------------------------------------------------------------------------------------------

    def _fd(self, f: File, create: bool = False) -> int:
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

    def _lost(self, f: File, e: OSError) -> None:
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

    # -- what is where (any thread) --------------------------------------------------------------------------------

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

    # -- forgetting ------------------------------------------------------------------------------------------------

    def _delete(self, f: File) -> None:
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
    def _close_orphan(f: File) -> None:
        """A deleted file's fd, closed once no read or write uses it (lock held; a passthrough hold has an fd
        of its own)."""
        if f.orphan and f.fd >= 0 and not (f.reading or f.pending or f.punching):
            os.close(f.fd)
            f.fd = -1

    def _unindex(self, f: File, start: int, digest: bytes) -> None:
        """Take an extent out of the eviction order and the by-hash map (lock held)."""
        self._lru.pop((f.vid, start), None)
        where = self._by_hash.get(digest)
        if where is not None:
            where.discard((f.vid, start))
            if not where:
                del self._by_hash[digest]

    def _unpresent(self, f: File, start: int) -> Victim:
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
        victim = Victim(f, start, length, lo, hi, pages(start, length))
        self.bytes_stored -= length
        self._charged -= victim.charge
        self._unlinking += victim.charge
        f.punching[start] = (lo, hi)
        return victim
