"""A local directory as a store: the embedded default, the reference for tests, and a shared cache tier
on a file system every node mounts (writes: `get_into`, `put`, `age`, `delete`).

The ETag of a file is derived from (inode, mtime_ns, size): a file replaced or rewritten in place
gets a new ETag, which makes it a new version, exactly like an overwritten S3 object.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Sequence
from typing import BinaryIO

from modelfs.errors import ConfigError, NotFound, StoreError, VersionChanged
from modelfs.remote.base import Listing, ObjectInfo


def _etag(st: os.stat_result) -> str:
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def _fill(fd: int, views: Sequence[memoryview], pos: int) -> bool:
    """Read from `pos` into `views`, in order, until all are full; False if the file ends first."""
    pending = [v for v in views if len(v)]
    while pending:
        n = os.preadv(fd, pending, pos)
        if n == 0:
            return False
        pos += n
        while pending and n >= len(pending[0]):
            n -= len(pending.pop(0))
        if n:
            pending[0] = pending[0][n:]
    return True


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
        self.body_retries = 0

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
            pos = start
            for k, view in enumerate(views):  # view by view: each is handed on before the next is read
                if not _fill(fd, [view], pos):
                    raise VersionChanged(f"{obj.key} changed in the store while it was read")
                if _etag(os.fstat(fd)) != obj.etag:
                    raise VersionChanged(f"{obj.key} changed in the store while it was read")
                pos += len(view)
                if filled is not None:
                    filled(k)
        except OSError as e:
            raise StoreError(f"cannot read {obj.key}: {e.strerror}") from None
        finally:
            os.close(fd)

    def close(self) -> None:
        pass

    # -- writes: a directory as the shared cache tier (`remote.WritableStore`) ----------------------------

    def get_into(self, key: str, views: Sequence[memoryview], deadline: float | None = None
                 ) -> dict[str, str] | None:
        """The whole file `key` into `views`, and its metadata (`put`); None if there is no such file."""
        length = sum(len(v) for v in views)
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"cannot open {key}: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size != length:
                raise StoreError(f"{key}: {size} bytes, expected {length}")
            if not _fill(fd, views, 0):
                raise StoreError(f"{key}: shorter than {length} bytes while it was read")
            return _metadata(fd)
        except OSError as e:
            raise StoreError(f"cannot read {key}: {e.strerror}") from None
        finally:
            os.close(fd)

    def put(self, key: str, body: bytes | BinaryIO, metadata: dict[str, str], if_absent: bool = False) -> bool:
        """Write a temporary file beside `key`, its metadata in an extended attribute, then rename it into
        place (or, with `if_absent`, hard-link it: an atomic create that fails if `key` exists, also on
        NFS), so a reader sees the whole file or none."""
        path = self._path(key)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                if isinstance(body, bytes):
                    f.write(body)
                else:
                    shutil.copyfileobj(body, f, 1 << 20)
                if metadata:
                    os.setxattr(f.fileno(), _META_XATTR, json.dumps(metadata).encode())
            if not if_absent:
                os.replace(tmp, path)
                return True
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            return True
        except OSError as e:
            raise StoreError(f"cannot write {key} under {self.root}: {e.strerror}") from None
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def age(self, key: str) -> float | None:
        """Seconds since `key` was written, by this host's clock against the file's mtime (on a shared
        file system, keep the hosts' clocks in sync)."""
        try:
            return max(0.0, time.time() - os.stat(self._path(key)).st_mtime)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"cannot stat {key}: {e.strerror}") from None

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"cannot delete {key}: {e.strerror}") from None


#: Where `put` keeps an object's metadata (user namespace: any owner may set it; tmpfs, ext4, xfs, NFS 4.2).
_META_XATTR = "user.modelfs.meta"


def _metadata(fd: int) -> dict[str, str]:
    try:
        raw = os.getxattr(fd, _META_XATTR)
    except OSError:
        return {}  # none was written (or the file system keeps none)
    meta = json.loads(raw)
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
