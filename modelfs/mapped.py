"""Verified blocks in memory the daemon owns: a bounded LRU of block copies, served on the trio thread.

Why copies and not mappings of the block files: a byte on disk can change under the daemon at any time
(a write in place, a truncation, bit rot or a bad sector under pages the kernel evicted and reads again).
A mapping of the file shows every such change without a check. So every block is read from disk into
private anonymous memory (`cache.BlockCache.load`: O_DIRECT, or the page cache when it already holds the
block), hashed there, and served only from there: the bytes a READ gets are the bytes that were hashed,
whatever happens to the file afterwards. Each read from disk is hashed again (xxh3, about a tenth of the
cost of the read itself), so a block that comes back from disk after its copy was dropped is checked too.

A READ whose extent is held here is answered with a memoryview slice of the copy: no I/O, no thread hop,
no copy in Python (pyfuse3's reply is the one copy). Only a block not held goes to a worker thread.

Held ahead: the prefetcher loads and verifies blocks before the loader reads them (`put(ahead=True)`),
so each block is read from disk and hashed once. Such a copy is not dropped to make room for another
one loaded ahead until a READ has used it; the prefetcher waits for room instead (`reserve_ahead`),
which keeps its lead over the loader within half the pool (the other half holds the blocks being read).
A wait that times out (a loader that stopped reading) gives up that protection for every copy held.

Lifetime: a copy stays valid while any view of it is alive (the views keep its anonymous mapping
alive), so dropping it from the pool never invalidates a READ or a push in progress; its memory goes
back to the system when the last view is gone. Nothing here blocks; trio-thread only, except `private`
and `private_copy`, which any thread may call.
"""

from __future__ import annotations

import mmap
from collections import OrderedDict

import trio

#: Memory for blocks of at least this size asks for transparent huge pages: 512 times fewer page faults
#: to fill a copy (in a measurement here, reading 8 MiB blocks with O_DIRECT into fresh copies cost
#: 0.11 CPU-ms per MiB with huge pages, 0.22 without, and 0.5-0.7 for the file mappings this replaced).
HUGE = 2 << 20
ALIGN = 4096  # O_DIRECT's alignment of buffer, offset and length (the largest logical block size)


def private(size: int) -> mmap.mmap:
    """Anonymous memory of at least `size` bytes, rounded up to ALIGN (page-aligned: fit for O_DIRECT)."""
    m = mmap.mmap(-1, max(ALIGN, -(-size // ALIGN) * ALIGN), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size >= HUGE and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # a kernel without transparent huge pages: small pages do
    return m


def private_copy(data: bytes | memoryview) -> memoryview:
    """A copy of `data` in memory of its own (bytes the caller already hashed, e.g. a GET buffer that goes
    back to its pool): a view of exactly len(data) bytes."""
    m = private(len(data))
    view = memoryview(m)[:len(data)]
    view[:] = data
    return view


class _Block:
    __slots__ = ("ahead", "length", "view")

    def __init__(self, view: memoryview, ahead: bool) -> None:
        self.view = view
        self.length = len(view)
        self.ahead = ahead  # loaded ahead of the reader, not read yet


class MappedBlocks:
    """Up to `budget` bytes of verified block copies, least recently used dropped first."""

    def __init__(self, budget: int, max_maps: int = 256) -> None:
        self.budget = budget
        self.max_maps = max_maps
        self.bytes = 0
        self._maps: OrderedDict[bytes, _Block] = OrderedDict()
        self._ahead_bytes = 0  # loaded ahead and not read yet, plus being loaded ahead now (reserved)
        self._ahead_count = 0
        self._room = trio.Event()

    def __len__(self) -> int:
        return len(self._maps)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._maps

    def view(self, digest: bytes, offset: int, size: int) -> memoryview | None:
        """Bytes [offset, offset+size) of a held block, else None."""
        m = self._maps.get(digest)
        if m is None:
            return None
        self._maps.move_to_end(digest)
        if m.ahead:
            self._used(m)
        return m.view[offset:offset + size]

    def whole(self, digest: bytes) -> memoryview | None:
        """A whole held block (for a push from a worker thread: the view keeps the copy alive)."""
        m = self._maps.get(digest)
        return None if m is None else m.view

    def _used(self, m: _Block) -> None:
        m.ahead = False
        self._ahead_bytes -= m.length
        self._ahead_count -= 1
        self._room.set()

    def _ahead_fits(self, length: int) -> bool:
        # Half the pool at most, so blocks being read (a READ per MiB, several per block) keep their room.
        return (self._ahead_bytes + length <= self.budget // 2 or not self._ahead_count) \
            and self._ahead_count < self.max_maps // 2

    async def reserve_ahead(self, length: int, patience: float) -> None:
        """Wait until a block of `length` bytes can be loaded ahead without dropping one not read yet
        (READs of blocks loaded ahead make the room), then reserve that room; `unreserve` it once the
        copy is put (or failed). After `patience` seconds the wait gives up on the loader: every block
        loaded ahead then counts as used."""
        with trio.move_on_after(patience) as waited:
            while not self._ahead_fits(length):
                if self._room.is_set():
                    self._room = trio.Event()
                await self._room.wait()
        if waited.cancelled_caught:
            self.release_ahead()
        self._ahead_bytes += length
        self._ahead_count += 1

    def unreserve(self, length: int) -> None:
        self._ahead_bytes -= length
        self._ahead_count -= 1
        self._room.set()

    def release_ahead(self) -> None:
        """Treat every block loaded ahead as used (its reader stopped): they may be dropped again."""
        for m in self._maps.values():
            if m.ahead:
                self._used(m)

    def put(self, digest: bytes, view: memoryview, ahead: bool = False, evict: bool = True) -> memoryview:
        """Keep `view` (a verified copy of block `digest`, `private` memory) and return it.

        Room is made by dropping least recently used copies that READs have used; a copy made for a READ
        (`evict`) may also drop ones loaded ahead and not read yet, if nothing else is left. A copy that
        does not fit is not kept: its view is valid for as long as the caller holds it."""
        self.discard(digest)
        m = _Block(view, ahead)
        while not self._fits(m.length):
            victim = next((d for d, old in self._maps.items() if not old.ahead), None)
            if victim is None and evict and not ahead:
                victim = next(iter(self._maps), None)
            if victim is None:
                return m.view
            self.discard(victim)
        self._maps[digest] = m
        self.bytes += m.length
        if ahead:
            self._ahead_bytes += m.length
            self._ahead_count += 1
        return m.view

    def _fits(self, length: int) -> bool:
        return self.bytes + length <= self.budget and len(self._maps) < self.max_maps

    def digests(self) -> list[bytes]:
        """The blocks held now."""
        return list(self._maps)

    def discard(self, digest: bytes) -> None:
        """Forget a block's copy; views already handed out stay valid."""
        m = self._maps.pop(digest, None)
        if m is not None:
            self.bytes -= m.length
            if m.ahead:
                self._used(m)

    def clear(self) -> None:
        for digest in list(self._maps):
            self.discard(digest)
