"""An in-memory object store that implements `remote.Store` and `remote.WritableStore` for real, with
faults to inject.

For tests of the core without a mount or a server (the integration tests keep SeaweedFS and the fault
proxy): objects with ETags (a new one on every put, as S3 gives), delimiter listings, ranged reads into
the caller's buffers with If-Match semantics (an overwritten or deleted object is `VersionChanged`). It
records every ranged read, and misbehaves on request, as Mountpoint's failure client does:

- `fail_reads(n, error)`, `fail_lists(n, error)`: the next n ranged reads, or listings, raise `error`;
- `stall_reads()` / `release()`: ranged reads block (in their worker thread) until released;
- `unreachable = True`: every call raises `StoreUnreachable`, as a store that cannot be reached does.

Thread-safe: the core calls it from worker threads.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO

from modelfs.errors import NotFound, StoreError, StoreUnreachable, VersionChanged
from modelfs.remote.base import Listing, ObjectInfo


class MemoryStore:
    """Objects under keys like S3's (no leading '/', '/' separates levels)."""

    def __init__(self, name: str = "mem") -> None:
        self.identity = f"mem:{name}"
        self.domain = self.identity
        self.hedged = 0
        self.unhedged = 0
        self.body_retries = 0
        self.unreachable = False
        self._objects: dict[str, tuple[ObjectInfo, bytes]] = {}
        self._meta: dict[str, dict[str, str]] = {}
        self._etags = itertools.count(1)
        self._lock = threading.Lock()
        self._fail: list[BaseException] = []
        self._fail_lists: list[BaseException] = []
        self.lists = 0  # listings asked for
        self._stalled = threading.Event()
        self._stalled.set()  # set = not stalled
        self._stall_after_first = False
        self.reads: list[tuple[str, int, int]] = []  # (key, start, length) of every ranged read
        self.waiting = 0  # ranged reads blocked in a stall right now

    # -- set-up by tests ---------------------------------------------------------------------------------

    def add(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> ObjectInfo:
        """Create or overwrite `key` (a new ETag each time)."""
        with self._lock:
            return self._set(key, data, metadata or {})

    def _set(self, key: str, data: bytes, metadata: dict[str, str]) -> ObjectInfo:
        """Store `key` as a new version; the caller holds the lock."""
        info = ObjectInfo(key, len(data), f'"etag-{next(self._etags)}"', time.time())
        self._objects[key] = (info, bytes(data))
        self._meta[key] = dict(metadata)
        return info

    def backdate(self, key: str, seconds: float) -> None:
        """Make `key` as old as if it had been written `seconds` earlier (`age`)."""
        with self._lock:
            info, data = self._objects[key]
            self._objects[key] = (dataclasses.replace(info, mtime=info.mtime - seconds), data)

    def fail_reads(self, n: int, error: BaseException) -> None:
        """The next `n` ranged reads raise `error`."""
        with self._lock:
            self._fail += [error] * n

    def fail_lists(self, n: int, error: BaseException) -> None:
        """The next `n` listings raise `error`."""
        with self._lock:
            self._fail_lists += [error] * n

    def stall_reads(self, after_first: bool = False) -> None:
        """Hold ranged reads until `release`: before their first byte, or (`after_first`) once the first
        view of a read of several views is filled and announced."""
        self._stall_after_first = after_first
        self._stalled.clear()

    def release(self) -> None:
        self._stalled.set()

    # -- the Store interface -----------------------------------------------------------------------------

    def describe(self) -> str:
        return self.identity

    def _reachable(self) -> None:
        if self.unreachable:
            raise StoreUnreachable(f"store {self.identity} cannot be reached")

    def check(self) -> None:
        self._reachable()

    def list_dir(self, prefix: str) -> Listing:
        with self._lock:
            self.lists += 1
            error = self._fail_lists.pop(0) if self._fail_lists else None
        if error is not None:
            raise error
        self._reachable()
        listing = Listing()
        dirs: set[str] = set()
        with self._lock:
            objects = sorted(self._objects.items())
        for key, (info, _) in objects:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            head, sep, _ = rest.partition("/")
            if sep:
                dirs.add(head)
            else:
                listing.objects.append((rest, info))
        listing.dirs = sorted(dirs)
        if prefix and not listing.dirs and not listing.objects:
            raise NotFound(f"no such directory: {prefix}")
        return listing

    def read_into(self, obj: ObjectInfo, start: int, views: Sequence[memoryview],
                  filled: Callable[[int], None] | None = None) -> None:
        length = sum(len(v) for v in views)
        with self._lock:
            self.reads.append((obj.key, start, length))
            error = self._fail.pop(0) if self._fail else None
        self._reachable()
        if error is not None:
            raise error
        if not self._stalled.is_set() and not self._stall_after_first:
            self._hold()
        with self._lock:
            current = self._objects.get(obj.key)
        if current is None:
            raise VersionChanged(f"{obj.key} was removed from the store")
        info, data = current
        if info.etag != obj.etag:
            raise VersionChanged(f"{obj.key} was overwritten in the store")
        if start + length > len(data):
            raise StoreError(f"range {start}+{length} beyond the end of {obj.key}")
        pos = start
        for k, v in enumerate(views):
            v[:] = data[pos:pos + len(v)]
            pos += len(v)
            if filled is not None:
                filled(k)
            if k == 0 and len(views) > 1 and self._stall_after_first and not self._stalled.is_set():
                self._hold()

    def _hold(self) -> None:
        with self._lock:
            self.waiting += 1
        try:
            self._stalled.wait()
        finally:
            with self._lock:
                self.waiting -= 1

    def close(self) -> None:
        self.release()

    # -- the WritableStore interface (a shared cache tier in memory) ----------------------------------------

    def get_into(self, key: str, views: Sequence[memoryview], deadline: float | None = None
                 ) -> dict[str, str] | None:
        self._reachable()
        length = sum(len(v) for v in views)
        with self._lock:
            self.reads.append((key, 0, length))
            error = self._fail.pop(0) if self._fail else None
            current = self._objects.get(key)
            meta = dict(self._meta.get(key, {}))
        if error is not None:
            raise error
        if current is None:
            return None
        data = current[1]
        if len(data) != length:
            raise StoreError(f"GET {key}: {len(data)} bytes, expected {length}")
        pos = 0
        for v in views:
            v[:] = data[pos:pos + len(v)]
            pos += len(v)
        return meta

    def put(self, key: str, body: bytes | BinaryIO, metadata: dict[str, str], if_absent: bool = False) -> bool:
        self._reachable()
        data = body if isinstance(body, bytes) else body.read()
        with self._lock:
            if if_absent and key in self._objects:
                return False
            self._set(key, data, metadata)
        return True

    def age(self, key: str) -> float | None:
        self._reachable()
        with self._lock:
            current = self._objects.get(key)
        return None if current is None else max(0.0, time.time() - current[0].mtime)

    def exists(self, key: str) -> bool:
        self._reachable()
        with self._lock:
            return key in self._objects

    def delete(self, key: str) -> None:
        self._reachable()
        with self._lock:
            self._objects.pop(key, None)
            self._meta.pop(key, None)
