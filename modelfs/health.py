"""Store reachability: offline mode when the store cannot be reached, and the probe that ends it.

When the store stops answering (at mount, or mid-run), modelfs keeps serving what it holds: listings
saved in the index and blocks in the cache. While offline, a read of bytes that are not cached fails at
once with EIO instead of waiting out retries, and a background probe checks the store every
`interval` seconds; the first answer ends offline mode.

An overloaded store is not an outage: it refuses a connection, or leaves one request unanswered, and
answers the next. So one failed request only makes the store *suspect*: reads go on trying within
fetch.deadline, the probe checks the store every second, and offline mode begins only when the store has
answered nothing, neither requests nor checks, for `offline_after` seconds. The mount's own check failing
(`confirmed`) begins it at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import trio

from modelfs.errors import StoreError, StoreUnreachable

log = logging.getLogger(__name__)


class Health:
    """Thread-safe offline flag, set from fetch threads, cleared by `probe_loop` in the daemon's nursery."""

    def __init__(self, check: Callable[[], None], describe: str, interval: float = 5.0,
                 timeout: float = 30.0, mode: str = "offline mode, serving what the cache holds",
                 offline_after: float = 0.0) -> None:
        self._check = check
        self._describe = describe
        self._mode = mode  # what being unreachable means, for the log
        self.interval = interval
        self.timeout = timeout
        self.offline_after = offline_after  # 0: the first failure is the verdict
        self._lock = threading.Lock()
        self._offline_since: float | None = None
        self._suspect_since: float | None = None  # first failure since the store last answered

    @property
    def offline(self) -> bool:
        return self._offline_since is not None

    @property
    def suspect(self) -> bool:
        return self._suspect_since is not None

    def mark_unreachable(self, why: BaseException, confirmed: bool = False) -> None:
        """A request (or check) got no answer. Offline mode begins if `confirmed`, or if the store has
        answered nothing for `offline_after` seconds; until then the store is only suspect."""
        now = time.monotonic()
        with self._lock:
            if self._offline_since is not None:
                return
            if self._suspect_since is None:
                self._suspect_since = now
            if not confirmed and now - self._suspect_since < self.offline_after:
                suspected = self._suspect_since == now
                going = False
            else:
                self._offline_since, self._suspect_since = now, None
                suspected, going = False, True
        if going:
            log.warning("%s unreachable (%s): %s", self._describe, why, self._mode)
        elif suspected:
            log.info("%s did not answer a request (%s): trying again; %s if it answers nothing for %g s",
                     self._describe, why, self._mode.split(",")[0], self.offline_after)

    def answered(self) -> None:
        """A request got its answer: whatever failed before was the store's load, not an outage."""
        if self._suspect_since is not None:
            with self._lock:
                self._suspect_since = None

    def mark_reachable(self) -> None:
        with self._lock:
            since, self._offline_since = self._offline_since, None
        if since is not None:
            log.warning("%s reachable again after %.0f s: %s ended", self._describe,
                        time.monotonic() - since, self._mode.split(",")[0])

    def unreachable_error(self, what: str) -> StoreUnreachable:
        return StoreUnreachable(f"{self._describe} is unreachable (offline mode) and {what} is not cached")

    async def probe_loop(self) -> None:
        """While offline, check the store every `interval` seconds; while it is suspect, every second,
        each check bounded by `timeout` (by `offline_after` while suspect)."""
        while True:
            await trio.sleep(self.interval if self.offline else 1.0)
            if not self.offline and not self.suspect:
                continue
            bound = self.timeout if self.offline else max(1.0, min(self.timeout, self.offline_after))
            try:
                with trio.fail_after(bound):
                    await trio.to_thread.run_sync(self._check, abandon_on_cancel=True)
            except (StoreError, OSError, trio.TooSlowError) as e:
                log.debug("store still unreachable: %s", e)
                if not self.offline:
                    self.mark_unreachable(e if isinstance(e, StoreError) else TimeoutError("no answer to a check"))
                continue
            if self.offline:
                self.mark_reachable()
            else:
                self.answered()


def check_within(check: Callable[[], None], timeout: float, describe: str) -> None:
    """Run a blocking store check, giving up after `timeout` seconds with StoreUnreachable.

    For the mount, before trio runs: a silent endpoint must not hold `modelfs mount` for minutes of
    retries. The check runs in a daemon thread, which is abandoned if it overruns.
    """
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            check()
            result.append(None)
        except BaseException as e:  # handed to the caller below
            result.append(e)

    t = threading.Thread(target=run, name="store-check", daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        raise StoreUnreachable(f"store {describe} did not answer within {timeout:g} s")
    if result[0] is not None:
        raise result[0]
