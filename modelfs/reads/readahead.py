"""Sequential stream detection with doubling read-ahead windows (pure logic: no I/O, no trio, no FUSE).

FUSE hands us read requests per open file slightly out of order (the kernel's readahead keeps several in
flight and they complete in any order), and one file may carry several interleaved sequential readers
(processes sharing an fd, or reading different regions). Loaders also read at random (a safetensors
header, then tensors by name). We want read-ahead for the sequential readers only, small at first and
large while a reader keeps up, so that a misdetected stream wastes little and a real one is never starved.

Semantics (one `StreamTracker` per file; `pos` is a stream's furthest end read so far):

- A read *continues* a stream if its offset lies within [pos - tolerance, pos + tolerance] (inclusive);
  the stream's pos advances to max(pos, offset + size). The tolerance absorbs the kernel's small
  backward and forward jumps.
- A read that continues no stream starts a new candidate stream at its end. Beyond `max_streams` the
  least recently used stream is dropped (a continued or new stream becomes the most recently used).
- A read that continues several streams joins them into one (they have met: two streams that are the
  same reader from here on must not both prefetch the same bytes). The joined stream keeps the largest
  pos, continuing-read count, window and requested end of its parts.
- After `confirm_reads` continuing reads a stream is sequential and asks for [pos, pos + initial_window).
  It asks again only once the reader has consumed at least half of what is outstanding
  (pos >= requested_end - window / 2); each new ask doubles the window (up to `max_window`) and asks for
  [requested_end, pos + window). The reader thus stays between half a window and a window behind the
  end of what was requested, and a stream that stops early has wasted at most one window.
- A returned range is never empty, never extends past `file_size`, and never overlaps what its stream
  (or any stream joined into it) asked for before: it starts at or after the stream's `requested_end`.
  When the file's end is already requested nothing more is asked and the window stays as it is.
- Random access (every read further than `tolerance` from every tracked stream's pos) only creates
  candidates and never asks for anything.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class ReadaheadPolicy:
    """How eagerly streams are detected and how far ahead they prefetch (all sizes in bytes)."""

    initial_window: int = 16 << 20  # prefetched ahead once a stream is confirmed sequential
    max_window: int = 1 << 30
    tolerance: int = 4 << 20  # a read within this distance (back or forward) of a stream's pos continues it
    confirm_reads: int = 2  # continuing reads before a stream prefetches
    max_streams: int = 8  # streams tracked per file; the least recently used is dropped

    def __post_init__(self) -> None:
        if self.initial_window <= 0 or self.max_window < self.initial_window:
            raise ValueError("readahead: need 0 < initial_window <= max_window")
        if self.tolerance < 0 or self.confirm_reads < 0 or self.max_streams < 1:
            raise ValueError("readahead: need tolerance >= 0, confirm_reads >= 0, max_streams >= 1")


@dataclass(frozen=True)
class StreamState:
    """A snapshot of one tracked stream (for statistics, logs and tests)."""

    id: int  # stable while the stream lives; a join keeps the id of the most recently used part
    pos: int  # furthest end read so far
    hits: int  # continuing reads so far
    window: int  # current read-ahead window; 0 until the stream first asks
    requested_end: int  # end of everything asked for so far; 0 until the stream first asks


@dataclass
class _Stream:
    pos: int
    hits: int = 0
    window: int = 0
    requested_end: int = 0


class StreamTracker:
    """Per-file sequential stream detection with doubling windows."""

    def __init__(self, file_size: int, policy: ReadaheadPolicy = ReadaheadPolicy()) -> None:
        if file_size < 0:
            raise ValueError("readahead: file_size must be >= 0")
        self.file_size = file_size
        self.policy = policy
        self._streams: OrderedDict[int, _Stream] = OrderedDict()  # least recently used first
        self._next_id = 0

    @property
    def streams(self) -> tuple[StreamState, ...]:
        """The tracked streams, least recently used first."""
        return tuple(StreamState(sid, s.pos, s.hits, s.window, s.requested_end) for sid, s in self._streams.items())

    def on_read(self, offset: int, size: int) -> tuple[int, int] | None:
        """Record a read; return (start, end) of a byte range the caller should have prefetched now
        (clamped to file_size, never overlapping what this tracker already asked for in that stream),
        or None."""
        if offset < 0 or size < 0:
            raise ValueError("readahead: offset and size must be >= 0")
        p = self.policy
        end = min(offset + size, self.file_size)
        matched = [sid for sid, s in self._streams.items() if abs(offset - s.pos) <= p.tolerance]
        if not matched:
            sid = self._next_id
            self._next_id += 1
            self._streams[sid] = _Stream(pos=end)
            while len(self._streams) > p.max_streams:
                self._streams.popitem(last=False)
            return self._ask(self._streams[sid])  # only when confirm_reads == 0
        sid = matched[-1]  # the most recently used keeps its id
        s = self._streams[sid]
        for other in matched[:-1]:
            o = self._streams.pop(other)
            s.pos, s.hits = max(s.pos, o.pos), max(s.hits, o.hits)
            s.window, s.requested_end = max(s.window, o.window), max(s.requested_end, o.requested_end)
        self._streams.move_to_end(sid)
        s.pos = max(s.pos, end)
        s.hits += 1
        return self._ask(s)

    def _ask(self, s: _Stream) -> tuple[int, int] | None:
        """The next range for `s`, if it is sequential and the reader has consumed half its window."""
        p = self.policy
        if s.hits < p.confirm_reads:
            return None
        if s.window == 0:
            window = p.initial_window
        elif s.pos >= s.requested_end - s.window // 2:
            window = min(s.window * 2, p.max_window)
        else:
            return None
        start = max(s.pos, s.requested_end)
        stop = min(s.pos + window, self.file_size)
        if stop <= start:
            return None  # the file's end is already requested (or the reader is at it)
        s.window, s.requested_end = window, stop
        return start, stop
