"""The floor for serving bytes from Python: a minimal read-only pyfuse3 filesystem over one directory.

It shows the regular files of SOURCE_DIR (flat) under MOUNTPOINT and answers every READ in one way:
  mmap    a memoryview slice of one read-only mapping of the file (no copy in Python)
  pread   os.pread in the handler, on the trio thread
  thread  os.pread in a worker thread (trio.to_thread.run_sync)
Once serving it sets the mount's read_ahead_kb to 4096 (1 MiB READs), as modelfs does. The read-ceiling
table of `make bench` runs it beside modelfs, so "CPU per MiB served" has its floor in the same run.

    python floorfs.py SOURCE_DIR MOUNTPOINT {mmap|pread|thread}      (root; fusermount3 -u to stop)
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import sys

import pyfuse3
import trio


class FloorOps(pyfuse3.Operations):
    def __init__(self, source: str, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.limiter = trio.CapacityLimiter(8)
        names = sorted(n for n in os.listdir(source) if os.path.isfile(os.path.join(source, n)))
        self.by_name = {n.encode(): pyfuse3.ROOT_INODE + 1 + i for i, n in enumerate(names)}
        self.fds = {ino: os.open(os.path.join(source, n.decode()), os.O_RDONLY) for n, ino in self.by_name.items()}
        self.sizes = {ino: os.fstat(fd).st_size for ino, fd in self.fds.items()}
        self.views = {ino: memoryview(mmap.mmap(fd, self.sizes[ino], prot=mmap.PROT_READ)) if self.sizes[ino]
                      else memoryview(b"") for ino, fd in self.fds.items()}

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino, a.attr_timeout, a.entry_timeout = inode, 3600, 3600
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o555, 2
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o444, 1, self.sizes[inode]
        return a

    async def getattr(self, inode: int, ctx: object = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(self, parent: int, name: bytes, ctx: object = None) -> pyfuse3.EntryAttributes:
        if name in self.by_name:
            return self._attr(self.by_name[name])
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: int, ctx: object) -> int:
        return inode

    async def readdir(self, fh: int, start: int, token: pyfuse3.ReaddirToken) -> None:
        for i, (name, ino) in enumerate(list(self.by_name.items())[start:], start=start + 1):
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), i):
                break

    async def open(self, inode: int, flags: int, ctx: object) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        if self.mode == "mmap":
            return self.views[fh][off:min(off + size, self.sizes[fh])]
        if self.mode == "pread":
            return os.pread(self.fds[fh], size, off)
        return await trio.to_thread.run_sync(os.pread, self.fds[fh], size, off, limiter=self.limiter)


def raise_readahead(mountpoint: str) -> None:
    """Only once the loop serves: a stat of the mountpoint before that would wait on this very process."""
    st = os.stat(mountpoint)
    with open(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb", "w") as f:
        f.write("4096")


def main() -> None:
    source, mountpoint, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode not in ("mmap", "pread", "thread"):
        sys.exit(f"floorfs: mode must be mmap, pread or thread, got {mode!r}")

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            await trio.to_thread.run_sync(raise_readahead, mountpoint)

    pyfuse3.init(FloorOps(source, mode), mountpoint, {"fsname=floorfs", "ro", *pyfuse3.default_options})
    try:
        trio.run(serve)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()
