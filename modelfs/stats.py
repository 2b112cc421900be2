"""Counters of one daemon run, read by `modelfs stats` (through an xattr on the mount root)."""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left
from dataclasses import dataclass, field, fields

log = logging.getLogger("modelfs.cache")


@dataclass
class Stats:
    """Monotonic counters; `add` is safe from worker threads.

    `bytes_served`, `cache_hits` and `cache_misses` are bumped per READ on the trio thread with a plain
    `+=` (no lock on the hot path); nothing else writes them, so they need none.
    """

    bytes_served: int = 0
    bytes_fetched: int = 0
    gets: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    dedup_bytes_saved: int = 0
    corrupt_extents: int = 0
    store_errors: int = 0
    store_retries: int = 0
    version_changes: int = 0
    cache_write_errors: int = 0
    cache_full_skips: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    read_timeouts: int = 0
    offline_misses: int = 0
    prefetch_bytes: int = 0
    pushed_bytes: int = 0
    push_skipped_bytes: int = 0
    push_errors: int = 0
    internal_errors: int = 0
    passthrough_opens: int = 0
    passthrough_refused: int = 0
    open_waits: int = 0
    open_wait_expired: int = 0
    files_corrupt: int = 0
    files_checked_at_start: int = 0  # complete cache files read back and checked before any open
    scrub_bytes: int = 0  # bytes the scrub read back from disk and hashed
    scrub_damaged: int = 0  # extents the scrub found wrong or unreadable on disk
    scrub_healed: int = 0  # extents the scrub wrote anew from the store's bytes
    shared_hits: int = 0
    shared_misses: int = 0
    shared_bytes_read: int = 0
    shared_bytes_written: int = 0
    shared_errors: int = 0
    shared_write_errors: int = 0
    shared_corrupt: int = 0
    shared_writeback_dropped: int = 0
    shared_waits: int = 0
    shared_polls: int = 0
    shared_wait_expired: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def file_damaged(self, key: str, extents: int) -> None:
        """A cache file's check before the kernel gets it found damaged extents (dropped: fetched again)."""
        self.add(files_corrupt=1)
        log.warning("cache file of %s: %d damaged extents dropped; they are fetched again", key, extents)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


#: Upper bounds (seconds) of the buckets of `modelfs_read_wait_seconds`.
READ_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ReadWaits:
    """How long demand READs waited for their bytes (the loader sits in D state that long).

    A READ answered on the trio thread from the page cache (the common case) counts as no wait with one
    integer add (`instant`), no clock read; only READs that await (a disk load, a GET) are timed and
    `observe`d. Trio thread only; a scrape from another thread may see one READ half counted.
    """

    __slots__ = ("counts", "instant", "max", "total")

    def __init__(self) -> None:
        self.instant = 0
        self.counts = [0] * (len(READ_WAIT_BUCKETS) + 1)  # timed READs per bucket (not cumulative); last: +Inf
        self.total = 0.0
        self.max = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(READ_WAIT_BUCKETS, seconds)] += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def buckets(self) -> list[int]:
        """Cumulative counts per bucket (the last: +Inf, every READ), instant READs in the first."""
        out, acc = [], self.instant
        for n in self.counts:
            acc += n
            out.append(acc)
        return out

    def quantile(self, q: float) -> float:
        """An upper bound of the q-quantile: its bucket's bound, at most the largest wait seen."""
        cum = self.buckets()
        if not cum[-1]:
            return 0.0
        rank = q * cum[-1]
        if rank <= self.instant:
            return 0.0
        for bound, acc in zip(READ_WAIT_BUCKETS, cum, strict=False):
            if acc >= rank:
                return min(bound, self.max)
        return self.max

    def counters(self) -> dict[str, int]:
        """For `modelfs stats`: p50, p99 and max, in milliseconds."""
        return {"read_wait_p50_ms": round(self.quantile(0.5) * 1000),
                "read_wait_p99_ms": round(self.quantile(0.99) * 1000),
                "read_wait_max_ms": round(self.max * 1000)}


def human(n: float) -> str:
    """Bytes for people: 1.50 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)
