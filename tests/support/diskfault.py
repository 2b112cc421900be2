"""Disk faults for tests and the soak: a throwaway ext4 (or btrfs) on a loop device, and bytes changed under it.

A flip made through the filesystem (open, pwrite) moves the file's ctime and mtime, so a cache that
remembers (inode, ctime) of what it verified can notice it. A bad disk, a bad controller or a stray
write to the device changes bytes without telling the filesystem: no timestamp moves, and the page
cache keeps the old bytes until its pages are reclaimed, after which the new bytes come back from disk.
`corrupt_under_fs` makes exactly that happen, on demand: it writes the loop device at the physical
block that holds the file's byte, then evicts the file's pages (also pages other processes hold
mapped, as memory pressure would), and checks that a plain read now sees the new byte.

`truncate_in_place` and `write_in_place` are the faults that do go through the filesystem (ctime moves).

Needs root, losetup, mkfs.ext4 (e2fsprogs) and a kernel with loop devices; Linux x86-64 or arm64.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import shutil
import struct
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LoopFs", "available", "corrupt_under_fs", "evict_file_pages", "loop_btrfs", "loop_ext4", "physical_offset",
           "resident_pages", "truncate_in_place", "write_in_place"]

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
#: Extent flags under which the physical address is not where the bytes are (or not known yet).
FIEMAP_EXTENT_UNUSABLE = (0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800)  # unknown, delalloc,
# encoded, encrypted, not aligned, inline, tail, unwritten
_FIEMAP_HEAD = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, rsvd
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, rsvd64 x2, flags, rsvd32 x3

SYS_PROCESS_MADVISE = 440  # the same number on x86-64 and arm64 (the unified table of newer syscalls)
MADV_PAGEOUT = 21

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def available() -> str | None:
    """Why loop filesystems cannot be made here (for a skip reason), or None when they can."""
    if os.geteuid() != 0:
        return "needs root"
    missing = [t for t in ("losetup", "mkfs.ext4", "mount", "umount") if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)}"
    if not (os.path.exists("/dev/loop-control") or os.path.exists("/dev/loop0")):
        return "no loop devices"
    return None


@dataclass(frozen=True)
class LoopFs:
    """A mounted ext4 on a loop device: where it is mounted, its image file, its /dev/loopN."""

    mountpoint: Path
    image: Path
    device: str
    fstype: str = "ext4"

    @property
    def block_size(self) -> int:
        return os.statvfs(self.mountpoint).f_frsize


def _run(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()[-500:]}")
    return r.stdout


@contextlib.contextmanager
def loop_ext4(dir: Path | str, size_bytes: int, mountpoint: Path | str | None = None,
              options: str = "") -> Iterator[LoopFs]:
    """A fresh ext4 of `size_bytes` (a sparse image in `dir`) mounted at `mountpoint` (default: a new
    directory in `dir`) with mount `options` (e.g. "strictatime": every read moves atime, so "recently
    read" can be told from outside). On exit, even after an error in the body or half-way through set-up: lazy
    unmount, detach the loop device (deferred by the kernel while a process still holds a file open on
    it), remove the image and the directory this made."""
    # Page-size blocks, as on a real cache disk (mkfs picks 1 KiB for small images); no reserved blocks (a
    # cache quota measures against all of it); no journal zeroing to wait for.
    with _loop_fs(dir, size_bytes, mountpoint, options, "ext4",
                  ["mkfs.ext4", "-q", "-F", "-b", "4096", "-m", "0", "-E",
                   "lazy_itable_init=1,lazy_journal_init=1"]) as fs:
        yield fs


@contextlib.contextmanager
def loop_btrfs(dir: Path | str, size_bytes: int, mountpoint: Path | str | None = None,
               options: str = "") -> Iterator[LoopFs]:
    """A fresh btrfs (data checksums and extent sharing on, its defaults), as `loop_ext4` makes an ext4: for
    the cache on a filesystem that clones extents. Needs mkfs.btrfs (btrfs-progs) and 128 MiB at least."""
    with _loop_fs(dir, size_bytes, mountpoint, options, "btrfs", ["mkfs.btrfs", "-q", "-f"]) as fs:
        yield fs


@contextlib.contextmanager
def _loop_fs(dir: Path | str, size_bytes: int, mountpoint: Path | str | None, options: str, fstype: str,
             mkfs: list[str]) -> Iterator[LoopFs]:
    base = Path(dir)
    tag = uuid.uuid4().hex[:8]
    image = base / f"{fstype}-{tag}.img"
    mnt = Path(mountpoint) if mountpoint is not None else base / f"{fstype}-{tag}"
    with contextlib.ExitStack() as undo:
        made_mnt = not mnt.exists()
        mnt.mkdir(parents=True, exist_ok=True)
        if made_mnt:
            undo.callback(lambda: mnt.rmdir() if mnt.is_dir() and not os.path.ismount(mnt) else None)
        with open(image, "xb") as f:
            f.truncate(size_bytes)
        undo.callback(lambda: image.unlink(missing_ok=True))
        _run(*mkfs, str(image))
        device = _run("losetup", "--find", "--show", str(image)).strip()
        undo.callback(lambda: subprocess.run(["losetup", "-d", device], capture_output=True, check=False))
        _run("mount", "-t", fstype, *(["-o", options] if options else []), device, str(mnt))
        undo.callback(lambda: subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False))
        yield LoopFs(mnt, image, device, fstype)


def physical_offset(path: Path | str, offset: int) -> int:
    """The byte offset on the device that holds byte `offset` of `path` (FIEMAP, after syncing the file so
    no extent is still delayed-allocated). Raises if that byte has no plain on-disk location."""
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    try:
        return _physical_offset(fd, offset, str(path))
    finally:
        os.close(fd)


def _physical_offset(fd: int, offset: int, path: str) -> int:
    os.fsync(fd)  # dirty pages written, or their writeback would undo a change made under them
    buf = bytearray(_FIEMAP_HEAD.size + _FIEMAP_EXTENT.size)
    _FIEMAP_HEAD.pack_into(buf, 0, offset, 1, FIEMAP_FLAG_SYNC, 0, 1, 0)
    fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
    mapped = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
    if mapped < 1:
        raise ValueError(f"{path}: no extent at offset {offset} (a hole, or past the end)")
    logical, physical, length, _r1, _r2, flags, *_ = _FIEMAP_EXTENT.unpack_from(buf, _FIEMAP_HEAD.size)
    if not logical <= offset < logical + length:
        raise ValueError(f"{path}: extent {logical}+{length} does not cover offset {offset}")
    if flags & FIEMAP_EXTENT_UNUSABLE:
        raise ValueError(f"{path}: extent at offset {offset} has no plain on-disk location (flags {flags:#x})")
    return int(physical - logical) + offset


def resident_pages(path: Path | str) -> list[bool]:
    """Per page of `path`: whether it is in the page cache now (mincore on a mapping that touches nothing)."""
    size = os.stat(path).st_size
    if size == 0:
        return []
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    try:
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(_mapping_address(mm), size, vec) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return [bool(b & 1) for b in vec]
    finally:
        mm.close()


def _mapping_address(mm: mmap.mmap) -> int:
    """Start address of a read-only mapping (ctypes' from_buffer wants a writable one)."""

    class PyBuffer(ctypes.Structure):
        _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                    ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                    ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                    ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]

    get, release = ctypes.pythonapi.PyObject_GetBuffer, ctypes.pythonapi.PyBuffer_Release
    get.argtypes = [ctypes.py_object, ctypes.POINTER(PyBuffer), ctypes.c_int]
    release.argtypes = [ctypes.POINTER(PyBuffer)]
    b = PyBuffer()
    if get(mm, ctypes.byref(b), 0) != 0:
        raise OSError("cannot take the mapping's buffer")
    try:
        return int(b.buf)
    finally:
        release(ctypes.byref(b))


def _mappers(st: os.stat_result) -> dict[int, list[tuple[int, int]]]:
    """pid -> address ranges of every process mapping the file `st` is of (matched by device and inode)."""
    found: dict[int, list[tuple[int, int]]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 6 or parts[4] == "0" or int(parts[4]) != st.st_ino:
                    continue
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                if os.makedev(major, minor) != st.st_dev:
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                found.setdefault(int(pid), []).append((lo, hi))
    return found


def _page_out(pid: int, ranges: list[tuple[int, int]]) -> None:
    """MADV_PAGEOUT of `ranges` in process `pid` (process_madvise; root): its clean file pages there are
    unmapped and reclaimed, as memory pressure would. Best effort: a process that exited is skipped."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        iov = (_IoVec * len(ranges))(*[_IoVec(lo, hi - lo) for lo, hi in ranges])
        _libc.syscall(SYS_PROCESS_MADVISE, pidfd, iov, len(ranges), MADV_PAGEOUT, 0)
    finally:
        os.close(pidfd)


def evict_file_pages(path: Path | str, system_wide: bool = True) -> None:
    """Drop `path`'s pages from the page cache, also those other processes hold mapped (which
    POSIX_FADV_DONTNEED and drop_caches leave alone): page them out of every mapper, then DONTNEED.
    `system_wide` also writes 1 to drop_caches, for pages the first two could not get."""
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    try:
        _evict(fd, system_wide)
    finally:
        os.close(fd)


def _evict(fd: int, system_wide: bool) -> None:
    for pid, ranges in _mappers(os.fstat(fd)).items():
        _page_out(pid, ranges)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    if system_wide:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")


def _device_rw(device: str, at: int, size: int, data: bytes | None = None) -> bytes:
    """Read (or overwrite) `size` aligned bytes of a block device with O_DIRECT: past the device's own
    buffer cache, which the filesystem's data writes never went through and may hold stale copies."""
    buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT wants
    fd = os.open(device, (os.O_RDWR if data is not None else os.O_RDONLY) | os.O_DIRECT)
    try:
        if data is not None:
            buf[:] = data
            if os.pwritev(fd, [buf], at) != size:
                raise OSError(f"short write to {device} at {at}")
            os.fsync(fd)  # through the loop driver to the image file
        elif os.preadv(fd, [buf], at) != size:
            raise OSError(f"short read of {device} at {at}")
        return bytes(buf)
    finally:
        os.close(fd)
        buf.close()


def _btrfs_device_offset(device: str, logical: int) -> int:
    """Where btrfs's logical address `logical` (what FIEMAP reports on btrfs) is on its one device (first copy)."""
    out = _run("btrfs-map-logical", "-l", str(logical), "-b", "4096", device)
    for line in out.splitlines():
        words = line.split()
        if "physical" in words and "mirror" in words and words[words.index("mirror") + 1] == "1":
            return int(words[words.index("physical") + 1])
    raise RuntimeError(f"btrfs-map-logical gave no first copy of logical {logical}: {out.strip()[-300:]}")


def corrupt_under_fs(fs: LoopFs, path: Path | str, offset: int, xor: int = 0xFF) -> tuple[int, int]:
    """Flip one byte of `path` (a file on `fs`) at `offset` on the device, past the filesystem: no
    timestamp moves. Then evict the file's pages (mapped ones too) and check that a plain read returns
    the new byte (on btrfs or an fs-verity file: fails with EIO). Returns (old byte, new byte). Raises if the
    file's block could not be found or the old bytes stayed in the page cache."""
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)  # held throughout: the blocks cannot be freed and reused
    try:
        st = os.fstat(fd)
        if st.st_dev != os.stat(fs.mountpoint).st_dev:
            raise ValueError(f"{path} is not on {fs.mountpoint}")
        if not 0 <= offset < st.st_size:
            raise ValueError(f"offset {offset} outside {path} ({st.st_size} bytes)")
        bs = fs.block_size
        phys = _physical_offset(fd, offset, str(path))
        if fs.fstype == "btrfs":
            phys = _btrfs_device_offset(fs.device, phys - phys % bs) + phys % bs
        block_at, within = phys - phys % bs, phys % bs
        on_disk = _device_rw(fs.device, block_at, bs)
        file_block = os.pread(fd, bs, offset - within)
        if on_disk[: len(file_block)] != file_block:  # a wrong map, or disk and page cache disagree already
            raise RuntimeError(f"{path}: device block at {block_at} does not hold the file's bytes at "
                               f"{offset - within}")
        old = on_disk[within]
        new = old ^ xor
        _device_rw(fs.device, block_at, bs, on_disk[:within] + bytes([new]) + on_disk[within + 1:])
        for system_wide in (False, True):
            _evict(fd, system_wide)
            try:
                if os.pread(fd, 1, offset)[0] == new:
                    break
            except OSError as e:
                if e.errno == errno.EIO:
                    break  # read from disk, where it fails its check (btrfs checksums, fs-verity)
                raise
        else:
            raise RuntimeError(f"{path}: the page cache still holds the old byte at {offset} after eviction")
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if (after.st_ctime_ns, after.st_mtime_ns) != (st.st_ctime_ns, st.st_mtime_ns):
        raise RuntimeError(f"{path}: ctime or mtime moved (something wrote it through the filesystem meanwhile)")
    return old, new


def truncate_in_place(path: Path | str, new_size: int) -> None:
    """A real truncation through the filesystem (ctime and mtime move), as a crash or a stray tool leaves."""
    os.truncate(path, new_size)


def write_in_place(path: Path | str, offset: int, data: bytes) -> bytes:
    """Overwrite bytes of a file in place through the filesystem (no truncation; ctime and mtime move).
    Returns the bytes it replaced."""
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, len(data), offset)
        if os.pwrite(fd, data, offset) != len(data):
            raise OSError(f"short write to {path} at {offset}")
        return old
    finally:
        os.close(fd)
