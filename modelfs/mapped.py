"""Mapped blocks: verified cache blocks mapped read-only, a bounded LRU, served on the trio thread.

A READ whose extent is mapped is answered with a memoryview slice of the mapping: no I/O, no thread hop,
no copy in Python (pyfuse3's reply is the one copy that must stay). Only the first serve of a block in
this daemon goes to a worker thread, which opens, maps and verifies it (`cache.BlockCache.map`).

Pages of a mapping can leave memory (the kernel reclaims the block file's page cache). A READ over pages
that are not resident would fault them in from disk on the trio thread, so `view` asks mincore first and
answers None for such a range: the caller then faults them in from a worker thread (`populate`) and
answers from the same mapping. The check costs two libc calls per READ (measured in `make bench`'s read ceiling).

Each mapping holds one file descriptor (CPython's mmap keeps a duplicate of the fd it mapped), so the
pool is bounded by count (`max_maps`) as well as by bytes: small manifest extents cannot run the daemon
out of descriptors.

Mapped ahead: the prefetcher maps and verifies blocks before the loader reads them (`put(ahead=True)`),
so each block is read from disk, hashed and mapped once. Such a mapping is not dropped to make room for
another one mapped ahead until a READ has used it; the prefetcher waits for room instead (`reserve_ahead`),
which keeps its lead over the loader within half the pool (the other half holds the blocks being read).
A wait that times out (a loader that stopped reading) gives up that protection for every mapping held.

Lifetime: a mapping stays valid while any view of it is alive (Python refcounts the mmap object), so
dropping it from the pool never invalidates a READ in progress, and a block file evicted or dropped after
it was mapped stays readable through its mapping. Nothing here blocks; trio-thread only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
from collections import OrderedDict

import trio

PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int
_libc.memchr.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
_libc.memchr.restype = ctypes.c_void_p


class _PyBuffer(ctypes.Structure):
    """CPython's Py_buffer, to read a mapping's address (mmap objects do not expose it)."""

    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]


def address_of(m: mmap.mmap) -> int:
    """The start address of a mapping (valid for as long as the mmap object lives)."""
    pb = _PyBuffer()
    _get_buffer(m, ctypes.byref(pb), 0)
    try:
        return int(pb.buf or 0)
    finally:
        _release_buffer(ctypes.byref(pb))


class _Mapping:
    __slots__ = ("addr", "ahead", "length", "mm", "view")

    def __init__(self, mm: mmap.mmap, ahead: bool) -> None:
        self.mm = mm
        self.view = memoryview(mm)
        self.length = len(mm)
        self.addr = address_of(mm) if self.length else 0
        self.ahead = ahead  # mapped ahead of the reader, not read yet


def populate(m: _Mapping, offset: int, size: int) -> None:
    """Fault in the pages of [offset, offset+size) of a mapping; blocks on the disk: worker threads only.

    MADV_POPULATE_READ reads the pages in and reports a failure (EFAULT) where a plain touch would raise
    SIGBUS; touching each page is the fallback only where the kernel lacks it (EINVAL)."""
    first = offset - offset % PAGE
    end = min(m.length, offset + size)
    try:
        m.mm.madvise(MADV_POPULATE_READ, first, end - first)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        for page in range(first, end, PAGE):
            m.mm[page]


class MappedBlocks:
    """Up to `budget` bytes of block mappings, least recently used dropped first."""

    def __init__(self, budget: int, max_maps: int = 256, max_read: int = 1 << 20) -> None:
        self.budget = budget
        self.max_maps = max_maps
        self.bytes = 0
        self._maps: OrderedDict[bytes, _Mapping] = OrderedDict()
        self._ahead_bytes = 0  # mapped ahead and not read yet, plus being mapped ahead now (reserved)
        self._ahead_count = 0
        self._room = trio.Event()
        self._vec = ctypes.create_string_buffer(max_read // PAGE + 2)  # mincore's answer, one byte a page
        self.not_resident = 0  # READs sent to a worker thread because pages were out of memory

    def __len__(self) -> int:
        return len(self._maps)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._maps

    def view(self, digest: bytes, offset: int, size: int) -> memoryview | None:
        """Bytes [offset, offset+size) of a mapped block if all their pages are in memory, else None."""
        m = self._maps.get(digest)
        if m is None:
            return None
        self._maps.move_to_end(digest)
        if size and not self._resident(m, offset, size):
            self.not_resident += 1
            return None
        if m.ahead:
            self._used(m)
        return m.view[offset:offset + size]

    def entry(self, digest: bytes) -> _Mapping | None:
        """The pooled mapping of a block, resident or not (see `populate`)."""
        return self._maps.get(digest)

    def whole(self, digest: bytes) -> memoryview | None:
        """A whole mapped block whatever its residency (for worker threads, which may fault)."""
        m = self._maps.get(digest)
        return None if m is None else m.view

    def _resident(self, m: _Mapping, offset: int, size: int) -> bool:
        first = offset - offset % PAGE
        pages = (offset + size - first + PAGE - 1) // PAGE
        if pages > len(self._vec):
            return False  # larger than any READ: let a worker thread serve it
        if _libc.mincore(m.addr + first, offset + size - first, self._vec) != 0:
            return False
        return _libc.memchr(self._vec, 0, pages) is None

    def _used(self, m: _Mapping) -> None:
        m.ahead = False
        self._ahead_bytes -= m.length
        self._ahead_count -= 1
        self._room.set()

    def _ahead_fits(self, length: int) -> bool:
        # Half the pool at most, so blocks being read (a READ per MiB, several per block) keep their room.
        return (self._ahead_bytes + length <= self.budget // 2 or not self._ahead_count) \
            and self._ahead_count < self.max_maps // 2

    async def reserve_ahead(self, length: int, patience: float) -> None:
        """Wait until a block of `length` bytes can be mapped ahead without dropping one not read yet
        (READs of blocks mapped ahead make the room), then reserve that room; `unreserve` it once the
        mapping is put (or failed). After `patience` seconds the wait gives up on the loader: every block
        mapped ahead then counts as used."""
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
        """Treat every block mapped ahead as used (its reader stopped): they may be dropped again."""
        for m in self._maps.values():
            if m.ahead:
                self._used(m)

    def put(self, digest: bytes, mm: mmap.mmap, ahead: bool = False, evict: bool = True) -> memoryview:
        """Keep `mm` (a verified mapping of block `digest`) and return a view of the whole block.

        Room is made by dropping least recently used mappings that READs have used; a mapping made for a
        READ (`evict`) may also drop ones mapped ahead and not read yet, if nothing else is left. A mapping
        that does not fit is not kept: its view is valid for as long as the caller holds it."""
        self.discard(digest)
        m = _Mapping(mm, ahead)
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
        """The blocks mapped now."""
        return list(self._maps)

    def discard(self, digest: bytes) -> None:
        """Forget a block's mapping; views already handed out stay valid."""
        m = self._maps.pop(digest, None)
        if m is not None:
            self.bytes -= m.length
            if m.ahead:
                self._used(m)

    def clear(self) -> None:
        for digest in list(self._maps):
            self.discard(digest)
