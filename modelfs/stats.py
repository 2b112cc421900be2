"""Counters of one daemon run, read by `modelfs stats` (through an xattr on the mount root)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


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
    corrupt_blocks: int = 0
    store_errors: int = 0
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
    shared_hits: int = 0
    shared_misses: int = 0
    shared_bytes_read: int = 0
    shared_bytes_written: int = 0
    shared_errors: int = 0
    shared_write_errors: int = 0
    shared_corrupt: int = 0
    shared_writeback_dropped: int = 0
    shared_waits: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


def human(n: float) -> str:
    """Bytes for people: 1.50 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)
