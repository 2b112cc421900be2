"""Checks: an extent this process did not write is read back and hashed before it is served (`verify`); one
found damaged is punched out, unrecorded and fetched again (`drop`). The scrub's reads of the disk itself,
and its in-place heal of what they found (`scrub_read`, `heal_range`, `rewrite`)."""

from __future__ import annotations

import contextlib
import logging
import mmap
import os

import xxhash

from modelfs.cache.diskio import PAGE, read_all, write_all
from modelfs.cache.space import Space
from modelfs.digest import content_hash
from modelfs.mapped import private

log = logging.getLogger(__name__)

#: What a check reads at a time into its thread's buffer (`Checks._digest_of`): the hash is streamed.
CHECK_CHUNK = 1 << 20


class Checks(Space):
    """Reads that check what they read, and the scrub's repair, of `FileCache`."""

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
        False then, or if it is not present. One check of an extent at a time: a second (the check at start and
        an open's, say) waits for the first's answer instead of reading the bytes again."""
        return self.check_once(vid, start, length) is True

    def check_once(self, vid: bytes, start: int, length: int) -> bool | None:
        """As `verify`, telling who found what: True if the extent is trusted (checked now, or before), False
        if this call found it damaged (and dropped it), None if it is not present (never was, or another
        check dropped it: that one counts the damage)."""
        key = (vid, start)
        with self._lock:
            while key in self._checking:
                self._checked.wait()
            f = self._files.get(vid)
            if f is None or start not in f.present:
                return None
            if start in f.trusted:
                return True
            self._checking.add(key)
        try:
            return self._verify(vid, start, length, None)
        finally:
            with self._lock:
                self._checking.discard(key)
                self._checked.notify_all()

    def to_check_at_start(self, budget: int) -> list[tuple[bytes, str]]:
        """(vid, key) of the complete files of this source that are not trusted yet, the ones loaded most
        recently first, up to `budget` bytes: directory by directory (newest first), the files of one in name
        order (a checkpoint's shards in the order a loader opens them). Worker thread (reads the index)."""
        records = self.index.versions()
        with self._lock:
            files = [(f.vid, f.size) for f in self._files.values() if f.complete and len(f.trusted) < len(f.present)]
        dirs: dict[str, list[tuple[str, bytes, int]]] = {}
        newest: dict[str, float] = {}
        for vid, size in files:
            rec = records.get(vid, {})
            if self.identity and rec.get("source", self.identity) != self.identity:
                continue
            key = str(rec.get("key", ""))
            parent = key.rpartition("/")[0]
            dirs.setdefault(parent, []).append((key, vid, size))
            newest[parent] = max(newest.get(parent, 0.0), float(str(rec.get("last_used", 0))))
        out: list[tuple[bytes, str]] = []
        for parent in sorted(dirs, key=lambda d: -newest[d]):
            for key, vid, size in sorted(dirs[parent]):
                if size > budget:
                    return out
                budget -= size
                out.append((vid, key))
        return out

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
            self.stats.add(corrupt_extents=1)
            return
        log.warning("cache file of version %s: extent at %d is %s: dropped, will refetch", vid.hex(), start, why)
        self._punch([victim])
        self.stats.add(corrupt_extents=1)

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
