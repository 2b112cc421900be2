"""A local directory as a store: the embedded default, and the reference for tests.

The ETag of a file is derived from (inode, mtime_ns, size): a file replaced or rewritten in place
gets a new ETag, which makes it a new version, exactly like an overwritten S3 object.
"""

from __future__ import annotations

import os
import stat

from modelfs.errors import ConfigError, NotFound, StoreError, VersionChanged
from modelfs.remote import Listing, ObjectInfo


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

    def get_range(self, obj: ObjectInfo, start: int, length: int) -> bytes:
        try:
            fd = os.open(self._path(obj.key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VersionChanged(f"{obj.key} was removed from the store") from None
        except OSError as e:
            raise StoreError(f"cannot open {obj.key}: {e.strerror}") from None
        try:
            if _etag(os.fstat(fd)) != obj.etag:
                raise VersionChanged(f"{obj.key} changed in the store")
            parts = [os.pread(fd, length, start)]
            done = len(parts[0])
            while 0 < done < length and parts[-1]:
                parts.append(os.pread(fd, length - done, start + done))
                done += len(parts[-1])
            if done != length or _etag(os.fstat(fd)) != obj.etag:
                raise VersionChanged(f"{obj.key} changed in the store while it was read")
            return parts[0] if len(parts) == 1 else b"".join(parts)
        except OSError as e:
            raise StoreError(f"cannot read {obj.key}: {e.strerror}") from None
        finally:
            os.close(fd)

    def close(self) -> None:
        pass
