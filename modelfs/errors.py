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
    """The store failed a request after its retries: unreachable, 5xx, denied, short body."""

    errno = errno.EIO


class StoreUnreachable(StoreError):
    """The store does not answer at all (connection refused or timed out): offline mode may serve the cache."""


class VersionChanged(StoreError):
    """The object was overwritten: its ETag no longer matches the version this inode serves.

    Never serve bytes of the new version under the old inode ("old or new, never mixed").
    """

    errno = errno.ESTALE


class ReadOnly(ModelfsError):
    """Any mutation: the filesystem is read-only."""

    errno = errno.EROFS
