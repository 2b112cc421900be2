"""Stream detection and read-ahead windows (`modelfs.reads.readahead`): examples and property tests (pure logic)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfs.reads.readahead import ReadaheadPolicy, StreamTracker

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
SMALL = ReadaheadPolicy(initial_window=4 * MiB, max_window=16 * MiB, tolerance=2 * MiB, confirm_reads=2)
FAST = settings(max_examples=200, deadline=None)

Range = tuple[int, int]


def sequential(sizes: list[int], start: int = 0) -> list[Range]:
    """(offset, size) reads of one reader going forward with the given request sizes."""
    out, off = [], start
    for n in sizes:
        out.append((off, n))
        off += n
    return out


def covers(ranges: list[Range], start: int, stop: int) -> bool:
    """The ranges, sorted, cover [start, stop) without a gap."""
    at = start
    for a, b in sorted(ranges):
        if a > at:
            return False
        at = max(at, b)
    return at >= stop


def windows(policy: ReadaheadPolicy) -> list[int]:
    """The windows a stream goes through: initial, doubling, then max_window."""
    out = [policy.initial_window]
    while out[-1] < policy.max_window:
        out.append(min(out[-1] * 2, policy.max_window))
    return out


class Checker:
    """Feeds reads to a tracker and checks every answer against the documented semantics.

    Streams are followed by their ids in `StreamTracker.streams`, so that 'within one stream' means the
    same here as in the module: a stream joined into another takes what it asked for along.
    """

    def __init__(self, file_size: int, policy: ReadaheadPolicy) -> None:
        self.t = StreamTracker(file_size, policy)
        self.p = policy
        self.size = file_size
        self.asked: dict[int, list[Range]] = {}  # stream id -> ranges returned for it (and streams joined into it)
        self.ranges: list[Range] = []
        self.allowed = set(windows(policy))

    def read(self, offset: int, size: int) -> Range | None:
        p = self.p
        before = {s.id: s for s in self.t.streams}
        order = list(before)
        r = self.t.on_read(offset, size)
        after = self.t.streams
        assert 1 <= len(after) <= p.max_streams
        cur = after[-1]  # the stream this read went to is now the most recently used
        gone = [sid for sid in order if sid not in {s.id for s in after}]
        continued = [sid for sid in order if abs(offset - before[sid].pos) <= p.tolerance]
        if cur.id in before:  # a continuation: every stream it continued is joined into one
            assert cur.id == continued[-1] and set(gone) == set(continued[:-1])
            parts = [before[sid] for sid in continued]
            for sid in gone:
                self.asked.setdefault(cur.id, []).extend(self.asked.pop(sid, []))
            assert cur.pos == max([*(s.pos for s in parts), min(offset + size, self.size)])
            assert cur.hits == max(s.hits for s in parts) + 1
            w0, req0 = max(s.window for s in parts), max(s.requested_end for s in parts)
        else:  # a new candidate; only the least recently used streams are dropped
            assert not continued and cur.id not in self.asked
            assert gone == order[:len(gone)] and len(before) - len(gone) + 1 <= p.max_streams
            for sid in gone:
                self.asked.pop(sid, None)
            assert cur.hits == 0
            w0, req0 = 0, 0
        if r is None:
            assert (cur.window, cur.requested_end) == (w0, req0)
        else:
            a, b = r
            assert 0 <= a < b <= self.size, "inside the file and never empty"
            assert cur.hits >= p.confirm_reads, "only confirmed streams prefetch"
            assert cur.window == (min(2 * w0, p.max_window) if w0 else p.initial_window), "the window doubles"
            assert a == max(cur.pos, req0) and b == cur.requested_end == min(cur.pos + cur.window, self.size)
            assert all(y <= a for _, y in self.asked.get(cur.id, [])), "never overlaps what the stream asked"
            self.asked.setdefault(cur.id, []).append(r)
            self.ranges.append(r)
        for s in after:
            assert s.window == 0 or s.window in self.allowed
            assert s.requested_end <= min(s.pos + s.window, self.size)
        return r

    def feed(self, reads: list[Range]) -> list[Range | None]:
        return [self.read(off, n) for off, n in reads]


# -- examples --------------------------------------------------------------------------------------------


def test_a_stream_prefetches_after_confirm_reads_continuing_reads() -> None:
    t = StreamTracker(1 * GiB)
    assert t.on_read(0, MiB) is None  # starts a candidate
    assert t.on_read(MiB, MiB) is None  # one continuing read
    assert t.on_read(2 * MiB, MiB) == (3 * MiB, 3 * MiB + 16 * MiB)  # two: sequential, initial window ahead of pos


def test_the_window_starts_small_and_doubles_while_the_reader_consumes_it() -> None:
    c = Checker(GiB, SMALL)
    got = [(i, r) for i, r in enumerate(c.feed(sequential([MiB] * 40))) if r is not None]
    # Asks when the reader is past half of what is outstanding; 4, 8, 16 MiB windows, then 16 MiB (max).
    assert got[:6] == [(2, (3 * MiB, 7 * MiB)), (4, (7 * MiB, 13 * MiB)), (8, (13 * MiB, 25 * MiB)),
                       (16, (25 * MiB, 33 * MiB)), (24, (33 * MiB, 41 * MiB)), (32, (41 * MiB, 49 * MiB))]
    assert [s.window for s in c.t.streams] == [16 * MiB]


def test_three_far_apart_reads_produce_nothing() -> None:
    t = StreamTracker(10 * GiB)
    assert [t.on_read(off, MiB) for off in (5 * GiB, 100 * MiB, 3 * GiB)] == [None, None, None]
    assert len(t.streams) == 3


def test_small_backward_and_forward_jumps_continue_a_stream() -> None:
    c = Checker(GiB, SMALL)
    reads = [(MiB, MiB), (0, MiB), (3 * MiB, MiB), (2 * MiB, MiB)]  # in flight, completed out of order
    assert c.feed(reads) == [None, None, (4 * MiB, 8 * MiB), None]
    assert len(c.t.streams) == 1


def test_a_jump_beyond_the_tolerance_is_not_a_continuation() -> None:
    c = Checker(GiB, SMALL)
    c.feed([(0, MiB), (MiB, MiB)])
    assert c.read(2 * MiB + SMALL.tolerance + 1, MiB) is None  # a new candidate, not the stream's 2nd continuation
    assert len(c.t.streams) == 2
    assert c.read(2 * MiB, MiB) == (3 * MiB, 7 * MiB)  # the old stream is still there


def test_ranges_stop_at_the_end_of_the_file() -> None:
    size = 10 * MiB + 123
    c = Checker(size, SMALL)
    got = [r for r in c.feed(sequential([MiB] * 11)) if r is not None]
    assert got[-1][1] == size and covers(got, 3 * MiB, size)
    assert c.read(size - 5, 128 * KiB) is None  # nothing past the end, nothing twice
    assert c.read(size + MiB, MiB) is None  # reads past the end are harmless


def test_an_empty_file_never_prefetches() -> None:
    c = Checker(0, SMALL)
    assert c.feed([(0, 4096)] * 5) == [None] * 5


def test_two_interleaved_readers_are_both_detected() -> None:
    c = Checker(4 * GiB, SMALL)
    for a, b in zip(sequential([MiB] * 20), sequential([MiB] * 20, start=2 * GiB), strict=True):
        c.read(*a)
        c.read(*b)
    assert any(r[0] < GiB for r in c.ranges) and any(r[0] >= 2 * GiB for r in c.ranges)
    assert sorted(s.pos for s in c.t.streams) == [20 * MiB, 2 * GiB + 20 * MiB]


def test_the_least_recently_used_stream_is_dropped() -> None:
    policy = ReadaheadPolicy(initial_window=4 * MiB, max_window=16 * MiB, tolerance=MiB, max_streams=2)
    c = Checker(10 * GiB, policy)
    c.feed([(0, MiB), (MiB, MiB)])  # a stream, one read from confirmation
    c.feed([(5 * GiB, MiB), (7 * GiB, MiB)])  # two random reads push it out
    assert c.read(2 * MiB, MiB) is None  # so this read starts over
    assert sorted(s.pos for s in c.t.streams) == [3 * MiB, 7 * GiB + MiB]


def test_streams_that_meet_are_joined_and_do_not_prefetch_twice() -> None:
    c = Checker(GiB, SMALL)
    assert c.feed(sequential([MiB] * 3, start=10 * MiB))[-1] == (13 * MiB, 17 * MiB)  # stream B
    c.feed(sequential([MiB] * 11))  # stream A, behind B: it cannot know that B asked for [13, 17) MiB
    assert len(c.t.streams) == 2 and c.ranges[-1] == (13 * MiB, 25 * MiB)
    c.read(11 * MiB, MiB)  # continues both A (pos 11 MiB) and B (pos 13 MiB): they are one stream now
    assert [(s.pos, s.window, s.requested_end) for s in c.t.streams] == [(13 * MiB, 16 * MiB, 25 * MiB)]
    before = len(c.ranges)
    c.feed(sequential([MiB] * 40, start=12 * MiB))
    assert len(c.ranges) > before and len(c.t.streams) == 1
    assert all(b0 <= a1 for (_, b0), (a1, _) in itertools.pairwise(sorted(c.ranges[before - 1:])))


def test_a_loader_reading_a_header_then_scattered_tensors_gets_no_prefetch() -> None:
    rng = random.Random(7)
    c = Checker(8 * GiB, ReadaheadPolicy())
    c.feed([(0, 8), (8, 100 * KiB)])  # the safetensors header length, then the header
    tensors = [GiB + k * 64 * MiB for k in range(100)]
    rng.shuffle(tensors)  # by name, not by offset
    assert c.feed([(off, 256 * KiB) for off in tensors]) == [None] * len(tensors)


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        ReadaheadPolicy(initial_window=0)
    with pytest.raises(ValueError):
        ReadaheadPolicy(initial_window=2 * MiB, max_window=MiB)
    with pytest.raises(ValueError):
        ReadaheadPolicy(max_streams=0)
    with pytest.raises(ValueError):
        StreamTracker(-1)
    with pytest.raises(ValueError):
        StreamTracker(MiB).on_read(-1, 10)


# -- properties ------------------------------------------------------------------------------------------


@st.composite
def policies(draw: st.DrawFn, min_confirm: int = 0) -> ReadaheadPolicy:
    initial = draw(st.integers(MiB, 8 * MiB))
    return ReadaheadPolicy(initial_window=initial, max_window=draw(st.integers(initial, 64 * initial)),
                           tolerance=draw(st.integers(0, 4 * MiB)), confirm_reads=draw(st.integers(min_confirm, 3)),
                           max_streams=draw(st.integers(1, 8)))


# A read either jumps anywhere or lands near the end of one of the last few reads (so streams form, meet,
# interleave and get evicted).
READS = st.lists(st.tuples(st.booleans(), st.integers(0, 600 * MiB), st.integers(0, 3),
                           st.integers(-6 * MiB, 6 * MiB), st.integers(0, 8 * MiB)), max_size=150)


@FAST
@given(policy=policies(), size=st.integers(0, 512 * MiB), reads=READS)
def test_any_reads_get_ranges_inside_the_file_that_never_overlap_within_a_stream(
        policy: ReadaheadPolicy, size: int, reads: list[tuple[bool, int, int, int, int]]) -> None:
    # The Checker asserts, per read: non-empty, within [0, size), no overlap with anything the stream asked
    # for, windows doubling from initial_window up to max_window, LRU eviction, joins of met streams.
    c = Checker(size, policy)
    ends: list[int] = []
    for jump, anywhere, back, delta, n in reads:
        off = anywhere if jump or not ends else max(0, ends[-1 - back % len(ends)] + delta)
        c.read(off, n)
        ends.append(off + n)


@FAST
@given(policy=st.sampled_from([ReadaheadPolicy(), ReadaheadPolicy(initial_window=8 * MiB, max_window=32 * MiB)]),
       sizes=st.lists(st.integers(4 * KiB, 4 * MiB), min_size=4, max_size=400), data=st.data())
def test_a_sequential_reader_gets_every_byte_ahead_exactly_once(
        policy: ReadaheadPolicy, sizes: list[int], data: st.DataObject) -> None:
    size = sum(sizes) - data.draw(st.integers(0, sizes[-1] - 1))  # the last read may run past the end
    c = Checker(size, policy)
    answers = c.feed(sequential(sizes))
    first = next(i for i, r in enumerate(answers) if r is not None)
    assert first == policy.confirm_reads  # right after confirmation
    start = c.ranges[0][0]
    assert start == min(sum(sizes[:first + 1]), size)
    assert all(b0 == a1 for (_, b0), (a1, _) in itertools.pairwise(c.ranges)), "contiguous: the reader never outruns"
    assert covers(c.ranges, start, size)
    assert sum(b - a for a, b in c.ranges) == size - start <= size


@FAST
@given(sizes=st.lists(st.integers(128 * KiB, MiB), min_size=8, max_size=300), rnd=st.randoms(use_true_random=False))
def test_kernel_readahead_jitter_is_still_one_sequential_stream(sizes: list[int], rnd: random.Random) -> None:
    size = sum(sizes)
    reads = sequential(sizes)
    jittered: list[Range] = []
    for i in range(0, len(reads), 4):  # four requests in flight, completed in any order
        group = reads[i:i + 4]
        rnd.shuffle(group)
        jittered += group
    c = Checker(size, ReadaheadPolicy())
    answers = c.feed(jittered)
    assert len(c.t.streams) == 1, "one stream, not one per reordered request"
    first = next(i for i, r in enumerate(answers) if r is not None)
    assert first == 2  # confirm_reads continuing reads after the first
    assert covers(c.ranges, c.ranges[0][0], size) and sum(b - a for a, b in c.ranges) <= size


@FAST
@given(policy=policies(min_confirm=1), slots=st.lists(st.integers(0, 10_000), unique=True, max_size=60),
       data=st.data())
def test_random_reads_far_from_each_other_never_prefetch(
        policy: ReadaheadPolicy, slots: list[int], data: st.DataObject) -> None:
    # Each read lies in its own slot, three tolerances wide: further than `tolerance` from any other read's end.
    width = 3 * policy.tolerance + 2
    c = Checker(10_001 * width, policy)
    for slot in slots:
        jitter = data.draw(st.integers(0, width // 3))
        assert c.read(slot * width + jitter, data.draw(st.integers(0, width // 3))) is None
    assert len(c.t.streams) == min(len(slots), policy.max_streams)


@FAST
@given(policy=policies(), sizes=st.lists(st.integers(4 * KiB, 4 * MiB), max_size=300))
def test_the_window_doubles_monotonically_up_to_max_window(policy: ReadaheadPolicy, sizes: list[int]) -> None:
    c = Checker(1 << 40, policy)
    seen: list[int] = []
    for off, n in sequential(sizes):
        if c.read(off, n) is not None:
            seen.append(c.t.streams[-1].window)
    assert seen == windows(policy)[:len(seen)] + [policy.max_window] * (len(seen) - len(windows(policy)))
    assert all(b - a <= policy.max_window for a, b in c.ranges)


@FAST
@given(a_sizes=st.lists(st.integers(4 * KiB, 2 * MiB), min_size=3, max_size=100),
       b_sizes=st.lists(st.integers(4 * KiB, 2 * MiB), min_size=3, max_size=100),
       schedule=st.lists(st.booleans(), max_size=200))
def test_two_interleaved_streams_both_get_prefetch(a_sizes: list[int], b_sizes: list[int],
                                                   schedule: list[bool]) -> None:
    b_start = GiB
    c = Checker(2 * GiB, ReadaheadPolicy())
    a, b = iter(sequential(a_sizes)), iter(sequential(b_sizes, start=b_start))
    for pick_a in schedule:  # any interleaving, then whatever is left of each
        read = next(a if pick_a else b, None)
        if read is not None:
            c.read(*read)
    for read in itertools.chain(a, b):
        c.read(*read)
    assert any(r[0] < b_start for r in c.ranges) and any(r[0] >= b_start for r in c.ranges)
    assert len(c.t.streams) == 2
    for s in c.t.streams:  # each is half a window to a window ahead of its reader
        assert s.requested_end - s.pos > s.window // 2
