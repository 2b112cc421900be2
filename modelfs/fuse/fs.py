"""The FUSE boundary: pyfuse3 Operations over `core.ModelFS`.

Thin on purpose: each handler converts arguments, calls the core, and turns the result into
pyfuse3 types. Every exception becomes an errno here, in `_errors`, and nowhere else; an unexpected
one is logged and answered with EIO, because pyfuse3 would otherwise stop the whole filesystem.

Every request is answered: pyfuse3 replies only when a handler returns or raises FUSEError, so a
handler that is cancelled (the daemon is stopping) answers EIO rather than leave its request pending. A
READ left pending would keep its page locked in the kernel, and a page-cache push waiting on that page
would sleep there, uninterruptibly, for good.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from modelfs.core import ModelFS
from modelfs.errors import ModelfsError
from modelfs.fetch.fetcher import Buffer
from modelfs.fuse import xattrs
from modelfs.tree.namespace import Node

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

#: Files never change under an inode (a new version is a new inode), so the kernel may cache their
#: attributes for long; names are re-looked up after the metadata TTL to notice new versions.
FILE_ATTR_TIMEOUT = 24 * 3600.0


def to_errno(e: BaseException) -> int:
    """The errno a loader sees for an exception raised by the core or the OS."""
    if isinstance(e, pyfuse3.FUSEError):
        return e.errno
    if isinstance(e, ModelfsError):
        return e.errno
    if isinstance(e, OSError) and e.errno:
        return e.errno
    return errno.EIO


class _Every:
    """True at most once per `seconds` (a warning that offline mode would repeat on every READ)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._last = -seconds

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.seconds:
            return False
        self._last = now
        return True


_eio_said = _Every(5.0)


def _errors(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """The one place where errors become errno."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except trio.Cancelled:
            # Answer, even now: the task ends right after (pyfuse3's loop stops at its next checkpoint).
            raise pyfuse3.FUSEError(errno.EIO) from None
        except (ModelfsError, OSError) as e:
            code = to_errno(e)
            if code == errno.EIO and _eio_said.ready():
                log.warning("%s answered EIO: %s", fn.__name__, e)  # what a loader saw fail, and why
            elif code not in (errno.ENOENT, errno.EROFS, errno.ENODATA):
                log.debug("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


async def _erofs(*_args: Any, **_kwargs: Any) -> Any:
    raise pyfuse3.FUSEError(errno.EROFS)


class Operations(pyfuse3.Operations):
    """pyfuse3 handlers: read-only; every mutation answers EROFS."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, core: ModelFS) -> None:
        super().__init__()
        self.core = core
        self.enable_passthrough = core.passthrough is not None  # asked of the kernel at INIT (pyfuse3)
        m = core.cfg.mount
        self.uid = m.uid if m.uid >= 0 else os.getuid()
        self.gid = m.gid if m.gid >= 0 else os.getgid()
        self.file_mode = stat.S_IFREG | int(m.file_mode)
        self.dir_mode = stat.S_IFDIR | int(m.dir_mode)
        self.ttl = m.metadata_ttl
        self.mounted_ns = time.time_ns()  # directories have no mtime in S3: show when they were mounted

    def attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_blksize = 1 << 20
        a.entry_timeout = self.ttl
        if node.info is None:
            a.st_mode = self.dir_mode
            a.st_nlink = 2
            a.st_size = 0
            a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = self.mounted_ns
            a.attr_timeout = self.ttl
        else:
            a.st_mode = self.file_mode
            a.st_nlink = 1
            a.st_size = node.info.size
            a.st_blocks = (node.info.size + 511) // 512
            ns = int(node.info.mtime * 1e9)
            a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = ns
            a.attr_timeout = FILE_ATTR_TIMEOUT
        return a

    @_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        if text == "..":
            node = self.core.node(self.core.node(parent_inode).parent)
        elif text == ".":
            node = self.core.node(parent_inode)
        else:
            node = await self.core.lookup(parent_inode, text)
        attrs = self.attrs(node)
        self.core.remember(node)  # the reply gives the kernel a reference; FORGET gives it back
        return attrs

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, nlookup in inode_list:
            try:
                self.core.forget(inode, nlookup)
            except Exception:  # FORGET has no reply: nothing to answer, never let it stop the loop
                log.exception("unexpected error in forget of inode %d", inode)

    @_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attrs(self.core.node(inode))

    @_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return await self.core.opendir(inode)

    @_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for i, node in enumerate(self.core.readdir(fh, start_id), start=start_id + 1):
            if not pyfuse3.readdir_reply(token, node.name.encode("utf-8"), self.attrs(node), i):
                break
            self.core.remember(node)  # a readdirplus entry is a reference too

    @_errors
    async def releasedir(self, fh: int) -> None:
        self.core.releasedir(fh)

    def init(self) -> None:
        """INIT is answered (pyfuse3 calls this from it): say whether the kernel took FUSE passthrough."""
        if self.core.passthrough is None:
            return
        if self.core.passthrough.available:
            log.info("FUSE passthrough on: files complete in the cache are served by the kernel from their cache file")
        else:
            self.core.stats.add(passthrough_refused=1)
            log.warning("FUSE passthrough not offered by the kernel (Linux 6.9+ with CONFIG_FUSE_PASSTHROUGH): "
                        "every file is served through the daemon")

    @_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fh = self.core.open(inode, flags)
        try:
            backing_id = await self.core.backing_id(fh)
        except BaseException:
            self.core.release(fh)
            raise
        if backing_id:  # the kernel reads the cache file itself; KEEP_CACHE with passthrough fails the open
            return pyfuse3.FileInfo(fh=fh, keep_cache=False, backing_id=backing_id)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_errors
    async def read(self, fh: int, off: int, size: int) -> Buffer:  # type: ignore[override]  # pyfuse3's stub says bytes; it replies with any buffer
        return await self.core.read(fh, off, size)

    @_errors
    async def release(self, fh: int) -> None:
        self.core.release(fh)

    @_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self.core.node(inode)
        return not mode & os.W_OK

    @_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    @_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == pyfuse3.ROOT_INODE and name == xattrs.STATS:
            return json.dumps(self.core.counters()).encode()
        if inode == pyfuse3.ROOT_INODE and name == xattrs.PID:
            return str(os.getpid()).encode()
        if inode == pyfuse3.ROOT_INODE and name == xattrs.HEALTH:
            return json.dumps(await self.core.health_report()).encode()
        node = self.core.node(inode)
        if not node.is_dir and name == xattrs.PREFETCH:
            return json.dumps(await self.core.warm(inode)).encode()
        if not node.is_dir and name == xattrs.CACHED:
            return str(await self.core.cached_bytes(inode)).encode()
        if not node.is_dir and name == xattrs.EXTENTS:
            return json.dumps(await self.core.extent_map(inode)).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if inode == pyfuse3.ROOT_INODE:
            return list(xattrs.ROOT)
        return [] if self.core.node(inode).is_dir else list(xattrs.FILE)

    # Every mutation: EROFS (the mount is also `ro`, so the kernel usually answers first).
    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _erofs
    write = create = setxattr = removexattr = _erofs
