"""The retry policy's pieces: pauses jittered within their bounds and doubling to a cap, and a read that
resumes from its first buffer not yet whole, telling its caller of each buffer once, by its place in the
whole read."""

from __future__ import annotations

from modelfs.retry import BODY_PAUSES, STORE_PAUSES, Pauses, Resume


def test_pauses_double_up_to_their_cap_each_jittered_within_its_bounds() -> None:
    for policy in (STORE_PAUSES, BODY_PAUSES, Pauses(1.0, 3.0, floor=0.9)):
        for _ in range(50):  # jitter is random: many loops, every draw in its bounds
            backoff, bound = policy.start(), policy.first
            for _ in range(6):
                assert backoff.upcoming == bound
                pause = backoff.draw()
                assert bound * policy.floor <= pause <= bound
                bound = min(2 * bound, policy.most)
    assert STORE_PAUSES.first == 0.25 and STORE_PAUSES.most == 2.0


def test_a_read_resumes_from_its_first_buffer_not_yet_whole() -> None:
    views = [memoryview(bytearray(n)) for n in (10, 20, 30, 40)]
    heard: list[int] = []
    r = Resume(1000, views, heard.append)
    at, rest = r.attempt()
    assert at == 1000 and len(rest) == 4
    r.complete(0)  # the first attempt filled views 0 and 1, then failed inside view 2
    r.complete(1)
    at, rest = r.attempt()
    assert at == 1030 and [len(v) for v in rest] == [30, 40] and not r.finished
    r.complete(0)  # view 2 of the whole read, 0 of this attempt's
    at, rest = r.attempt()
    assert at == 1060 and [len(v) for v in rest] == [40]
    r.complete(0)
    assert r.finished and r.attempt()[1] == [] and heard == [0, 1, 2, 3]
