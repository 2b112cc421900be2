"""What the cache knows of one version's file (`File`), and of an extent on its way out (`Victim`). Guarded by
the cache's one lock (`base.CacheBase`)."""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass


class CacheFull(OSError):
    """No room for an extent: quota reached with every extent in use, kept or protected, or the disk is full."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.ENOSPC, why)


class File:
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
class Victim:
    """An extent marked absent, to be punched out: its bytes [start, start+length), the range the punch frees
    [lo, hi), and the pages it was counted for."""

    file: File
    start: int
    length: int
    lo: int
    hi: int
    charge: int
