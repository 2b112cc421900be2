"""Serving READs from the version's cache file through real mounts, with passthrough off so that every READ
reaches the daemon: a READ whose bytes the page cache holds is answered on the trio thread (a read of the
cache file with RWF_NOWAIT), else the bytes are read in a worker thread. Warm reads and mmap slices across
extent edges with the page cache dropped between passes; extents the cache has no room for, served from
memory within its budget; an extent evicted under an open file; damage done to a cache file before a
restart (a flipped byte, a punched extent, a truncated file), found at first use and refetched; many
readers of one file at once. Every byte is checked against the source."""

from __future__ import annotations

import mmap
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from modelfs.cache.diskio import punch
from tests.conftest import Checkpoint, Mount, requires_fuse

pytestmark = [requires_fuse, pytest.mark.mount]

MiB = 1 << 20
PAGE = 4096
# These tests count what the READ path does: no prefetch, and no passthrough (a complete file would be served
# by the kernel from its cache file, with no READ reaching the daemon: test_passthrough.py).
NO_PREFETCH = ["-o", "prefetch.whole_file=false", "-o", "prefetch.checkpoint_sets=false",
               "-o", "prefetch.sequential=false", "-o", "mount.passthrough=off"]


def drop_page_cache() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def shards(checkpoint: Checkpoint) -> list[str]:
    return sorted(f for f in checkpoint.files() if f.endswith(".safetensors"))


def cache_files(cache_dir: Path) -> list[Path]:
    """The version files of a cache dir (scratch files of the daemon's own left out)."""
    root = cache_dir / "files"
    return sorted(p for p in root.iterdir() if ".tmp." not in p.name) if root.exists() else []


def only_cache_file(cache_dir: Path) -> Path:
    files = cache_files(cache_dir)
    assert len(files) == 1, files
    return files[0]


def rchar(pid: int) -> tuple[int, int]:
    """Bytes the daemon's read syscalls returned: (its trio thread, the main thread of the process; all its
    other threads together, those that ended included)."""

    def read(path: str) -> int:
        with open(path) as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
        raise AssertionError(f"no rchar in {path}")

    trio_thread = read(f"/proc/{pid}/task/{pid}/io")
    return trio_thread, read(f"/proc/{pid}/io") - trio_thread


class Direct:
    """O_DIRECT reads of a file on the mount: each one is one READ (or a few, split at max_read) that reaches
    the daemon, with no readahead and no page cache of the mount in between."""

    def __init__(self, path: Path, buffer: int = 2 * MiB) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        self.buf = mmap.mmap(-1, buffer)  # page-aligned, as O_DIRECT wants

    def pread(self, size: int, offset: int) -> bytes:
        n = os.preadv(self.fd, [memoryview(self.buf)[:size]], offset)
        return bytes(self.buf[:n])

    def close(self) -> None:
        os.close(self.fd)
        self.buf.close()


def test_warm_reads_and_mmap_slices_across_edges_from_the_cache_file(backend: tuple[str, dict[str, str]],
                                                                     checkpoint: Checkpoint,
                                                                     mounter: Callable[..., Mount]) -> None:
    """1 MiB extents. A cold read writes the shard's cache file: it then holds exactly the shard's bytes. A new
    daemon (which trusts nothing it did not check) serves reads that cross extent edges and mmap slices from
    that file: each extent is read back and hashed once, however often it is read, and never again after the
    page cache is dropped; with the page cache empty the bytes come from the disk in worker threads, and with
    the cache file in the page cache every READ is answered on the trio thread. Every byte matches, no GET."""
    source, env = backend
    m = mounter(source, env=env, args=["--extent-size", "1MiB", *NO_PREFETCH])
    rel = shards(checkpoint)[0]
    ref = (checkpoint.root / rel).read_bytes()
    extents = -(-len(ref) // MiB)
    assert (m.path / rel).read_bytes() == ref  # cold: fetched, written into the cache file
    st = m.stats()
    assert st["gets"] >= 1 and st["bytes_in_cache"] == len(ref) and st["files_complete"] == 1, st
    assert st["extents_in_memory"] == 0, st  # the cache had room: nothing is held in memory
    m.umount()
    cache_file = only_cache_file(m.cache_dir)
    assert cache_file.stat().st_size == len(ref) and cache_file.read_bytes() == ref  # the file is the shard

    m = m.remount()  # warm: a new daemon, nothing checked yet
    drop_page_cache()
    rng = random.Random(7)
    with open(m.path / rel, "rb", buffering=0) as f:
        for _ in range(300):
            edge = rng.randrange(1, len(ref) // MiB + 1) * MiB
            off = max(0, edge + rng.randrange(-70_000, 70_000))
            size = rng.choice([1, 4096, 65536, 300_000, 2 * MiB + 5])
            assert os.pread(f.fileno(), size, off) == ref[off:off + size], (off, size)
    assert (m.path / rel).read_bytes() == ref  # every extent read now
    st = m.stats()
    assert st["gets"] == 0 and st["corrupt_extents"] == 0, st
    assert st["extents_verified"] == extents, st  # each extent read back and hashed once, not once per READ
    assert st["extents_in_memory"] == 0 and st["cache_hits"] > 0, st

    drop_page_cache()  # nothing of the cache file in memory: READs read it in worker threads
    _, others = rchar(m.pid)
    with open(m.path / rel, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            for _ in range(300):
                edge = rng.randrange(1, len(ref) // MiB + 1) * MiB
                lo, hi = max(0, edge - rng.randrange(0, 9000)), min(len(ref), edge + rng.randrange(1, 9000))
                assert mm[lo:hi] == ref[lo:hi], (lo, hi)
        finally:
            mm.close()
    st = m.stats()
    assert st["gets"] == 0 and st["corrupt_extents"] == 0, st
    assert st["extents_verified"] == extents, st  # trusted: loaded from disk again, not hashed again
    assert rchar(m.pid)[1] > others, "no worker thread read the cache file after the page cache was dropped"

    assert cache_file.read_bytes() == ref  # now the whole cache file is in the page cache
    trio_thread, _ = rchar(m.pid)
    direct = Direct(m.path / rel)
    served = 0
    try:
        for _ in range(200):
            edge = rng.randrange(1, len(ref) // MiB) * MiB
            off = edge - rng.randrange(1, 40) * PAGE
            size = min(rng.randrange(1, 300) * PAGE, len(ref) - off)
            assert direct.pread(size, off) == ref[off:off + size], (off, size)
            served += size
    finally:
        direct.close()
    # The READs' bytes were read from the page cache by the trio thread itself (RWF_NOWAIT); had they gone to
    # worker threads, the trio thread would have read only the requests' headers off /dev/fuse. (At least
    # half: all of them unless something else drops the page cache meanwhile.)
    assert rchar(m.pid)[0] - trio_thread >= served // 2
    st = m.stats()
    assert st["gets"] == 0 and st["extents_verified"] == extents and st["extents_in_memory"] == 0, st


def test_extents_the_cache_has_no_room_for_are_served_from_memory_within_its_budget(
        checkpoint: Checkpoint, mounter: Callable[..., Mount]) -> None:
    """A cache whose free-space floor is never met stores nothing: each fetched extent is held in memory
    (cache.map_budget, here three 1 MiB extents), and the READs after the one that fetched it are served
    from there, page cache dropped or not: no second GET. An extent pushed out of the budget is fetched
    again. Every byte right."""
    rel = shards(checkpoint)[0]
    ref = (checkpoint.root / rel).read_bytes()
    m = mounter(str(checkpoint.root), args=[*NO_PREFETCH, "--extent-size", "1MiB", "-o", "cache.min_free=1000TiB",
                                            "-o", "cache.map_budget=3MiB"])
    direct = Direct(m.path / rel)
    try:
        assert direct.pread(64 * 1024, 0) == ref[:64 * 1024]  # extent 0: fetched, no room: kept in memory
        st = m.stats()
        assert st["gets"] == 1 and st["cache_full_skips"] == 1 and st["extents_in_memory"] == 1, st
        assert st["bytes_in_cache"] == 0 and st["files_in_cache"] == 0 and not cache_files(m.cache_dir), st
        drop_page_cache()
        assert direct.pread(64 * 1024, 512 * 1024) == ref[512 * 1024:576 * 1024]
        assert m.stats()["gets"] == 1  # from memory
        for k in range(1, 6):  # five more extents through a budget of three
            assert direct.pread(64 * 1024, k * MiB) == ref[k * MiB:k * MiB + 64 * 1024], k
        st = m.stats()
        assert st["gets"] == 6 and st["extents_in_memory"] == 3 and st["bytes_in_cache"] == 0, st
        assert direct.pread(PAGE, 5 * MiB + 8 * PAGE) == ref[5 * MiB + 8 * PAGE:5 * MiB + 9 * PAGE]
        assert m.stats()["gets"] == 6  # the last one fetched is still held
        assert direct.pread(2 * PAGE, MiB - PAGE) == ref[MiB - PAGE:MiB + PAGE]  # extents 0 and 1: gone
        st = m.stats()
        assert st["gets"] == 8 and st["extents_in_memory"] == 3 and not cache_files(m.cache_dir), st
    finally:
        direct.close()
    assert (m.path / rel).read_bytes() == ref


def test_an_extent_evicted_under_an_open_file_is_refetched_never_read_as_a_hole(
        checkpoint: Checkpoint, mounter: Callable[..., Mount]) -> None:
    """The quota (4 MiB of 1 MiB extents) punches the least recently used extent out of the cache file of a
    file that is still open: the file keeps its other extent, the range is a hole; a READ of it after the
    page cache was dropped fetches it again (one GET) and gets the source's bytes, never the hole's zeros."""
    first, second = shards(checkpoint)[:2]
    ref, ref2 = (checkpoint.root / first).read_bytes(), (checkpoint.root / second).read_bytes()
    m = mounter(str(checkpoint.root), args=[*NO_PREFETCH, "--extent-size", "1MiB", "-o", "cache.max_size=4MiB",
                                            "-o", "cache.min_free=0"])
    direct = Direct(m.path / first)
    try:
        assert direct.pread(64 * 1024, 0) == ref[:64 * 1024]  # extent 0 of `first`, then extent 1
        assert direct.pread(64 * 1024, MiB) == ref[MiB:MiB + 64 * 1024]
        cache_file = only_cache_file(m.cache_dir)
        other = Direct(m.path / second)
        try:
            for k in range(3):  # three extents of `second`: room for one more is made by punching extent 0
                assert other.pread(64 * 1024, k * MiB) == ref2[k * MiB:k * MiB + 64 * 1024], k
        finally:
            other.close()
        st = m.stats()
        assert st["evictions"] == 1 and st["evicted_bytes"] == MiB and st["bytes_in_cache"] == 4 * MiB, st
        fd = os.open(cache_file, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) == MiB  # extent 0 punched out, extent 1 still there
            assert os.pread(fd, MiB, 0) == bytes(MiB)
            assert os.pread(fd, 64 * 1024, MiB) == ref[MiB:MiB + 64 * 1024]
        finally:
            os.close(fd)
        drop_page_cache()
        gets = m.stats()["gets"]
        assert direct.pread(64 * 1024, 512 * 1024) == ref[512 * 1024:576 * 1024]
        st = m.stats()
        assert st["gets"] == gets + 1 and st["corrupt_extents"] == 0, st  # fetched again, once
        assert st["bytes_in_cache"] <= 4 * MiB, st
    finally:
        direct.close()
    assert (m.path / first).read_bytes() == ref


def test_a_byte_flipped_in_a_cache_file_before_a_restart_is_never_served(checkpoint: Checkpoint,
                                                                         mounter: Callable[..., Mount]) -> None:
    """A byte flipped in a complete cache file while no daemon runs: the next daemon hashes each extent when it
    first reads it back, drops the damaged one (punched out, unrecorded, counted) and fetches it again, so
    every byte read is the source's, and the cache file is whole again; the daemon after that finds nothing
    wrong and fetches nothing."""
    rel = shards(checkpoint)[0]
    ref = (checkpoint.root / rel).read_bytes()
    extents = -(-len(ref) // MiB)
    m = mounter(str(checkpoint.root), args=[*NO_PREFETCH, "--extent-size", "1MiB"])
    assert (m.path / rel).read_bytes() == ref
    m.umount()
    cache_file = only_cache_file(m.cache_dir)
    flip = 5 * MiB + 4321
    fd = os.open(cache_file, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, flip)[0] ^ 0xFF]), flip)
    finally:
        os.close(fd)
    again = m.remount()
    drop_page_cache()
    assert (again.path / rel).read_bytes() == ref
    st = again.stats()
    assert st["corrupt_extents"] == 1 and st["gets"] == 1 and st["bytes_fetched"] == MiB, st
    assert st["extents_verified"] == extents, st
    again.umount()
    assert cache_file.read_bytes() == ref  # the damaged extent was written again, in place
    third = again.remount()
    drop_page_cache()
    assert (third.path / rel).read_bytes() == ref
    st = third.stats()
    assert st["corrupt_extents"] == 0 and st["gets"] == 0 and st["extents_verified"] == extents, st


@pytest.mark.parametrize("damage", ["punched", "truncated"])
def test_a_cache_file_damaged_before_a_restart_is_refetched_under_mmap(damage: str, checkpoint: Checkpoint,
                                                                       mounter: Callable[..., Mount]) -> None:
    """Page faults of an mmap (as torch.load(mmap=True) reads) on a file whose cache file lost bytes while no
    daemon ran: an extent punched out (its range reads as zeros; the index still names it) is caught when
    first read back, dropped, counted and fetched again; a cache file cut short is not the version's size, so
    the next daemon counts it damaged, deletes it at start and fetches every byte once. No SIGBUS, every byte
    right, and the cache file is whole again."""
    rel = shards(checkpoint)[0]
    ref = (checkpoint.root / rel).read_bytes()
    m = mounter(str(checkpoint.root), args=[*NO_PREFETCH, "--extent-size", "1MiB"])
    assert (m.path / rel).read_bytes() == ref
    m.umount()
    cache_file = only_cache_file(m.cache_dir)
    if damage == "punched":
        fd = os.open(cache_file, os.O_WRONLY)
        try:
            punch(fd, 3 * MiB, MiB)
        finally:
            os.close(fd)
    else:
        os.truncate(cache_file, len(ref) // 2)
    again = m.remount()
    drop_page_cache()
    with open(again.path / rel, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            assert mm[:] == ref  # through page faults
        finally:
            mm.close()
    st = again.stats()
    if damage == "punched":
        assert st["corrupt_extents"] == 1 and st["gets"] == 1 and st["bytes_fetched"] == MiB, st
    else:  # found at start, counted, and every byte fetched again, once
        assert st["corrupt_extents"] >= 1 and st["gets"] >= 1 and st["bytes_fetched"] == len(ref), st
    assert st["files_complete"] == 1, st
    again.umount()
    assert cache_file.read_bytes() == ref


def test_a_cache_file_truncated_under_the_daemon_does_not_hang_its_readers(checkpoint: Checkpoint,
                                                                           mounter: Callable[..., Mount]) -> None:
    """A cache file cut short while the daemon that checked it serves it (nothing a daemon does; anything
    running as root may): its bytes past the cut are gone, so a READ of them finds a short file. The READ
    must still answer (the source's bytes, fetched again), not loop forever: bounded, every byte right."""
    rel = shards(checkpoint)[0]
    ref = (checkpoint.root / rel).read_bytes()
    m = mounter(str(checkpoint.root), args=[*NO_PREFETCH, "--extent-size", "1MiB"])
    assert (m.path / rel).read_bytes() == ref  # every extent written, and trusted by this daemon
    cache_file = only_cache_file(m.cache_dir)
    os.truncate(cache_file, len(ref) // 2)
    drop_page_cache()
    got: list[bytes] = []
    failed: list[BaseException] = []

    def read_tail() -> None:
        try:
            direct = Direct(m.path / rel)
            try:
                off = len(ref) // 2 // MiB * MiB + MiB
                got.append(direct.pread(64 * 1024, off))
            finally:
                direct.close()
        except BaseException as e:  # handed to the test below
            failed.append(e)

    reader = threading.Thread(target=read_tail, daemon=True)
    reader.start()
    reader.join(30)  # only detects a hang
    assert not reader.is_alive(), f"a READ past the cut never returned; {m.stats()}"
    off = len(ref) // 2 // MiB * MiB + MiB
    assert not failed and got == [ref[off:off + 64 * 1024]], (failed, m.stats())


def test_many_readers_of_one_file_at_once(checkpoint: Checkpoint, mounter: Callable[..., Mount]) -> None:
    """Sixteen threads with O_DIRECT (every READ reaches the daemon) and two mmap readers hit the same 8 MiB
    extent at once, on a new daemon with the page cache dropped: every byte right, the extent read back and
    hashed once (single-flight), then served from the page cache on the trio thread."""
    rel = shards(checkpoint)[0]
    ref = (checkpoint.root / rel).read_bytes()[: 8 * MiB]
    m = mounter(str(checkpoint.root), args=NO_PREFETCH)
    (m.path / rel).open("rb").read(8 * MiB)  # cold: fetch extent 0
    m.umount()
    m = m.remount()
    drop_page_cache()
    trio_thread, _ = rchar(m.pid)
    errors: list[str] = []
    start = threading.Barrier(18)

    def direct(seed: int) -> None:
        rng = random.Random(seed)
        reader = Direct(m.path / rel)
        try:
            start.wait(timeout=30)
            for _ in range(150):
                off = rng.randrange(0, 8 * MiB - MiB) // PAGE * PAGE
                got = reader.pread(MiB, off)
                if got != ref[off:off + MiB]:
                    errors.append(f"O_DIRECT read at {off}: {len(got)} bytes, wrong")
                    return
        finally:
            reader.close()

    def mapped(seed: int) -> None:
        rng = random.Random(seed)
        with open(m.path / rel, "rb") as f:
            mm = mmap.mmap(f.fileno(), 8 * MiB, prot=mmap.PROT_READ)
            try:
                start.wait(timeout=30)
                for _ in range(300):
                    lo = rng.randrange(0, 8 * MiB - 70_000)
                    if mm[lo:lo + 70_000] != ref[lo:lo + 70_000]:
                        errors.append(f"mmap slice at {lo} wrong")
                        return
            finally:
                mm.close()

    threads = [threading.Thread(target=direct, args=(i,)) for i in range(16)]
    threads += [threading.Thread(target=mapped, args=(100 + i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a reader never returned"
    assert not errors, errors[:3]
    st = m.stats()
    assert st["gets"] == 0 and st["corrupt_extents"] == 0 and st["extents_in_memory"] == 0, st
    # Single-flight: the extent (and the next one, which the kernel's readahead for the mmap readers reaches)
    # read back and hashed once, however many READs asked for it at the same moment.
    assert 1 <= st["extents_verified"] <= 2, st
    assert st["cache_hits"] >= 16 * 150  # the O_DIRECT reads all reached the daemon
    # ... and, once checked, were answered from the page cache by the trio thread (the check read the extent
    # into it), not by worker threads: at least half of the 2400 MiB they asked for (all of it unless
    # something else drops the page cache meanwhile).
    assert rchar(m.pid)[0] - trio_thread >= 16 * 150 * MiB // 2
