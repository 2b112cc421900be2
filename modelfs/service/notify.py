"""systemd's readiness protocol (sd_notify), without libsystemd: one datagram per state change.

`Type=notify` units get READY=1 only once the mount answers, STOPPING=1 when a stop begins, and a STATUS
line with the key counters while they run. Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

from modelfs.stats import human

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1\\nSTATUS=...") to $NOTIFY_SOCKET; False when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(message.encode())
    except OSError as e:
        log.debug("sd_notify to %s failed: %s", addr, e)
        return False
    return True


def status_line(counters: dict[str, int], offline: bool) -> str:
    """The one-line STATUS systemctl shows: what was served, fetched and cached, and health."""
    hits, misses = counters.get("cache_hits", 0), counters.get("cache_misses", 0)
    rate = f"{100 * hits / (hits + misses):.0f}%" if hits + misses else "-"
    return (f"{'OFFLINE (serving the cache) ' if offline else ''}served {human(counters.get('bytes_served', 0))}, "
            f"fetched {human(counters.get('bytes_fetched', 0))}, cache {human(counters.get('bytes_in_cache', 0))}, "
            f"hit rate {rate}, errors {counters.get('store_errors', 0)}")
