"""Test-only fault injection: off unless MODELFS_TEST_FAULTS is set in the daemon's environment at start
(the mount builds one `Faults` from it and hands it to the fetcher and the prefetcher).

The value is a comma-separated list of `site:key-substring`; each entry raises `InjectedFault` once, the
first time code at that site handles a key containing the substring, then disarms. Sites: `flight` (the
worker thread of a GET, before it reads the store) and `prefetch` (a prefetch worker, before it handles
an extent). The tests use it to show that an unexpected exception fails one read or one job, never the
mount.
"""

from __future__ import annotations

import os
import threading

ENV = "MODELFS_TEST_FAULTS"
SITES = ("flight", "prefetch")


class InjectedFault(RuntimeError):
    """Raised at a fault site armed by MODELFS_TEST_FAULTS."""


class Faults:
    """Armed (site, key substring) pairs; `check` is cheap when none are armed."""

    def __init__(self, spec: str = "") -> None:
        self._armed: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        for item in filter(None, (part.strip() for part in spec.split(","))):
            site, _, needle = item.partition(":")
            if site not in SITES:
                raise ValueError(f"{ENV}: unknown fault site {site!r} (known: {', '.join(SITES)})")
            self._armed.append((site, needle))

    def check(self, site: str, key: str) -> None:
        """Raise InjectedFault if an armed entry matches (once per entry). From any thread."""
        if not self._armed:
            return
        with self._lock:
            for i, (s, needle) in enumerate(self._armed):
                if s == site and needle in key:
                    del self._armed[i]
                    raise InjectedFault(f"injected fault at {site} for {key}")


NONE = Faults()  # nothing armed: what every part gets unless the mount passes the environment's


def from_environment() -> Faults:
    """At daemon start: what MODELFS_TEST_FAULTS arms (nothing when unset)."""
    return Faults(os.environ.get(ENV, ""))
