"""One immutable version of a file (key + ETag + size) and the layout of its extents.

A version never changes its bytes, so what is learnt about it (which content hash holds each extent) never
needs invalidation: a new ETag is a new version, with a new id (`index.version_id`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import NamedTuple

from modelfs.catalog.index import ChunkIndex, version_id
from modelfs.remote import ObjectInfo
from modelfs.remote.sources import Block

#: (start, length): the one name for an extent of a file version, wherever it is passed around. A plain
#: tuple, because one is made for every READ.
Extent = tuple[int, int]
#: (start, length, xxh3-128 digest): an extent whose content hash a published manifest gives.
HashedExtent = tuple[int, int, bytes]


@dataclass(eq=False)
class FileVersion:
    """One immutable version of a file, what is known of its extents (offset -> (hash, length)), and where
    the cache holds the bytes of those its own file lacks (`elsewhere`).

    Extents are fixed-size (`extent_size`) unless a manifest gave this version a content-following
    `layout` (sorted starts); then `known` starts out with every extent's hash, so extents whose content
    is already cached are served without a GET, whichever version or file stored them.
    """

    info: ObjectInfo
    vid: bytes
    extent_size: int
    known: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    layout: list[int] | None = None
    #: extent start -> (vid, start) of another version's file that holds the same bytes (dedup): where READs
    #: of an extent this version's own file lacks are served from
    elsewhere: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    #: copy what other files hold into this version's own file (loaded often enough: `cache.copy_shared_after`)
    copy_shared: bool = False

    @classmethod
    def of(cls, identity: str, info: ObjectInfo, extent_size: int,
           extents: list[HashedExtent] | None = None) -> FileVersion:
        ver = cls(info, version_id(identity, info), extent_size)
        if extents:
            ver.layout = [off for off, _, _ in extents]
            ver.known = {off: (digest, length) for off, length, digest in extents}
        return ver

    def lookup(self, index: ChunkIndex, start: int, length: int) -> tuple[bytes, int] | None:
        """(hash, length) of the extent at `start`, if this version or the index knows it (then
        remembered here, so the index is asked once per extent per version)."""
        ext = self.known.get(start)
        if ext is None:
            ext = index.lookup(self.vid, start)
            if ext is None or ext[1] != length:
                return None
            self.known[start] = ext
        return ext

    def learn(self, index: ChunkIndex) -> None:
        """Remember every extent of this version the index knows (one scan; from a worker thread)."""
        if self.layout is not None and len(self.known) == len(self.layout):
            return  # a manifest already gave every extent
        for start, ext in index.extents(self.vid).items():
            if start not in self.known and 0 <= start < self.info.size and self.extent_at(start) == (start, ext[1]):
                self.known[start] = ext

    def extent_at(self, offset: int) -> Extent:
        """(start, length) of the extent holding byte `offset`."""
        if self.layout is not None:
            start = self.layout[bisect.bisect_right(self.layout, offset) - 1]
            return start, self.known[start][1]
        start = offset - offset % self.extent_size
        return start, min(self.extent_size, self.info.size - start)

    def extents(self) -> list[Extent]:
        """Every (start, length) of the file, in file order."""
        return self.starts_in(0, self.info.size)

    def blocks(self, run: list[Extent]) -> list[Block]:
        """The extents of `run` as a source is asked for them, each with its hash where the version's manifest
        gives it (then the fleet tier keys it by content: `sources.Block`)."""
        by_content = self.layout is not None
        return [Block(self.vid, start, length, self.known[start][0] if by_content else None)
                for start, length in run]

    def starts_in(self, lo: int, hi: int) -> list[Extent]:
        """(start, length) of every extent overlapping [lo, hi), in file order."""
        out: list[Extent] = []
        pos = max(0, lo)
        while pos < min(hi, self.info.size):
            start, length = self.extent_at(pos)
            out.append((start, length))
            pos = start + length
        return out


class Stored(NamedTuple):
    """What became of one fetched extent: its hash, whether its block is in the cache now, and a private
    copy of its bytes when one was asked for (readers wait on it; the GET buffer goes back to its pool)."""

    digest: bytes
    cached: bool
    copy: memoryview | None
