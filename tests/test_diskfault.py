"""The disk-fault helpers on a real loop-mounted ext4: the filesystem comes and goes without leftovers,
the physical offset matches filefrag, and a byte changed under the filesystem is what a plain read (and
another process's mapping) sees afterwards, with ctime and mtime unchanged."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import eventually
from tests.support.diskfault import (
    LoopFs,
    available,
    corrupt_under_fs,
    loop_ext4,
    physical_offset,
    resident_pages,
    truncate_in_place,
    write_in_place,
)

pytestmark = [pytest.mark.mount,  # loop filesystems
              pytest.mark.skipif(available() is not None, reason=f"loop filesystems: {available()}")]

MiB = 1 << 20


def mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path("/proc/self/mounts").read_text().splitlines())


def attached(image: Path) -> bool:
    out = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout
    return bool(out.strip())


def device_of(image: Path) -> list[str]:
    """Loop devices whose backing file is `image` (also after it was unlinked: "(deleted)")."""
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if str(image) in line]


def test_loop_ext4_mounts_a_sparse_image_and_leaves_nothing_behind(tmp_path: Path) -> None:
    with loop_ext4(tmp_path, 96 * MiB) as fs:
        assert mounted(fs.mountpoint) and attached(fs.image)
        assert fs.device.startswith("/dev/loop") and fs.block_size == 4096
        st = fs.image.stat()
        assert st.st_size == 96 * MiB and st.st_blocks * 512 < st.st_size  # sparse
        (fs.mountpoint / "x").write_bytes(b"hello")
        seen = fs
    assert not mounted(seen.mountpoint) and not seen.image.exists() and not seen.mountpoint.exists()
    assert not device_of(seen.image)
    assert list(tmp_path.iterdir()) == []


def test_loop_ext4_mount_options_apply(tmp_path: Path) -> None:
    """strictatime (what the soak uses to find recently read blocks): every read moves atime."""
    with loop_ext4(tmp_path, 32 * MiB, options="strictatime") as fs:
        opts = next(line.split()[3] for line in Path("/proc/self/mounts").read_text().splitlines()
                    if line.split()[1] == str(fs.mountpoint))
        assert "relatime" not in opts.split(",") and "noatime" not in opts.split(","), opts
        p = fs.mountpoint / "f"
        p.write_bytes(b"x" * 8192)
        # An atime ahead of ctime and mtime, and not a day old: relatime would leave it; strictatime moves it.
        ahead = time.time_ns() + 100 * 10**9
        os.utime(p, ns=(ahead, os.stat(p).st_mtime_ns))
        p.read_bytes()
        assert os.stat(p).st_atime_ns < ahead


def test_loop_ext4_cleans_up_when_the_body_raises(tmp_path: Path) -> None:
    made: list[LoopFs] = []
    with pytest.raises(RuntimeError, match="boom"), loop_ext4(tmp_path, 32 * MiB) as fs:
        made.append(fs)
        raise RuntimeError("boom")
    assert not mounted(made[0].mountpoint) and not made[0].image.exists() and not device_of(made[0].image)


def test_loop_ext4_detaches_once_a_file_held_open_at_exit_is_closed(tmp_path: Path) -> None:
    """Lazy unmount and a deferred detach: a daemon still holding a cache file does not block the exit."""
    with loop_ext4(tmp_path, 32 * MiB, mountpoint=tmp_path / "mnt") as fs:
        f = open(fs.mountpoint / "held", "wb")  # noqa: SIM115
    try:
        assert not mounted(fs.mountpoint)
        f.write(b"still writable")
    finally:
        f.close()
    assert eventually(lambda: not device_of(fs.image), limit=30)


def test_physical_offset_agrees_with_filefrag(tmp_path: Path) -> None:
    if shutil.which("filefrag") is None:
        pytest.skip("needs filefrag (e2fsprogs)")
    with loop_ext4(tmp_path, 64 * MiB) as fs:
        p = fs.mountpoint / "f"
        with open(p, "wb") as f:  # two writes far apart: likely more than one extent
            f.write(os.urandom(3 * MiB))
            f.flush()
            os.fsync(f.fileno())
        with open(p, "ab") as f:
            f.write(os.urandom(5 * MiB + 123))
        bs = fs.block_size
        physical_offset(p, 0)  # syncs the file: every extent placed before filefrag looks
        out = subprocess.run(["filefrag", "-v", f"-b{bs}", str(p)], capture_output=True, text=True,
                             check=True).stdout
        extents = [tuple(int(x) for x in m.groups()) for m in
                   re.finditer(r"^\s*\d+:\s+(\d+)\.\.\s*(\d+):\s+(\d+)\.\.\s*(\d+):", out, re.M)]
        assert extents, out
        size = p.stat().st_size
        for off in (0, 1, bs - 1, bs, 3 * MiB - 1, 3 * MiB, 3 * MiB + 4097, size - 1):
            lblk = off // bs
            lo, _hi, plo, _phi = next(e for e in extents if e[0] <= lblk <= e[1])
            assert physical_offset(p, off) == (plo + lblk - lo) * bs + off % bs, (off, out)
        with pytest.raises(ValueError):
            physical_offset(p, size + 10 * bs)


def test_corrupt_under_fs_changes_one_byte_without_touching_timestamps(tmp_path: Path) -> None:
    """The flip reaches a plain read and another process's mapping (pages it held resident are paged out),
    and nothing else changes: the other bytes, ctime, mtime."""
    with loop_ext4(tmp_path, 64 * MiB) as fs:
        p = fs.mountpoint / "block"
        data = os.urandom(8 * MiB)
        p.write_bytes(data)
        # Another process maps the file and touches every page, as a loader maps a file that the kernel serves
        # from its cache file (passthrough).
        holder = subprocess.Popen([sys.executable, "-c", (
            "import mmap, sys\n"
            f"f = open({str(p)!r}, 'rb'); mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
            "s = sum(mm[i] for i in range(0, len(mm), 4096)); print('mapped', flush=True)\n"
            "off = int(sys.stdin.readline()); print(mm[off], flush=True)\n")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdin is not None
            assert holder.stdout.readline().strip() == "mapped"
            assert all(resident_pages(p))
            st = os.stat(p)
            off = 5 * MiB + 777
            old, new = corrupt_under_fs(fs, p, off)
            assert old == data[off] and new == data[off] ^ 0xFF
            fd = os.open(p, os.O_RDONLY)
            try:
                assert os.pread(fd, 1, off)[0] == new
                whole = os.pread(fd, len(data), 0)
            finally:
                os.close(fd)
            assert whole[:off] == data[:off] and whole[off + 1:] == data[off + 1:]
            after = os.stat(p)
            assert (after.st_ctime_ns, after.st_mtime_ns, after.st_size) == (st.st_ctime_ns, st.st_mtime_ns,
                                                                             st.st_size)
            holder.stdin.write(f"{off}\n")
            holder.stdin.flush()
            assert int(holder.stdout.readline()) == new  # its mapping faulted the page back in from disk
            assert holder.wait(timeout=60) == 0
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait()
        # And on the image itself: the byte reached the backing file through the loop device.
        with open(fs.image, "rb") as img:
            img.seek(physical_offset(p, off))
            assert img.read(1)[0] == new


def test_corrupt_under_fs_refuses_a_file_on_another_filesystem(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    other.write_bytes(b"x" * 8192)
    with loop_ext4(tmp_path, 32 * MiB) as fs, pytest.raises(ValueError):
        corrupt_under_fs(fs, other, 10)


def test_in_place_writes_and_truncations_move_ctime(tmp_path: Path) -> None:
    with loop_ext4(tmp_path, 32 * MiB) as fs:
        p = fs.mountpoint / "f"
        p.write_bytes(bytes(range(256)) * 64)
        before = os.stat(p)
        assert write_in_place(p, 100, b"\xee\xee") == bytes([100, 101])
        mid = os.stat(p)
        assert mid.st_ctime_ns != before.st_ctime_ns and mid.st_ino == before.st_ino and mid.st_size == 16384
        assert p.read_bytes()[99:103] == bytes([99, 0xEE, 0xEE, 102])
        truncate_in_place(p, 5000)
        end = os.stat(p)
        assert end.st_size == 5000 and end.st_ctime_ns != mid.st_ctime_ns and end.st_ino == before.st_ino

