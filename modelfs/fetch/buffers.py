"""GET buffers: a bounded pool of reusable extent buffers, and the policy that gives demand reads the link.

`fetch.memory_budget` is real tokens here: the pool holds `count` buffers of `size` bytes (anonymous
mappings, page-aligned, made on first use and reused), and a GET runs only while it holds one buffer per
extent it fetches. Nothing is allocated per GET but its request, so the process-wide malloc tuning this
replaced (every 8 MiB buffer an mmap + munmap + page faults) is gone. An idle daemon gives their memory
back (`trim`).

Demand reads get bandwidth, not only buffers (a 60-minute soak had loaders in D state for up to 64 s while
their GETs waited for, or shared the link with, up to 32 prefetch GETs):

- reserve: prefetch holds at most `count - reserve` buffers, so a demand GET never waits for a buffer a
  prefetch GET holds (one stalled at the store holds it until its read timeout): it starts at once;
- while a demand GET waits or runs, prefetch starts a new GET only while it holds fewer than `cap`
  buffers (GETs already running finish), so the demand GET shares the link with few others. At least one
  prefetch GET may always run, so prefetch is slowed while demand GETs run, never stopped;
- a buffer given back goes to the longest-waiting demand request, then (as the rules above allow) to the
  longest-waiting prefetch request; nobody overtakes the head of its queue, and a request for several
  buffers (a coalesced GET) is granted whole, so nothing waits while holding part of what it needs.

Lifetime rule, relied on by `fetch`: a buffer changes hands only on the trio thread, and its new holder
writes to it only from a worker thread it starts later; so a view of a buffer taken on the trio thread
stays valid until the taker's next checkpoint (pyfuse3 copies a READ's reply out before the handler's task
yields). Trio-thread only.
"""

from __future__ import annotations

import mmap
import threading
from collections import deque

import trio


class Ask:
    """A request for `n` buffers, queued until granted (`bufs`). `demand` may be raised while it waits
    (`BufferPool.promote`: a demand read joined the flight that waits for it)."""

    __slots__ = ("bufs", "demand", "event", "n")

    def __init__(self, n: int, demand: bool) -> None:
        self.n = n
        self.demand = demand
        self.event = trio.Event()
        self.bufs: list[mmap.mmap] | None = None

    @property
    def granted(self) -> bool:
        return self.bufs is not None


class BufferPool:
    """`count` buffers of `size` bytes; `reserve` of them only for demand GETs; while demand GETs wait or
    run, prefetch starts GETs only below `cap` buffers held (the module docstring says why)."""

    def __init__(self, count: int, size: int, reserve: int = 0, cap: int | None = None) -> None:
        if count < 1 or size < 1:
            raise ValueError("a buffer pool needs at least one buffer of at least one byte")
        self.total = count
        self.size = size
        # Prefetch always keeps at least one buffer: a pool of one has no reserve.
        self.reserve = max(0, min(reserve, count - 1))
        self.prefetch_max = count - self.reserve
        self.cap = self.prefetch_max if cap is None else max(1, min(cap, self.prefetch_max))
        self._made = 0
        self.taken = 0  # buffers handed out so far (the idle trim watches it)
        self._free: list[mmap.mmap] = []
        self._demand: deque[Ask] = deque()
        self._prefetch: deque[Ask] = deque()
        self._held_demand = 0
        self._prefetch_bufs: set[mmap.mmap] = set()  # buffers held by prefetch GETs

    @property
    def free(self) -> int:
        """Buffers no GET holds (made or not yet made)."""
        return self.total - self._held_demand - len(self._prefetch_bufs)

    @property
    def made_bytes(self) -> int:
        """Memory of the buffers made so far: the pool's share of the daemon's RSS, at most `total` x `size`
        (less after `trim`, until they are used again)."""
        return self._made * self.size

    @property
    def waiting(self) -> int:
        return len(self._demand) + len(self._prefetch)

    @property
    def held_by_prefetch(self) -> int:
        return len(self._prefetch_bufs)

    @property
    def demand_active(self) -> bool:
        """A demand GET waits for buffers or holds some (its GET runs)."""
        return bool(self._held_demand or self._demand)

    def trim(self) -> int:
        """Give the memory of every free buffer back to the system (the daemon is idle); they fault in
        again, zeroed, when next used. Returns the bytes given back."""
        for buf in self._free:
            buf.madvise(mmap.MADV_DONTNEED)
        return len(self._free) * self.size

    def _take(self) -> mmap.mmap:
        self.taken += 1
        if self._free:
            return self._free.pop()
        self._made += 1
        return mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def _grant(self, ask: Ask) -> None:
        bufs = [self._take() for _ in range(ask.n)]
        if ask.demand:
            self._held_demand += ask.n
        else:
            self._prefetch_bufs.update(bufs)
        ask.bufs = bufs
        ask.event.set()

    def _prefetch_may_take(self, n: int) -> bool:
        """Whether a prefetch GET needing `n` buffers may start now (no demand request waits)."""
        held = len(self._prefetch_bufs)
        limit = self.cap if self._held_demand else self.prefetch_max
        # Past the cap only when prefetch holds nothing: a coalesced GET larger than the cap still runs.
        return n <= self.free and (held + n <= limit or held == 0)

    def _dispatch(self) -> None:
        """Grant what the rules allow, each queue in order (its head is never overtaken)."""
        while self._demand and self._demand[0].n <= self.free:
            self._grant(self._demand.popleft())
        if self._demand:
            return  # prefetch takes nothing while a demand request waits
        while self._prefetch and self._prefetch_may_take(self._prefetch[0].n):
            self._grant(self._prefetch.popleft())

    def ask(self, n: int, demand: bool) -> Ask:
        """A request for `n` buffers (at most what its kind may ever hold), not yet queued: `take` it."""
        return Ask(max(1, min(n, self.total if demand else self.prefetch_max)), demand)

    async def take(self, ask: Ask) -> list[mmap.mmap]:
        """Queue `ask` and wait until it is granted; cancelled, it holds nothing."""
        (self._demand if ask.demand else self._prefetch).append(ask)
        self._dispatch()
        try:
            if ask.bufs is None:
                await ask.event.wait()  # a releaser granted it
            else:
                await trio.lowlevel.checkpoint()
        except BaseException:
            if ask.bufs is not None:
                self.release_all(ask.bufs)  # granted, but we are cancelled: pass them on
            else:
                (self._demand if ask.demand else self._prefetch).remove(ask)
                self._dispatch()  # it may have been the head others waited behind
            raise
        assert ask.bufs is not None
        return ask.bufs

    async def acquire(self, demand: bool) -> mmap.mmap:
        """One buffer, at demand or prefetch priority."""
        return (await self.take(self.ask(1, demand)))[0]

    async def acquire_many(self, n: int, demand: bool = False) -> list[mmap.mmap]:
        """`n` buffers for one GET (coalesced extents, or an extent larger than a buffer), granted whole."""
        return await self.take(self.ask(n, demand))

    def promote(self, ask: Ask) -> None:
        """A demand read now waits on the GET this request is for: serve it as demand (a no-op once
        granted or already demand). It keeps its place behind the demand requests already waiting."""
        if ask.demand or ask.bufs is not None:
            return
        try:
            self._prefetch.remove(ask)
        except ValueError:
            return  # not queued yet: `take` queues it as demand
        finally:
            ask.demand = True
        self._demand.append(ask)
        self._dispatch()

    def release(self, buf: mmap.mmap) -> None:
        if buf in self._prefetch_bufs:
            self._prefetch_bufs.discard(buf)
        else:
            self._held_demand -= 1
        self._free.append(buf)
        self._dispatch()

    def release_all(self, bufs: list[mmap.mmap]) -> None:
        for buf in bufs:
            self.release(buf)


class Lease:
    """Pooled buffers held by one GET (`fetch`), by its worker thread and by its flight task; the last to
    let go hands them back (on the trio thread).

    The thread's hold is settled exactly once, whatever the timing of a cancellation: by the thread when
    it ends, or, if the thread never got to start (cancelled while queued), by the flight task, in which
    case a thread that starts after all does nothing.
    """

    __slots__ = ("_lock", "_thread", "bufs", "holders", "pool")

    def __init__(self, pool: BufferPool, bufs: list[mmap.mmap]) -> None:
        self.pool = pool
        self.bufs = bufs
        self.holders = 2
        self._lock = threading.Lock()
        self._thread = "queued"  # -> "running" (the thread drops its hold) or "void" (the flight did)

    def thread_begins(self) -> bool:
        """From the worker thread: False if the flight already gave up on it (then do nothing)."""
        with self._lock:
            if self._thread == "void":
                return False
            self._thread = "running"
            return True

    def thread_never_ran(self) -> None:
        """From the flight task, after the thread call raised: settle the thread's hold if it never began."""
        with self._lock:
            if self._thread != "queued":
                return
            self._thread = "void"
        self.drop()

    def drop(self) -> None:
        self.holders -= 1
        if self.holders == 0:
            for buf in self.bufs:
                self.pool.release(buf)
            self.bufs = []
