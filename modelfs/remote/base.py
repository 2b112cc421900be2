"""The store interface: what the core needs from S3 or a local directory, and nothing more.

Every method blocks (network or disk), so the core calls them from worker threads under trio
CapacityLimiters. Keys are relative to the source root ("" is the root; directory prefixes end in "/").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol


@dataclass(frozen=True)
class ObjectInfo:
    """One immutable version of an object: (key, ETag, size) never changes its bytes."""

    key: str
    size: int
    etag: str
    mtime: float


@dataclass
class Listing:
    """One level of a delimiter listing: raw child names, unsanitized (the namespace decides)."""

    dirs: list[str] = field(default_factory=list)
    objects: list[tuple[str, ObjectInfo]] = field(default_factory=list)


class Store(Protocol):
    """A read-only object store. Implementations: `remote.s3.S3Store`, `remote.local.LocalStore`."""

    #: Stable identity of the source (for version ids and the dedup trust domain); no secrets.
    identity: str
    #: Trust domain: blocks are shared by content only between sources of one domain.
    domain: str
    #: Extra requests sent for ranged GETs whose requests were all silent (`s3.hedge_after`); 0 where none are.
    hedged: int
    #: Ranged GETs sent with no room for a hedge (`s3.max_request_threads`); 0 where none are.
    unhedged: int
    #: GET bodies cut, short or stalled after their headers, asked for again from where they stopped.
    body_retries: int

    def describe(self) -> str:
        """A human-readable name for logs and errors; never contains credentials."""
        ...

    def check(self) -> None:
        """Fail with one clear StoreError if the store cannot be used (unreachable, no bucket, denied)."""
        ...

    def list_dir(self, prefix: str) -> Listing:
        """List the direct children of `prefix` ("" or "a/b/")."""
        ...

    def read_into(self, obj: ObjectInfo, start: int, views: Sequence[memoryview],
                  filled: Callable[[int], None] | None = None) -> None:
        """Fill `views`, in order, with the bytes of version `obj` from `start` on (one ranged request for
        all of them: they are consecutive in the object); VersionChanged if it was overwritten. The caller
        owns the buffers (`buffers.BufferPool`), so nothing is allocated per request. `filled(k)` is called
        once view k holds all its bytes, in order, as they arrive, and BEFORE any byte of view k+1 is read:
        the views may all be the same memory (a GET of many extents streams through one buffer, each extent
        stored by `filled` before the next arrives), and a reader of the first extent of a long request need
        not wait for the rest."""
        ...

    def close(self) -> None: ...


class WritableStore(Store, Protocol):
    """A store the daemon also writes: the shared cache tier (`shared`), whose keys name content, so an
    object never changes once written. Implementations: `S3Store`, `LocalStore` (a directory every node
    mounts, e.g. NFS), `testing.memstore.MemoryStore`."""

    def get_into(self, key: str, views: Sequence[memoryview], deadline: float | None = None
                 ) -> dict[str, str] | None:
        """Fill `views` with the whole object `key` and return its metadata; None if there is none. A
        StoreError if its size is not the views' total. One attempt, within `deadline` (time.monotonic)."""
        ...

    def put(self, key: str, body: bytes | BinaryIO, metadata: dict[str, str], if_absent: bool = False) -> bool:
        """Write object `key` with `metadata`, whole or not at all (a reader never sees part of it). With
        `if_absent`, only if no object `key` exists: False if one does (the tier's claims)."""
        ...

    def age(self, key: str) -> float | None:
        """Seconds since `key` was written, by the store's own clock where it has one; None if absent."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove `key`; no error if it is absent."""
        ...


def read_bytes(store: Store, obj: ObjectInfo, start: int, length: int) -> bytes:
    """`length` bytes of `obj` from `start` as a new bytes object (small metadata reads: manifests)."""
    buf = bytearray(length)
    if length:
        store.read_into(obj, start, [memoryview(buf)])
    return bytes(buf)
