"""Space: present extents of every domain count against `cache.max_size` in whole pages, and the cache
filesystem keeps `cache.min_free` free. Room is made least recently used first: a file still filling gives up
single extents, punched out of it (out to page edges no other extent uses), never one being read; a complete
file is deleted whole, never punched, unless a passthrough open holds it (`hold`)."""

from __future__ import annotations

import contextlib
import logging
import os
import time

from modelfs.cache.base import CacheBase
from modelfs.cache.diskio import pages, punch
from modelfs.cache.files import File, Victim

log = logging.getLogger(__name__)


class Space(CacheBase):
    """The quota, eviction and hole punching of `FileCache`."""

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

    def _whole_evictable(self, f: File) -> bool:
        """A sealed file nothing reads, writes, punches or holds now, of no pinned model (lock held)."""
        return f.idle and not any(digest in self._kept for digest, _ in f.present.values())

    def _candidates(self, protect_since: float | None, enough: int) -> tuple[list[tuple[bytes, int]], list[File], int]:
        """What eviction may take, least recently used first, until `enough` bytes (lock held): extents of
        files still filling, to punch out, and files that were ever complete (`sealed`), to delete whole. Those
        are never punched: they may have been handed to the kernel for passthrough (by this daemon or an
        earlier one), and a process that mapped one keeps that mapping after its fd and the backing id are
        gone, so its bytes must never change; deleted, the file stays whole for such a mapping until it goes."""
        chosen: list[tuple[bytes, int]] = []
        whole: dict[bytes, File] = {}
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
        if count:
            freed_bytes = sum(v.length for v in victims) + sum(n for _, _, n in deleted)
            self.stats.add(evictions=count, evicted_bytes=freed_bytes)
        return freed >= need

    def _discard(self, f: File) -> None:
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

    def _forget(self, f: File) -> None:
        """Evict a sealed file whole (lock held): every extent absent, the file deleted. (Its index entries
        go right after; a crash between leaves entries for a file that is gone, dropped at the next start.)"""
        self._empty(f)
        self._delete(f)

    def _empty(self, f: File) -> None:
        """Every extent of `f` absent, uncounted and out of the eviction order (lock held), before it is
        deleted whole."""
        for start, (digest, length) in f.present.items():
            self._unindex(f, start, digest)
            self.bytes_stored -= length
            self._charged -= pages(start, length)
        f.present.clear()
        f.trusted.clear()
        f.present_bytes = 0

    def _punch(self, victims: list[Victim]) -> None:
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
