"""The extended attributes a mount answers: the daemon's admin interface (the mount is read-only, so every
request is a getxattr; `fs` answers them, `cli` and `mount` ask them)."""

from __future__ import annotations

#: Root: the counters as JSON (`modelfs stats`, the Prometheus exporter).
STATS = b"user.modelfs.stats"
#: Root: the daemon's pid (`modelfs umount` waits for it to exit).
PID = b"user.modelfs.pid"
#: Root: health for `modelfs status`: is the store reachable (checked now), is the cache writable.
HEALTH = b"user.modelfs.health"
#: A file: reading it fetches the whole file into the cache first (`modelfs prefetch`); a getxattr,
#: because the mount is read-only and setxattr never reaches the daemon.
PREFETCH = b"user.modelfs.prefetch"
#: A file: how many of its bytes are cached.
CACHED = b"user.modelfs.cached"
#: A file: its extents, their hashes where known, and which are cached (`modelfs du`).
EXTENTS = b"user.modelfs.extents"

ROOT = (STATS, PID, HEALTH)
FILE = (CACHED, EXTENTS)  # listed; PREFETCH is not (a listing tool reading every xattr would fetch the file)
