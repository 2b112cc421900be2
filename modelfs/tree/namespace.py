"""The namespace: store keys as a tree of inodes, listed lazily per directory and cached with a TTL.

A file inode is one immutable version (key, ETag, size): when a relisting shows a new ETag, the name
points at a new inode, and handles open on the old inode keep serving the old version (or fail with
ESTALE for bytes not cached), never a mix of both.

Keys are arbitrary strings; names are not. A segment that is empty (`a//b`, a leading `/`, a trailing
`/` marker object), `.` or `..`, longer than 255 bytes, or holding NUL or bytes that are not UTF-8 is
hidden (logged once), so no key maps to a path outside the mount. A name that is both an object and a
prefix (`a` and `a/b`) appears once, as the directory.

Inode lifetime: a node is held while it is in its directory's latest listing, while the kernel holds a
reference to it (one per LOOKUP reply or readdirplus entry, given back by FORGET: `remember` / `forget`),
or while it is open (`in_use`). Once none of these holds, it is dropped, and `dropped` hands its inode to
the core, which lets go of what it keyed by it: memory follows what the kernel and the store show, not every
ETag ever seen. (Inode numbers are never reused, so a drop the core takes later is still the same file.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from modelfs.errors import NotFound, StoreError
from modelfs.remote import Listing, ObjectInfo

log = logging.getLogger(__name__)

ROOT_INODE = 1
#: Names the namespace never shows: modelfs's own metadata beside the checkpoints.
RESERVED = frozenset({".modelfs"})


def unsafe_reason(name: str) -> str | None:
    """Why a raw key segment cannot be a file name, or None if it can."""
    if name == "":
        return "empty path segment"
    if name in (".", ".."):
        return f"'{name}' segment"
    if "\0" in name or "/" in name:
        return "NUL or '/' in a segment"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "segment is not valid UTF-8"
    if len(encoded) > 255:
        return "segment longer than 255 bytes"
    if name in RESERVED:
        return "reserved for modelfs metadata"
    return None


@dataclass(eq=False)
class Node:
    """A directory (a key prefix ending in "/", or "" for the root) or one version of an object."""

    inode: int
    parent: int
    name: str
    key: str
    info: ObjectInfo | None = None  # None for directories
    children: dict[str, Node] = field(default_factory=dict)
    listed_at: float = -1.0
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def is_dir(self) -> bool:
        return self.info is None


class Namespace:
    """Inode table and directory cache. `list_dir` is the store's listing, awaited in a worker thread."""

    def __init__(self, list_dir: Callable[[str], Awaitable[Listing]], ttl: float,
                 clock: Callable[[], float] = time.monotonic, in_use: Callable[[int], bool] = lambda _: False) -> None:
        self._list_dir = list_dir
        self.ttl = ttl
        self._clock = clock
        self._in_use = in_use
        self._dropped: list[int] = []  # inodes dropped since the core last took them (`dropped`)
        self._lookups: dict[int, int] = {}  # inode -> references the kernel holds
        self._nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, ROOT_INODE, "", "")}
        self._next_inode = ROOT_INODE + 1
        self._logged_hidden: set[str] = set()

    @property
    def root(self) -> Node:
        return self._nodes[ROOT_INODE]

    def __len__(self) -> int:
        return len(self._nodes)

    def remember(self, inode: int) -> None:
        """The kernel got one more reference to `inode`."""
        self._lookups[inode] = self._lookups.get(inode, 0) + 1

    def forget(self, inode: int, nlookup: int) -> None:
        """The kernel gave back `nlookup` references to `inode`."""
        left = self._lookups.get(inode, 0) - nlookup
        if left > 0:
            self._lookups[inode] = left
            return
        self._lookups.pop(inode, None)
        self.collect(inode)

    def _listed(self, node: Node) -> bool:
        """Whether `node` is reachable: its directory holds it and is reachable itself."""
        while node.inode != ROOT_INODE:
            parent = self._nodes.get(node.parent)
            if parent is None or parent.children.get(node.name) is not node:
                return False
            node = parent
        return True

    def collect(self, inode: int) -> None:
        """Drop `inode` if nothing holds it any more (not listed, no kernel reference, not open)."""
        node = self._nodes.get(inode)
        if node is None or inode == ROOT_INODE or inode in self._lookups or self._in_use(inode) or self._listed(node):
            return
        del self._nodes[inode]
        self._dropped.append(inode)
        for child in list(node.children.values()):  # a dropped directory's entries are unreachable too
            self.collect(child.inode)

    def dropped(self) -> list[int]:
        """The inodes dropped since the last call (the core forgets what it keyed by them)."""
        out, self._dropped = self._dropped, []
        return out

    def get(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise NotFound(f"stale inode {inode}") from None

    async def children(self, directory: Node) -> dict[str, Node]:
        """The directory's entries, relisted from the store when older than the TTL."""
        if not directory.is_dir:
            raise NotADirectoryError(directory.key)
        if self._clock() - directory.listed_at >= self.ttl or directory.listed_at < 0:
            async with directory.lock:  # one LIST per directory at a time (single-flight)
                if self._clock() - directory.listed_at >= self.ttl or directory.listed_at < 0:
                    try:
                        listing = await self._list_dir(directory.key)
                    except StoreError as e:
                        if directory.listed_at < 0:
                            raise
                        # A name the mount has shown never turns into ENOENT because the store failed:
                        # the last listing answers, and the next call asks the store again.
                        log.info("relisting /%s failed (%s): the last listing answers", directory.key, e)
                        return directory.children
                    self.apply_listing(directory, listing)
        return directory.children

    async def lookup(self, parent: Node, name: str) -> Node:
        node = (await self.children(parent)).get(name)
        if node is None:
            raise NotFound(f"no such entry: {parent.key}{name}")
        return node

    def apply_listing(self, directory: Node, listing: Listing) -> None:
        """Replace the directory's entries with `listing`, keeping inodes of unchanged entries."""
        old = directory.children
        new: dict[str, Node] = {}
        for raw in listing.dirs:
            if self._hide(directory.key + raw + "/", raw):
                continue
            node = old.get(raw)
            if node is None or not node.is_dir:
                node = self._make(directory, raw, directory.key + raw + "/", None)
            new[raw] = node
        for raw, info in listing.objects:
            if raw == "":  # a "dir/" marker object: the directory itself, not an entry
                continue
            if self._hide(info.key, raw):
                continue
            if raw in new:
                self._log_once(info.key, "a key that is also a prefix: shown as the directory")
                continue
            node = old.get(raw)
            if node is None or node.info != info:
                node = self._make(directory, raw, info.key, info)
            new[raw] = node
        directory.children = new
        directory.listed_at = self._clock()
        for raw, node in old.items():
            if new.get(raw) is not node:  # replaced (a new ETag) or gone from the store
                self.collect(node.inode)

    def _make(self, parent: Node, name: str, key: str, info: ObjectInfo | None) -> Node:
        node = Node(self._next_inode, parent.inode, name, key, info)
        self._next_inode += 1
        self._nodes[node.inode] = node
        return node

    def _hide(self, key: str, raw: str) -> bool:
        reason = unsafe_reason(raw)
        if reason is None:
            return False
        if raw not in RESERVED:
            self._log_once(key, f"hidden: {reason}")
        return True

    def _log_once(self, key: str, what: str) -> None:
        if key not in self._logged_hidden:
            self._logged_hidden.add(key)
            log.warning("key %r %s", key, what)
