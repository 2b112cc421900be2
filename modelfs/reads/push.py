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
shared with the trio thread under a lock. What to push is `Pusher`'s: each extent of an open file once, less
the bytes READs already put in the page cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable

import trio

from modelfs.catalog.version import FileVersion
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


class Pusher:
    """Which bytes of the extents a prefetch job fetched for an open file go into the page cache: each extent
    once per open file (as far as READs tell: a READ of a pushed extent means the kernel lost it), less the
    bytes READs were answered with (in a cold load a loader often reads an extent as it lands, before its
    push, which would copy it into the kernel twice). Trio thread; pushes in threads of their own (one
    waiting in the kernel must never hold a demand read's thread)."""

    def __init__(self, gate: PushGate, whole: Callable[[FileVersion, int, int], Awaitable[memoryview | None]],
                 is_open: Callable[[int], bool]) -> None:
        self.gate = gate
        self._whole = whole  # an extent's bytes in memory (`extents.Extents.whole`)
        self._is_open = is_open
        self._limiter = trio.CapacityLimiter(2)
        self._pushed: dict[int, set[int]] = {}  # inode -> extent starts in the page cache (as far as we know)
        # inode -> extent start -> [lo, hi): bytes READs of an open file were answered with (not to push)
        self._served: dict[int, dict[int, list[int]]] = {}

    @property
    def on(self) -> bool:
        return self.gate.is_open

    def served(self, inode: int, offset: int, size: int, start: int, length: int) -> None:
        """What a READ (at `offset`, `size` bytes, in the extent at `start`) tells the pusher. The kernel asks
        for bytes we pushed: they were evicted (or raced our push), so forget them and a later job pushes
        them again. And the bytes this READ is answered with are in the page cache now: a push of its
        extent leaves them out. One [lo, hi) range per extent, grown by the contiguous READs of a
        sequential reader."""
        pushed = self._pushed.get(inode)
        if pushed:
            pushed.discard(start)
        end = min(offset + size, start + length)
        served = self._served.get(inode)
        if served is None:
            served = self._served[inode] = {}
        got = served.get(start)
        if got is not None and got[0] <= end and offset <= got[1]:
            got[0] = min(got[0], offset)
            got[1] = max(got[1], end)
        elif got is None or end - offset > got[1] - got[0]:
            served[start] = [offset, end]

    def closed(self, inode: int) -> None:
        """The file's last handle closed: what READs answered no longer matters."""
        self._served.pop(inode, None)

    def forget(self, inode: int) -> None:
        self._pushed.pop(inode, None)
        self._served.pop(inode, None)

    async def push(self, inode: int, ver: FileVersion, start: int) -> None:
        """Hand a prefetched extent of open file `inode` to the page cache (through the gate), once."""
        if not self.gate.is_open or start in self._pushed.get(inode, ()) or not self._is_open(inode):
            return
        _, length = ver.extent_at(start)
        lo, hi = self._served.get(inode, {}).get(start, (start, start))
        gaps = [(a, b) for a, b in ((start, lo), (hi, start + length)) if b > a]
        pushed = True
        if gaps:
            view = await self._whole(ver, start, length)
            pushed = view is not None and await trio.to_thread.run_sync(
                self._push_gaps, inode, start, view, gaps, limiter=self._limiter)
        if pushed:
            self._pushed.setdefault(inode, set()).add(start)

    def _push_gaps(self, inode: int, start: int, view: memoryview, gaps: list[tuple[int, int]]) -> bool:
        """From a push thread: the parts of an extent no READ has answered yet, into the page cache."""
        return all(self.gate.push(inode, a, view[a - start:b - start], self._is_open) for a, b in gaps)
