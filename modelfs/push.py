"""Page-cache push, gated: extents go into the kernel page cache only while the daemon answers requests.

Why a gate: FUSE_NOTIFY_STORE (pyfuse3.notify_store) holds the connection's `killsb` and sleeps
uninterruptibly in `folio_lock` on any folio the kernel's readahead inserted locked for a READ not yet
answered; only the answer to that READ, or an abort of the connection, wakes it, and a thread in that
state survives SIGKILL and keeps /dev/fuse open. So a push must never be in the kernel once the daemon
stops answering READs. Pushes go in chunks of at most CHUNK bytes; before each chunk the gate, and whether
the file is still open, are checked again. Shutdown closes the gate and waits (bounded) for the chunks in
the kernel to finish while requests are still answered (`mount.Daemon`), and only then stops serving. If
a chunk is still stuck after that, a READ was lost for good: the last resort, in `mount`, aborts the
connection through fusectl so that nothing stays in D state.

`push` runs in worker threads (under their own limiter, apart from demand reads); the gate's state is
shared with the trio thread under a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import trio

from modelfs.stats import Stats

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PushFn = Callable[[int, int, memoryview], None]


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 if unknown: then nothing is pushed)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PushGate:
    """Pushes whole extents in CHUNK pieces through `push_fn` while open; `close` stops new chunks."""

    def __init__(self, push_fn: PushFn, stats: Stats, min_available: int) -> None:
        self._push_fn = push_fn
        self.stats = stats
        self.min_available = min_available
        self._lock = threading.Lock()
        self._open = True
        self.in_kernel = 0  # chunks inside notify_store right now

    @property
    def is_open(self) -> bool:
        return self._open

    def push(self, inode: int, start: int, data: memoryview, still_open: Callable[[int], bool]) -> bool:
        """From a push thread: hand `data` (the extent at `start`) to the page cache, chunk by chunk.
        True if all of it went in; False if memory is short, the gate closed, the file was released or
        the kernel refused a chunk."""
        if mem_available() - len(data) < self.min_available:
            self.stats.add(push_skipped_bytes=len(data))
            return False
        pos = 0
        while pos < len(data):
            if not still_open(inode):
                return False
            with self._lock:
                if not self._open:
                    return False
                self.in_kernel += 1
            n = min(CHUNK, len(data) - pos)
            try:
                self._push_fn(inode, start + pos, data[pos:pos + n])
            except OSError as e:
                self.stats.add(push_errors=1)
                log.debug("page-cache push of inode %d at %d failed: %s", inode, start + pos, e)
                return False
            finally:
                with self._lock:
                    self.in_kernel -= 1
            self.stats.add(pushed_bytes=n)
            pos += n
        return True

    def close(self) -> None:
        """No chunk enters the kernel from now on (chunks already there finish)."""
        with self._lock:
            self._open = False

    async def drained(self, timeout: float) -> bool:
        """After `close`: wait up to `timeout` seconds for the chunks in the kernel; True if none is left."""
        deadline = time.monotonic() + timeout
        while self.in_kernel and time.monotonic() < deadline:
            await trio.sleep(0.02)
        return not self.in_kernel
