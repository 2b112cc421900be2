"""Claims: of the nodes that miss one extent in the fleet tier at once, one fetches it from the origin.

A claim is made with a conditional PUT (If-None-Match: *) of `layout.claim_key`: of nodes that miss one extent
at once, exactly one fetches it from the origin and writes it to the tier before any other write-back (after
answering its own readers: its loads never wait for the tier), then deletes the claim; the others poll the
claim listing until the claim is gone, for a bounded time, then read it from the tier or fetch it
themselves. A node whose claim wins first checks that the extent is not there already (`landed`): another
node may have written it and deleted its claim between this node's miss and its claim. A crash before the
write leaves the claim: the others wait out the bound, then fetch it themselves. A claim left by a node that
died is taken over once older than any flight may run (by the store's clock, not a node's).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import trio

from modelfs.errors import ModelfsError, NotFound
from modelfs.remote import Listing, WritableStore
from modelfs.shared.layout import claim_key
from modelfs.stats import Stats

#: How often a node waiting for extents other nodes claimed lists their claims (one LIST per directory).
CLAIM_POLL = 0.05
#: The longest a waiter sleeps before it reads the clock again.
WAIT_TICK = 0.05

log = logging.getLogger(__name__)


class Claims:
    """This node's claims and its waits for other nodes' claims. `claim`, `landed`, `wait` and `drop` run in
    fetch worker threads; `watch` is a supervised task on the trio thread."""

    def __init__(self, store: WritableStore, stats: Stats, node: str, *, deadline: float, flight_deadline: float,
                 answered: Callable[[], None], unanswered: Callable[[BaseException], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.stats = stats
        self.node = node
        self._answered = answered  # the tier's health hears of every answer, and of every request without one
        self._unanswered = unanswered
        # A peer's claimed extent normally lands within a GET and a PUT; past this with no claim landing
        # anywhere in the directories waited on, fetch it here. While claims keep landing (the fleet is
        # writing, only behind: a busy tier, a long queue of claimed writes), wait on, up to a flight's
        # deadline: a node that died stops every claim of its own, not the others'.
        self.wait_least = 4 * deadline
        self.wait_most = max(self.wait_least, flight_deadline)
        self.stale_after = flight_deadline + self.wait_least
        # What the waits are timed by (time.monotonic; a test's clock that it moves by hand): a waiter looks at
        # it again at least every WAIT_TICK, so a clock moved ahead is seen at once.
        self.clock = clock
        self._progress = 0.0  # `clock()` when a claim last vanished from a listing (trio thread writes)
        # Fetch threads waiting for extents other nodes claimed: claim key -> one event per waiter.
        self._waiters: dict[str, list[threading.Event]] = {}
        self._waiters_lock = threading.Lock()
        self._watch_wake = trio.lowlevel.ParkingLot()
        self.token: trio.lowlevel.TrioToken | None = None  # the daemon's, once the tier serves (`SharedTier.start`)

    def claim(self, key: str) -> bool:
        """After a miss of `key`: True if this node is to fetch it from the origin and share it at once; False if
        another node is fetching it now (`wait` for it). ModelfsError, OSError: the tier cannot say."""
        ckey = claim_key(key)
        if self.store.put(ckey, self.node.encode(), {}, if_absent=True):
            self._answered()
            return True
        age = self.store.age(ckey)
        self._answered()
        if age is None or age > self.stale_after:  # shared meanwhile, or its node died: ours now
            self.store.put(ckey, self.node.encode(), {})
            return True
        return False

    def landed(self, key: str) -> bool:
        """After this node won a claim: whether the extent is in the tier after all. Another node may have
        written it and dropped its claim between this node's miss and its claim (seconds, on a busy tier);
        one HEAD then saves a GET from the origin and a PUT."""
        try:
            return self.store.exists(key)
        except (ModelfsError, OSError) as e:
            self._unanswered(e)
            return False

    def drop(self, key: str) -> None:
        """Drop this node's claim on `key` (shared, or its fetch failed: nobody need wait any longer)."""
        try:
            self.store.delete(claim_key(key))
        except (ModelfsError, OSError) as e:  # left: the others wait out the bound, as for a node that died
            log.debug("shared cache tier: claim on %s not dropped: %s", key, e)

    def wait(self, key: str, until: float = float("inf")) -> bool:
        """Wait for another node's claim on `key` to go (it wrote the extent, or gave up): `wait_least` seconds
        past the last claim seen to land, `wait_most` at most, never past `until`. True if it went (read it from
        the tier now), False if the wait ran out (fetch it from the origin).

        The claimer deletes its claim once the extent is written (or its fetch failed), so the waiter sleeps
        until its claim is gone from the claim listing, which one task of this daemon polls for all of its
        waiters at once (`watch`): the tier sees one LIST per claimed directory per `CLAIM_POLL`, however many
        extents this node waits for."""
        if self.token is None:
            return False
        self.stats.add(shared_waits=1)
        gone = threading.Event()
        ckey = claim_key(key)
        with self._waiters_lock:
            self._waiters.setdefault(ckey, []).append(gone)
        try:
            self.token.run_sync_soon(self._watch_wake.unpark_all)
            if not self._until_gone(gone, until):
                self.stats.add(shared_misses=1, shared_wait_expired=1)
                return False
            return True
        except trio.RunFinishedError:
            return False
        finally:
            with self._waiters_lock:  # timed out (a woken waiter is already forgotten)
                events = self._waiters.get(ckey, [])
                if gone in events:
                    events.remove(gone)
                    if not events:
                        del self._waiters[ckey]

    def _until_gone(self, gone: threading.Event, most: float) -> bool:
        began = self.clock()
        while True:
            until = min(most, began + self.wait_most, max(began, self._progress) + self.wait_least)
            left = until - self.clock()
            if left <= 0:
                return gone.is_set()
            if gone.wait(min(left, WAIT_TICK)):
                return True

    async def watch(self) -> None:
        """While any fetch thread waits for an extent another node claimed: list the directories of those
        claims every CLAIM_POLL and wake the waiters whose claim is gone. A failed listing wakes them all
        (they fetch from the origin: a tier that cannot list is not one to wait for). Any claim listed
        before and gone now, this node's waiters' or not, is progress: the fleet's claimed writes land."""
        listed: dict[str, set[str]] = {}
        while True:
            with self._waiters_lock:
                waited = list(self._waiters)
            if not waited:
                listed.clear()
                await self._watch_wake.park()
                continue
            dirs: dict[str, list[str]] = {}
            for ckey in waited:
                parent, _, name = ckey.rpartition("/")
                dirs.setdefault(parent + "/", []).append(name)
            gone: list[str] = []
            for parent, names in dirs.items():
                try:
                    listing = await trio.to_thread.run_sync(self.store.list_dir, parent, abandon_on_cancel=True)
                except NotFound:  # a directory store lists no claims as no directory
                    listing = Listing()
                except (ModelfsError, OSError) as e:
                    self._unanswered(e)
                    gone += [parent + n for n in names]
                    continue
                self._answered()
                present = {n for n, _ in listing.objects}
                gone += [parent + n for n in names if n not in present]
                if listed.get(parent, set()) - present:
                    self._progress = self.clock()
                listed[parent] = present
            self.stats.add(shared_polls=1)
            with self._waiters_lock:
                for ckey in gone:  # woken: not listed again for them
                    for event in self._waiters.pop(ckey, ()):
                        event.set()
            await trio.sleep(CLAIM_POLL)
