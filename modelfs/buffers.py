"""GET buffers: a bounded pool of reusable extent buffers, handed to demand reads before prefetch.

`fetch.memory_budget` is real tokens here: the pool holds `count` buffers of `size` bytes (anonymous
mappings, page-aligned, made on first use and reused), and a GET runs only while it holds one buffer per
extent it fetches. Nothing is allocated per GET, so the process-wide malloc tuning this replaced (every
8 MiB buffer an mmap + munmap + page faults) is gone. An idle daemon gives their memory back (`trim`).

A buffer given back goes straight to the longest-waiting demand fetch, else the longest-waiting prefetch,
else onto the free list. Lifetime rule, relied on by `fetch`: a buffer changes hands only on the trio
thread, and its new holder writes to it only from a worker thread it starts later; so a view of a buffer
taken on the trio thread stays valid until the taker's next checkpoint (pyfuse3 copies a READ's reply out
before the handler's task yields). Trio-thread only.
"""

from __future__ import annotations

import mmap
from collections import deque
from dataclasses import dataclass, field

import trio


@dataclass(eq=False)
class _Waiter:
    event: trio.Event = field(default_factory=trio.Event)
    buf: mmap.mmap | None = None


class BufferPool:
    """`count` buffers of `size` bytes; demand waiters are served before prefetch waiters."""

    def __init__(self, count: int, size: int) -> None:
        if count < 1 or size < 1:
            raise ValueError("a buffer pool needs at least one buffer of at least one byte")
        self.total = count
        self.size = size
        self._made = 0
        self.taken = 0  # buffers handed out so far (the idle trim watches it)
        self._free: list[mmap.mmap] = []
        self._demand: deque[_Waiter] = deque()
        self._prefetch: deque[_Waiter] = deque()
        self._many = trio.Lock()

    @property
    def free(self) -> int:
        """Buffers no GET holds (made or not yet made)."""
        return len(self._free) + self.total - self._made

    @property
    def waiting(self) -> int:
        return len(self._demand) + len(self._prefetch)

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

    async def acquire(self, demand: bool) -> mmap.mmap:
        """One buffer; a prefetch waits while any demand fetch waits."""
        if self.free and (demand or not self._demand):
            buf = self._take()
            try:
                await trio.lowlevel.checkpoint()
            except BaseException:
                self.release(buf)
                raise
            return buf
        waiter = _Waiter()
        queue = self._demand if demand else self._prefetch
        queue.append(waiter)
        try:
            await waiter.event.wait()  # a releaser hands its buffer over in waiter.buf
        except BaseException:
            if waiter.buf is not None:
                self.release(waiter.buf)  # granted, but we are cancelled: pass it on
            else:
                queue.remove(waiter)
            raise
        assert waiter.buf is not None
        return waiter.buf

    async def acquire_many(self, n: int) -> list[mmap.mmap]:
        """`n` buffers at prefetch priority (one coalesced GET). One task at a time gathers several, so two
        can never each hold part of what the other waits for."""
        n = min(n, self.total)
        async with self._many:
            got: list[mmap.mmap] = []
            try:
                while len(got) < n:
                    got.append(await self.acquire(demand=False))
            except BaseException:
                for buf in got:
                    self.release(buf)
                raise
            return got

    def release(self, buf: mmap.mmap) -> None:
        queue = self._demand or self._prefetch
        if queue:
            waiter = queue.popleft()
            waiter.buf = buf
            waiter.event.set()
        else:
            self._free.append(buf)
