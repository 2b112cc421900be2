"""Stream detection: property tests of the read-ahead policy (pure logic)."""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from modelfs.readahead import ReadaheadPolicy, StreamTracker

MiB = 1 << 20
POLICY = ReadaheadPolicy(initial_window=4 * MiB, max_window=64 * MiB, tolerance=2 * MiB, confirm_reads=2)


def sequential(size: int, req: list[int]) -> list[tuple[int, int]]:
    out, off, i = [], 0, 0
    while off < size:
        n = req[i % len(req)]
        out.append((off, n))
        off += n
        i += 1
    return out


@settings(max_examples=200, deadline=None)
@given(reads=st.lists(st.tuples(st.integers(0, 300 * MiB), st.integers(1, 4 * MiB)), max_size=200),
       size=st.integers(1, 256 * MiB))
def test_ranges_are_inside_the_file_non_empty_and_never_repeat(reads: list[tuple[int, int]], size: int) -> None:
    t = StreamTracker(size, POLICY)
    covered: list[tuple[int, int]] = []
    for off, n in reads:
        r = t.on_read(off, n)
        if r is not None:
            assert 0 <= r[0] < r[1] <= size
            assert r[1] - r[0] <= POLICY.max_window
            covered.append(r)
    total = sum(b - a for a, b in covered)
    assert total <= size * POLICY.max_streams


@settings(max_examples=200, deadline=None)
@given(req=st.lists(st.integers(4096, 4 * MiB), min_size=1, max_size=8), size=st.integers(16 * MiB, 400 * MiB))
def test_sequential_reader_gets_everything_ahead_once(req: list[int], size: int) -> None:
    t = StreamTracker(size, POLICY)
    ranges = [r for off, n in sequential(size, req) if (r := t.on_read(off, n)) is not None]
    assert ranges, "a sequential reader must trigger read-ahead"
    for (a0, b0), (a1, _b1) in itertools.pairwise(ranges):
        assert a1 >= b0 and a0 < b0  # in order, never overlapping (a gap only where the reader outran us)
    assert ranges[-1][1] == size  # read-ahead reaches the end of the file
    assert sum(b - a for a, b in ranges) <= size


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_kernel_readahead_jitter_is_still_sequential(seed: int) -> None:
    rng = random.Random(seed)
    size = 200 * MiB
    reqs = sequential(size, [rng.choice([128 * 1024, 512 * 1024, MiB])])
    jittered: list[tuple[int, int]] = []
    for i in range(0, len(reqs), 4):  # several requests in flight, answered in any order
        group = reqs[i:i + 4]
        rng.shuffle(group)
        jittered += group
    t = StreamTracker(size, ReadaheadPolicy(initial_window=4 * MiB, max_window=64 * MiB, tolerance=4 * MiB))
    ranges = [r for off, n in jittered if (r := t.on_read(off, n)) is not None]
    assert ranges and ranges[-1][1] == size
    assert len(t._streams) == 1  # one stream, not one per reordered request


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_random_access_never_prefetches(seed: int) -> None:
    rng = random.Random(seed)
    size = 1 << 40
    t = StreamTracker(size, POLICY)
    offsets: list[int] = []
    for _ in range(100):
        while True:  # every read far from every earlier one
            off = rng.randrange(0, size - MiB)
            if all(abs(off - o) > 2 * POLICY.tolerance for o in offsets):
                break
        offsets.append(off)
        assert t.on_read(off, 4096) is None


def test_window_starts_small_and_doubles_up_to_max() -> None:
    size = 1 << 34
    t = StreamTracker(size, POLICY)
    widths = [b - a for off, n in sequential(size, [MiB]) if (r := t.on_read(off, n)) is not None
              for a, b in [r]]
    assert widths[0] == POLICY.initial_window - 2 * MiB or widths[0] <= POLICY.initial_window
    assert max(widths) <= POLICY.max_window
    windows = [t._streams[k].window for k in t._streams]
    assert windows == [POLICY.max_window]


def test_two_interleaved_streams_are_both_detected() -> None:
    size = 1 << 32
    t = StreamTracker(size, POLICY)
    a, b = 0, 2 << 30
    got_a = got_b = False
    for _ in range(20):
        ra = t.on_read(a, MiB)
        rb = t.on_read(b, MiB)
        got_a |= ra is not None and ra[0] < (1 << 30)
        got_b |= rb is not None and rb[0] >= (2 << 30)
        a += MiB
        b += MiB
    assert got_a and got_b
