"""What the cache's storage verifies, and the seal that lets a later daemon trust a cache file without reading
it back.

A cache file is handed to the kernel for FUSE passthrough, after which the kernel reads it with nothing of
modelfs in between. Whether a block that rots on the disk under it reaches a loader depends on the storage:

- btrfs with data checksums (its default): every data block read from disk is checked against its checksum,
  and a block that fails gives EIO (SIGBUS to an mmap), never the wrong bytes, through passthrough too. Not
  where checksums are off: the `nodatasum`/`nodatacow` mount options, or a directory marked No_COW (`chattr
  +C`), whose new files inherit the mark. (btrfs can do fs-verity too; its checksums are used: no second pass
  over the file to enable, and damage is healed by writing the right bytes in place.)
- fs-verity (ext4 made with `-O verity`, f2fs; the kernel's CONFIG_FS_VERITY): a file with verity on is
  read-only, even to root, and every block read from disk is checked against its Merkle tree (EIO, SIGBUS).
  Found by turning it on for a scratch file at start (EOPNOTSUPP where the kernel or filesystem lacks it).
- anything else (ext4 without fs-verity, XFS, tmpfs): nothing checks the bytes the disk returns. A daemon
  reads back and hashes every cache file it did not write before the kernel gets it (`cache.FileCache.verify`);
  rot after that check is served until the next daemon's, or the scrub's. With `cache.trust_restarts`, a
  daemon trusts the files an earlier daemon of the same boot checked (invariant 5), so a restart costs no
  read-back: rot after the check is then served until the scrub finds it.

On verifying storage a complete, checked file is sealed (`FileCache.seal`): its data is made durable
(fdatasync), on fs-verity storage verity is turned on (no writable fd of it may be open: the cache closes its
own first and opens the file read-only from then on; the kernel reads and hashes the file once, SHA-256, in
the background), then its identity recorded with its version in the index. A later daemon trusts a sealed
file whose identity still matches without reading it back: the storage checks each block the kernel reads.
With `cache.trust_restarts`, files on other storage are sealed too, for later daemons of the same boot.

Seal invariants, and what a crash at each step leaves:
1. The seal is recorded only AFTER the file is complete, every extent of it checked by this daemon, and its
   data durable. Crash before the record: no seal, the next daemon reads the file back as before. A seal
   never vouches for data an OS crash could lose (unwritten pages of a file read back as holes, which no
   checksum covers).
2. The identity is (inode, size, mtime, ctime) at sealing; on fs-verity (inode, size, verity digest): the
   file cannot change, and FS_IOC_MEASURE_VERITY (O(1)) says what it holds. Any change through the
   filesystem (a write, a truncate, a punch, the file deleted and made again) moves mtime/ctime or the
   inode, so the seal no longer matches and the file is read back and hashed again. Changes under the
   filesystem are the storage's to catch (EIO). A seal left in the index after its file is gone names
   nothing: it is never matched.
3. On btrfs the file itself must still have checksums (no No_COW flag), checked at sealing and at trust.
4. A crash while verity is being turned on leaves the file without it, or with it and no seal recorded:
   either way the next daemon reads it back and hashes it (and an fs-verity file it cannot write is only
   ever read, or deleted whole).
5. On storage that verifies nothing (`cache.trust_restarts`), the seal also names the boot (the kernel's
   boot_id), and its data is not made durable: what a daemon of this boot wrote and checked is what the page
   cache and the disk hold for every later daemon of the same boot, unless something wrote the file (mtime,
   ctime move) or the disk changed under it, which a running daemon would not notice either (the scrub does).
   An OS crash, which could lose unwritten pages, starts a new boot: every seal of the old one names
   nothing, and the next daemon reads each file back.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import struct
import time
from dataclasses import dataclass

from modelfs.libc import LIBC

log = logging.getLogger(__name__)

BTRFS_SUPER_MAGIC = 0x9123683E
FS_IOC_GETFLAGS = 0x80086601
FS_NOCOW_FL = 0x00800000



class _StatFs(ctypes.Structure):
    # struct statfs of 64-bit Linux (x86-64, arm64): f_type first, all fields word-sized
    _fields_ = [("f_type", ctypes.c_long), ("f_bsize", ctypes.c_long), ("f_rest", ctypes.c_long * 14)]


LIBC.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_StatFs)]
LIBC.statfs.restype = ctypes.c_int

FS_IOC_ENABLE_VERITY = 0x40806685  # _IOW('f', 133, struct fsverity_enable_arg)
FS_IOC_MEASURE_VERITY = 0xC0046686  # _IOWR('f', 134, struct fsverity_digest)
FS_VERITY_HASH_ALG_SHA256 = 1
_ENABLE_ARG = struct.Struct("=IIIIQIIQ88x")  # version, hash, block size, salt size, salt, sig size, rsvd, sig

#: What `Storage.kind` may be.
CHECKSUMS = "btrfs checksums"
VERITY = "fs-verity"
NONE = "unverified"


@dataclass(frozen=True)
class Storage:
    """What the cache filesystem verifies: `kind` (CHECKSUMS or NONE) and why, in words for the log and
    `modelfs status`."""

    kind: str
    why: str

    @property
    def verifies(self) -> bool:
        """Whether the kernel checks every block it reads from disk (rot gives EIO, never wrong bytes)."""
        return self.kind != NONE


def fs_type(path: str) -> int:
    """The filesystem magic of `path` (statfs f_type)."""
    buf = _StatFs()
    if LIBC.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(buf.f_type) & 0xFFFFFFFF


def _mount_options(path: str) -> set[str]:
    """Mount and superblock options of the mount that holds `path` (the longest mount point above it)."""
    real = os.path.realpath(path)
    best, options = "", set()
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 10 or "-" not in fields:
                continue
            point = fields[4].replace("\\040", " ")
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                sep = fields.index("-")
                best, options = point, set(fields[5].split(",")) | set(fields[sep + 3].split(","))
    return options


def no_cow(fd: int) -> bool:
    """Whether the file (or directory) is marked No_COW: btrfs keeps no checksums of its data."""
    buf = bytearray(struct.pack("l", 0))
    try:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            return False
        raise
    return bool(struct.unpack("l", buf)[0] & FS_NOCOW_FL)


def enable_verity(fd: int) -> None:
    """Turn fs-verity on for the file of read-only `fd` (it reads and hashes the whole file: SHA-256, 4 KiB
    blocks). ETXTBSY while any writable fd of the file is open anywhere: retried a few times."""
    arg = bytearray(_ENABLE_ARG.pack(1, FS_VERITY_HASH_ALG_SHA256, 4096, 0, 0, 0, 0, 0))
    for attempt in range(20):
        try:
            fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, arg)
            return
        except OSError as e:
            if e.errno == errno.EEXIST:
                return  # on already
            if e.errno != errno.ETXTBSY or attempt == 19:
                raise
            time.sleep(0.05)


def measure_verity(fd: int) -> bytes:
    """The file's fs-verity digest (the kernel keeps it: O(1)); OSError ENODATA if verity is off for it."""
    buf = bytearray(struct.pack("=HH", 0, 64) + bytes(64))
    fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf)
    _, size = struct.unpack_from("=HH", buf)
    return bytes(buf[4:4 + size])


def _verity_works(path: str) -> bool:
    """Whether files in directory `path` can be made fs-verity files (a 4 KiB scratch file, removed)."""
    name = os.path.join(path, f"verity.tmp.{os.getpid()}")
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, bytes(4096))
        finally:
            os.close(fd)
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            enable_verity(fd)
            return len(measure_verity(fd)) == 32
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def probe(path: str) -> Storage:
    """What the filesystem of directory `path` (the cache's files) verifies."""
    try:
        magic = fs_type(path)
    except OSError as e:
        return Storage(NONE, f"the cache filesystem cannot be told ({e.strerror})")
    if magic != BTRFS_SUPER_MAGIC:
        if _verity_works(path):
            return Storage(VERITY, "fs-verity: a sealed cache file is read-only, and the kernel checks every "
                                   "block it reads against the file's Merkle tree (rot gives EIO)")
        return Storage(NONE, f"filesystem {magic:#x} checks no data it reads (a cache file is read back and "
                             f"hashed by each daemon before passthrough)")
    off = _mount_options(path) & {"nodatasum", "nodatacow"}
    if off:
        return Storage(NONE, f"btrfs mounted {','.join(sorted(off))}: no data checksums")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if no_cow(fd):
            return Storage(NONE, "btrfs, but the cache directory is No_COW (chattr +C): no data checksums")
    finally:
        os.close(fd)
    return Storage(CHECKSUMS, "btrfs with data checksums: rot under a cache file gives EIO, never wrong bytes")


def boot_id() -> str:
    """This boot's id (the kernel makes a new one at each boot): what a seal on storage that checks nothing
    names (invariant 5); empty where the kernel does not say (then nothing is sealed on such storage)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def identity(st: os.stat_result) -> dict[str, int]:
    """What a seal records of a file, and compares with it (invariant 2)."""
    return {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
