"""Error types shared by the core; `fs` maps them to errno at one boundary.

The core raises these instead of FUSE errors so it stays testable without a mount, and so the
CLI can print any of them as one line for users.
"""

from __future__ import annotations

import errno


class ModelfsError(Exception):
    """An error whose message is fit to show a user as one line."""

    errno: int = errno.EIO


class ConfigError(ModelfsError):
    """Bad configuration: unknown key, wrong type, bad URL."""

    errno = errno.EINVAL


class NotFound(ModelfsError):
    """No such key or prefix in the store (or it is hidden because it is unsafe)."""

    errno = errno.ENOENT


class StoreError(ModelfsError):
    """The store failed a request after its retries: unreachable, 5xx, denied, short body.

    `transient`: the store may answer the same request later (a 5xx, throttling, a refused, cut or silent
    connection, a body cut short), so a read tries again within fetch.deadline; a denial, a missing bucket
    or a changed object is final.
    """

    errno = errno.EIO

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class StoreUnreachable(StoreError):
    """No connection to the store could be made, or a request got no answer at all.

    One such request is a sign, not a verdict: an overloaded store refuses connections and stalls too
    (`health` decides when it is an outage).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


class VersionChanged(StoreError):
    """The object was overwritten: its ETag no longer matches the version this inode serves.

    Never serve bytes of the new version under the old inode ("old or new, never mixed").
    """

    errno = errno.ESTALE


class ReadOnly(ModelfsError):
    """Any mutation: the filesystem is read-only."""

    errno = errno.EROFS
