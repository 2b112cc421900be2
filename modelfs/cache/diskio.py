"""File primitives of the cache: whole writes and reads, preallocation, hole punching, shared extents, and
what an extent costs on disk in whole pages."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

from modelfs.libc import LIBC

PAGE = 4096

LIBC.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
LIBC.fallocate.restype = ctypes.c_int
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
#: _IOW(0x94, 13, struct file_clone_range {s64 src_fd; u64 src_offset, src_length, dest_offset})
_FICLONERANGE = 0x4020940D


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2); False where the filesystem cannot (then the caller does without); OSError otherwise."""
    if LIBC.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def preallocate(fd: int, offset: int, length: int) -> bool:
    """Reserve an extent's disk space in one call before writing it: on ext4, writing 8 MiB into preallocated
    space cost a third to a tenth of the CPU of a write that allocates as it goes (measured here), and a full
    disk shows up as ENOSPC before any byte is copied. Never falls back to writing zeros."""
    return _fallocate(fd, 0, offset, length)


def punch(fd: int, offset: int, length: int) -> None:
    """Give an extent's disk space back (the file keeps its size; the range reads as zeros)."""
    if not _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
        # No hole punching (tmpfs before 3.5, some FUSE filesystems): overwrite with zeros instead, so a
        # stale byte is never mistaken for the extent's.
        os.pwrite(fd, bytes(length), offset)


def clone_range(src: int, src_off: int, dst: int, dst_off: int, length: int) -> None:
    """Share a range of one file with another on disk (FICLONERANGE: btrfs, XFS); OSError where it cannot."""
    arg = struct.pack("=qQQQ", src, src_off, length, dst_off)
    fcntl.ioctl(dst, _FICLONERANGE, arg)


def copy_range(src: int, src_off: int, dst: int, dst_off: int, length: int) -> None:
    """Copy a range between files inside the kernel (no bytes through Python)."""
    done = 0
    while done < length:
        n = os.copy_file_range(src, dst, length - done, src_off + done, dst_off + done)
        if n <= 0:
            raise OSError(errno.EIO, "short copy")
        done += n


def pages(start: int, length: int) -> int:
    """Bytes of the whole pages that bytes [start, start+length) touch: what an extent takes on disk at most."""
    return (-(-(start + length) // PAGE) - start // PAGE) * PAGE


#: Bytes per pwrite. The page cache sizes a new folio by the write that creates it, and on this VM large
#: folios of pages the guest has not used lately cost far more to fill (our reading: they fault in the
#: hypervisor on first touch). A bare single-threaded pwrite of 2 GiB into a new file here: 8 MiB pwrites
#: 0.6-2.2 ms of CPU per MiB, 1 MiB 0.65-0.9, 256 KiB 0.18-0.21, 64 KiB 0.23 (not yet shown in the daemon's
#: own CPU by an interleaved A/B).
WRITE_SLICE = 256 << 10


def write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view[:WRITE_SLICE], offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write")
        view, offset = view[n:], offset + n


def read_all(fd: int, view: memoryview, offset: int) -> int:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            break
        got += n
    return got

