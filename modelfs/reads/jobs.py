"""A prefetch job: the extents of one file to fetch, in the order they are wanted, and how far it got.

Jobs live on the trio thread (`prefetch.Prefetcher` owns them); workers take extents from the front of a
job's queue, with the queued extents that follow them (one GET), and count them done however they end.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import trio

from modelfs.catalog.version import FileVersion
from modelfs.tree.namespace import Node


@dataclass(eq=False)
class Job:
    """Prefetch of some extents of one file. `reading`: the file is open and read through the daemon (its
    bytes are checked ahead of the reader, and pushed into the page cache when push is on). `check`: a file
    whose opens wait to be answered by passthrough (`fill_for_open`, and the shards of its set): bytes written
    before this daemon started are checked too, before the kernel gets the file (damage found counts in
    `files_corrupt`, once per job)."""

    node: Node
    ver: FileVersion
    reading: bool
    check: bool = False
    pending: deque[int] = field(default_factory=deque)
    queued: set[int] = field(default_factory=set)
    completed: list[int] = field(default_factory=list)
    outstanding: int = 0
    fetched: int = 0
    damaged: int = 0  # extents its file held that failed their check (dropped, fetched again)
    error: BaseException | None = None
    done: trio.Event = field(default_factory=trio.Event)
    started: float = field(default_factory=time.monotonic)

    def add(self, starts: list[int]) -> None:
        for s in starts:
            if s not in self.queued:
                self.queued.add(s)
                self.pending.append(s)

    @property
    def finished(self) -> bool:
        return not self.pending and self.outstanding == 0

    def take_adjacent(self, start: int, max_request: int) -> list[int]:
        """Queued extents that directly follow `start`, to fetch with it in one GET of at most `max_request`
        bytes (fewer GETs: each costs the client as much CPU as megabytes of body); each extent is still
        checked, and pushed, on its own."""
        ver = self.ver
        _, length = ver.extent_at(start)
        end, total = start + length, length
        taken: list[int] = []
        while self.pending and self.pending[0] == end:
            _, length = ver.extent_at(end)
            if total + length > max_request:
                break
            taken.append(self.pending.popleft())
            self.outstanding += 1
            end, total = end + length, total + length
        return taken
