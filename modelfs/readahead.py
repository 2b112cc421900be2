"""Sequential stream detection with doubling read-ahead windows (pure logic: no I/O, no trio, no FUSE).

FUSE hands us read requests per file, slightly out of order (the kernel's readahead keeps several in
flight), and one file may carry several interleaved sequential readers (processes sharing an fd, or
reading different regions). Semantics:

- A read continues a stream if its offset lies within `tolerance` (back or forward) of the stream's
  position (the furthest byte read so far); the position advances to max(pos, offset + size).
  Any other read starts a new candidate stream; beyond `max_streams` the least recently used is dropped.
- After `confirm_reads` continuing reads the stream is sequential and asks for [pos, pos + window)
  minus what it already asked for. It asks again once the reader has consumed half of what is
  outstanding, and each time the window doubles, up to `max_window`: small at first, large while the
  reader keeps up.
- Ranges never extend past the file and never repeat within a stream; random access (reads further
  than `tolerance` from every stream) never asks for anything.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class ReadaheadPolicy:
    initial_window: int = 16 << 20
    max_window: int = 1 << 30
    tolerance: int = 8 << 20  # > the kernel's readahead in flight (read_ahead_kb=4096)
    confirm_reads: int = 2
    max_streams: int = 8


@dataclass
class _Stream:
    pos: int
    hits: int = 0
    window: int = 0
    requested_end: int = 0


class StreamTracker:
    """Per-file sequential stream detection with doubling windows."""

    def __init__(self, file_size: int, policy: ReadaheadPolicy | None = None) -> None:
        self.file_size = file_size
        self.policy = policy or ReadaheadPolicy()
        self._streams: OrderedDict[int, _Stream] = OrderedDict()
        self._next_id = 0

    def on_read(self, offset: int, size: int) -> tuple[int, int] | None:
        """Record a read; the (start, end) range to prefetch now, or None."""
        p = self.policy
        end = min(offset + size, self.file_size)
        stream_id = next((sid for sid, s in self._streams.items() if abs(offset - s.pos) <= p.tolerance), None)
        if stream_id is None:
            self._streams[self._next_id] = _Stream(pos=end)
            self._next_id += 1
            while len(self._streams) > p.max_streams:
                self._streams.popitem(last=False)
            return None
        s = self._streams[stream_id]
        self._streams.move_to_end(stream_id)
        s.pos = max(s.pos, end)
        s.hits += 1
        if s.hits < p.confirm_reads:
            return None
        if s.window == 0:
            s.window = p.initial_window
            s.requested_end = s.pos
        elif s.pos >= s.requested_end - s.window // 2:
            s.window = min(s.window * 2, p.max_window)
        else:
            return None
        start = max(s.pos, s.requested_end)
        stop = min(s.pos + s.window, self.file_size)
        if stop <= start:
            return None
        s.requested_end = stop
        return start, stop
