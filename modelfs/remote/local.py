"""A local directory as a store: the embedded default, and the reference for tests.

The ETag of a file is derived from (inode, mtime_ns, size): a file replaced or rewritten in place
gets a new ETag, which makes it a new version, exactly like an overwritten S3 object.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence

from modelfs.errors import ConfigError, NotFound, StoreError, VersionChanged
from modelfs.remote.base import Listing, ObjectInfo


def _etag(st: os.stat_result) -> str:
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


class LocalStore:
    """Serves the regular files under `root`; symlinks are followed (e.g. a Hugging Face cache snapshot)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        if not os.path.isdir(self.root):
            raise ConfigError(f"source: {root} is not a directory")
        self.identity = f"file:{self.root}"
        self.domain = self.identity
        self.hedged = 0  # one local read never stalls the way a request can
        self.unhedged = 0

    def describe(self) -> str:
        return self.root

    def check(self) -> None:
        try:
            os.listdir(self.root)
        except OSError as e:
            raise StoreError(f"cannot read source directory {self.root}: {e.strerror}") from None

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def list_dir(self, prefix: str) -> Listing:
        listing = Listing()
        try:
            it = os.scandir(self._path(prefix))
        except FileNotFoundError:
            raise NotFound(f"no such directory: {prefix}") from None
        except OSError as e:
            raise StoreError(f"cannot list {self._path(prefix)}: {e.strerror}") from None
        with it:
            for entry in it:
                try:
                    st = entry.stat()  # follows symlinks
                except OSError:
                    continue  # dangling symlink or raced deletion: not part of the tree
                if stat.S_ISDIR(st.st_mode):
                    listing.dirs.append(entry.name)
                elif stat.S_ISREG(st.st_mode):
                    key = prefix + entry.name
                    listing.objects.append((entry.name, ObjectInfo(key, st.st_size, _etag(st), st.st_mtime)))
        return listing

    def read_into(self, obj: ObjectInfo, start: int, views: Sequence[memoryview],
                  filled: Callable[[int], None] | None = None) -> None:
        try:
            fd = os.open(self._path(obj.key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VersionChanged(f"{obj.key} was removed from the store") from None
        except OSError as e:
            raise StoreError(f"cannot open {obj.key}: {e.strerror}") from None
        try:
            if _etag(os.fstat(fd)) != obj.etag:
                raise VersionChanged(f"{obj.key} changed in the store")
            pending = [v for v in views if len(v)]
            pos = start
            while pending:
                n = os.preadv(fd, pending, pos)
                if n == 0:
                    raise VersionChanged(f"{obj.key} changed in the store while it was read")
                pos += n
                while pending and n >= len(pending[0]):
                    n -= len(pending.pop(0))
                if n:
                    pending[0] = pending[0][n:]
            if _etag(os.fstat(fd)) != obj.etag:
                raise VersionChanged(f"{obj.key} changed in the store while it was read")
        except OSError as e:
            raise StoreError(f"cannot read {obj.key}: {e.strerror}") from None
        finally:
            os.close(fd)
        if filled is not None:  # one local read for all: every view is complete at once
            for k in range(len(views)):
                filled(k)

    def close(self) -> None:
        pass
