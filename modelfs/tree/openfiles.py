"""The open-file table: file handles, the version each inode is read at, and how each open is served.

A handle pins the version (`version.FileVersion`) its inode had when it was opened, so a file replaced in
the store under an open handle keeps serving the bytes it was opened with; a new lookup finds a new inode.
Directory handles hold a snapshot of the entries taken at opendir.

How each open is served (passthrough or cached mode) is `passthrough.Passthrough`'s to decide and count.
Nothing here blocks or does I/O; trio-thread only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from modelfs.catalog.version import FileVersion, HashedExtent
from modelfs.remote import ObjectInfo
from modelfs.tree.namespace import Node


@dataclass(frozen=True)
class Closed:
    """A handle let go: its node and version, and whether it was the inode's last open handle."""

    node: Node
    ver: FileVersion
    last: bool


class OpenFiles:
    """Handles and versions of one mount."""

    def __init__(self, identity: str, extent_size: int, layout: Callable[[ObjectInfo], list[HashedExtent] | None]
                 ) -> None:
        self.identity = identity  # the store's: a version id names the source
        self.extent_size = extent_size
        self.layout = layout  # published extents of an object version (`listings.Listings.layout`)
        #: fh -> (node, version) of every open file handle; read on every READ
        self.handles: dict[int, tuple[Node, FileVersion]] = {}
        self._versions: dict[int, FileVersion] = {}  # inode -> the version opened or looked at
        self._open: dict[int, int] = {}  # inode -> open handles
        self._dirs: dict[int, list[Node]] = {}
        self._fh = itertools.count(1)

    def __len__(self) -> int:
        """Versions held (`versions_held`)."""
        return len(self._versions)

    def version(self, node: Node) -> FileVersion:
        """The version `node` is read at: the same object for as long as the inode lives."""
        ver = self._versions.get(node.inode)
        if ver is None:
            info = node.info
            assert info is not None
            ver = self._versions[node.inode] = FileVersion.of(self.identity, info, self.extent_size,
                                                              self.layout(info))
        return ver

    def forget(self, inode: int) -> FileVersion | None:
        """The namespace dropped `inode`: so does the table; returns the version it was read at."""
        return self._versions.pop(inode, None)

    def is_open(self, inode: int) -> bool:
        return self._open.get(inode, 0) > 0

    def handles_of(self, inode: int) -> int:
        """Handles of `inode` open now."""
        return self._open.get(inode, 0)

    def open(self, node: Node) -> int:
        fh = next(self._fh)
        self.handles[fh] = (node, self.version(node))
        self._open[node.inode] = self._open.get(node.inode, 0) + 1
        return fh

    def release(self, fh: int) -> Closed | None:
        entry = self.handles.pop(fh, None)
        if entry is None:
            return None
        node, ver = entry
        self._open[node.inode] -= 1
        last = not self._open[node.inode]
        if last:
            del self._open[node.inode]
        return Closed(node, ver, last)

    # -- directories --------------------------------------------------------------------------------

    def opendir(self, entries: list[Node]) -> int:
        fh = next(self._fh)
        self._dirs[fh] = entries
        return fh

    def readdir(self, fh: int, start: int) -> list[Node]:
        """Entries of an open directory from index `start` on (a snapshot taken at opendir)."""
        return self._dirs[fh][start:]

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)
