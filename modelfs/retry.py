"""The one retry policy of the daemon: what is tried again, after what pause, and what a retry asks for.

Three loops retry what botocore cannot see or gave up on, each with this module's pieces:
- a ranged GET's body cut, reset, stalled or short after its headers came (`remote.s3.S3Store.read_into`:
  `BODY_PAUSES`, a few quick attempts);
- a GET the store refused, stalled or 5xx'd past botocore's retries (an overloaded store, not an outage:
  `sources.Origin`, `STORE_PAUSES` until the flight's deadline or offline mode);
- a directory listing that failed the same way and was never saved (`listings.Listings.list_dir`, the same).

Every pause is jittered (a fleet that failed together does not retry together) and grows exponentially up to
a cap. A GET that fails part-way is resumed from the first buffer not yet whole (`Resume`): what arrived
whole is kept, never asked for again.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Pauses:
    """Pauses before each retry: `first` seconds, doubling up to `most`; each drawn from [p x `floor`, p]."""

    first: float
    most: float
    floor: float = 0.5  # 0: full jitter

    def start(self) -> Backoff:
        """The pauses of one loop."""
        return Backoff(self)


class Backoff:
    """One loop's pauses (`Pauses`): `upcoming` is the most the next one can be, `draw` takes it."""

    def __init__(self, policy: Pauses) -> None:
        self.policy = policy
        self.upcoming = policy.first

    def draw(self) -> float:
        """The pause to take now (jittered); the one after it doubles, up to the cap."""
        p = self.upcoming
        self.upcoming = min(2 * p, self.policy.most)
        return random.uniform(p * self.policy.floor, p)


#: A GET or a listing the store failed for now: 0.25 s, doubling to 2 s, until the request's deadline.
STORE_PAUSES = Pauses(0.25, 2.0)
#: A GET's body that failed after its headers: a few quick tries (full jitter from 0.2 s), then the error.
BODY_PAUSES = Pauses(0.2, 0.8, floor=0.0)
BODY_ATTEMPTS = 4


class Resume:
    """A ranged read into `views` (consecutive buffers from byte `start`) over several attempts: each attempt
    asks only for the views not yet whole. `complete` is what the store calls as view k of the current
    attempt's list fills up; `filled` hears of each view of the whole list as it does."""

    def __init__(self, start: int, views: Sequence[memoryview], filled: Callable[[int], None] | None = None) -> None:
        self.start = start
        self.views = views
        self.filled = filled
        self.done = 0  # views whole so far
        self._first = 0  # the first view of the attempt in progress

    def attempt(self) -> tuple[int, Sequence[memoryview]]:
        """Start an attempt: the offset to ask from and the views it fills (empty: nothing left)."""
        self._first = self.done
        return self.start + sum(len(v) for v in self.views[:self.done]), self.views[self.done:]

    def complete(self, k: int) -> None:
        self.done = self._first + k + 1
        if self.filled is not None:
            self.filled(self._first + k)

    @property
    def finished(self) -> bool:
        return self.done == len(self.views)
