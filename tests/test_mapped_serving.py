"""Serving from mapped blocks through real mounts: edges and mmap slices with a pool that churns, a block
evicted while mapped, a block truncated before it is mapped, many readers of one mapping at once."""

from __future__ import annotations

import mmap
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Checkpoint, Mount, requires_fuse

pytestmark = [requires_fuse, pytest.mark.mount]

MiB = 1 << 20
# These tests count what the READ path does; with passthrough a later open could be served from the
# file's copy instead (copies are tested in test_passthrough.py).
NO_PREFETCH = ["-o", "prefetch.whole_file=false", "-o", "prefetch.checkpoint_sets=false",
               "-o", "prefetch.sequential=false", "-o", "mount.passthrough=off"]


def drop_page_cache() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def shards(checkpoint: Checkpoint) -> list[str]:
    return sorted(f for f in checkpoint.files() if f.endswith(".safetensors"))


def block_files(cache_dir: Path) -> list[Path]:
    return [p for p in (cache_dir / "blocks").rglob("*") if p.is_file() and ".tmp." not in p.name]


def test_warm_reads_and_mmap_slices_across_edges_with_a_small_pool(backend: tuple[str, dict[str, str]],
                                                                   checkpoint: Checkpoint,
                                                                   mounter: Callable[..., Mount]) -> None:
    """1 MiB extents and a 3 MiB pool: reads that cross extent edges, and mmap slices, come from mappings
    that are made, dropped and made again; every byte matches, and every load of a block is hashed."""
    source, env = backend
    # No checkpoint-set prefetch: the other shards, fetched by whichever daemon gets to them first, are
    # not what this test counts.
    args = ["--extent-size", "1MiB", "-o", "cache.map_budget=3MiB", "-o", "prefetch.checkpoint_sets=false"]
    m = mounter(source, env=env, args=args)
    rel = shards(checkpoint)[0]
    ref = (checkpoint.root / rel).read_bytes()
    assert (m.path / rel).read_bytes() == ref  # cold: fetched, stored, mapped
    m.umount()
    m = m.remount()  # warm: a new daemon, nothing verified yet
    drop_page_cache()
    rng = random.Random(7)
    with open(m.path / rel, "rb", buffering=0) as f:
        for _ in range(300):
            edge = rng.randrange(1, len(ref) // MiB + 1) * MiB
            off = max(0, edge + rng.randrange(-70_000, 70_000))
            size = rng.choice([1, 4096, 65536, 300_000, 2 * MiB + 5])
            assert os.pread(f.fileno(), size, off) == ref[off:off + size], (off, size)
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            for _ in range(300):
                edge = rng.randrange(1, len(ref) // MiB + 1) * MiB
                lo, hi = max(0, edge - rng.randrange(0, 9000)), min(len(ref), edge + rng.randrange(1, 9000))
                assert mm[lo:hi] == ref[lo:hi], (lo, hi)
        finally:
            mm.close()
    st = m.stats()
    assert st["gets"] == 0 and st["corrupt_blocks"] == 0
    assert st["mapped_blocks"] <= 3  # the pool held to its budget of three 1 MiB blocks ...
    assert st["blocks_mapped"] > -(-len(ref) // MiB)  # ... so blocks were loaded again after being dropped,
    assert st["blocks_verified"] == st["blocks_mapped"]  # and every load from disk was hashed


def test_block_evicted_while_mapped_stays_readable(checkpoint: Checkpoint, mounter: Callable[..., Mount]) -> None:
    """A block the quota evicts (its file unlinked) while its copy is held keeps serving its bytes from the
    copy: no GET, even after the page cache was dropped."""
    first, second = shards(checkpoint)[:2]
    ref = (checkpoint.root / first).read_bytes()
    m = mounter(str(checkpoint.root), args=[*NO_PREFETCH, "--extent-size", "1MiB", "-o", "cache.max_size=4MiB",
                                            "-o", "cache.min_free=0"])
    with open(m.path / first, "rb", buffering=0) as f:
        assert os.pread(f.fileno(), 4096, 0) == ref[:4096]  # block 0 of `first`: fetched, stored, mapped
        path_of_block0 = {p.name: p for p in block_files(m.cache_dir)}
        assert (m.path / second).read_bytes() == (checkpoint.root / second).read_bytes()  # evicts it
        st = m.stats()
        assert st["evictions"] > 0 and st["bytes_in_cache"] <= 4 * MiB
        gone = [p for p in path_of_block0.values() if not p.exists()]
        assert gone, "the quota should have evicted the first block"
        drop_page_cache()
        gets = m.stats()["gets"]
        assert os.pread(f.fileno(), 64 * 1024, 512 * 1024) == ref[512 * 1024:576 * 1024]
        assert m.stats()["gets"] == gets  # served from the mapping of the evicted block


def test_a_block_flipped_on_disk_while_held_is_never_served(checkpoint: Checkpoint,
                                                           mounter: Callable[..., Mount]) -> None:
    """A byte flipped in place in a block the daemon verified and holds: the daemon serves its own copy of
    the bytes it hashed, so the flip never shows; the next load of the block from disk hashes it again,
    drops it and refetches: every byte right. (With file mappings, the flip was served for up to half a
    second.)"""
    rel = shards(checkpoint)[0]
    ref = (checkpoint.root / rel).read_bytes()
    m = mounter(str(checkpoint.root), args=[*NO_PREFETCH, "--extent-size", "1MiB"])
    assert (m.path / rel).read_bytes() == ref  # every block fetched, verified and held (the pool holds all)
    assert m.stats()["mapped_blocks"] >= len(ref) // MiB
    victim = max(block_files(m.cache_dir), key=lambda p: p.stat().st_size)
    fd = os.open(victim, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, 4321)[0] ^ 0xFF]), 4321)
    finally:
        os.close(fd)
    drop_page_cache()
    gets = m.stats()["gets"]
    assert (m.path / rel).read_bytes() == ref  # from the daemon's copies
    assert m.stats()["gets"] == gets
    m.umount()
    again = m.remount()  # nothing held: every block is loaded from disk
    drop_page_cache()
    assert (again.path / rel).read_bytes() == ref
    st = again.stats()
    assert st["corrupt_blocks"] == 1 and st["gets"] == 1, st


def test_block_truncated_before_it_is_mapped_is_refetched(checkpoint: Checkpoint,
                                                          mounter: Callable[..., Mount]) -> None:
    """A block file shorter than its extent is caught at map time (no SIGBUS), dropped, counted, refetched."""
    rel = shards(checkpoint)[0]
    ref = (checkpoint.root / rel).read_bytes()
    m = mounter(str(checkpoint.root), args=[*NO_PREFETCH, "--extent-size", "1MiB"])
    assert (m.path / rel).read_bytes() == ref
    m.umount()
    victim = max(block_files(m.cache_dir), key=lambda p: p.stat().st_size)
    os.truncate(victim, victim.stat().st_size // 2)
    again = m.remount()
    with open(again.path / rel, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            assert mm[:] == ref  # through page faults, as torch.load(mmap=True) reads
        finally:
            mm.close()
    st = again.stats()
    assert st["corrupt_blocks"] == 1 and st["gets"] == 1, st


def test_many_readers_of_one_mapping_at_once(checkpoint: Checkpoint, mounter: Callable[..., Mount]) -> None:
    """Sixteen threads with O_DIRECT (every READ reaches the daemon) and two mmap readers hit the same
    8 MiB block at once: every byte right, the block mapped and hashed once."""
    rel = shards(checkpoint)[0]
    ref = (checkpoint.root / rel).read_bytes()[: 8 * MiB]
    m = mounter(str(checkpoint.root), args=NO_PREFETCH)
    (m.path / rel).open("rb").read(8 * MiB)  # cold: fetch block 0
    m.umount()
    m = m.remount()
    drop_page_cache()
    errors: list[str] = []
    start = threading.Barrier(18)

    def direct(seed: int) -> None:
        rng = random.Random(seed)
        buf = mmap.mmap(-1, 2 * MiB)  # page-aligned, as O_DIRECT wants
        fd = os.open(m.path / rel, os.O_RDONLY | os.O_DIRECT)
        try:
            start.wait(timeout=30)
            for _ in range(150):
                off = rng.randrange(0, 8 * MiB - MiB) // 4096 * 4096
                n = os.preadv(fd, [memoryview(buf)[:MiB]], off)
                if buf[:n] != ref[off:off + n] or n != MiB:
                    errors.append(f"O_DIRECT read at {off}: {n} bytes, wrong")
                    return
        finally:
            os.close(fd)
            buf.close()

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
    assert st["gets"] == 0
    # Single-flight: the block (and the next one, which the kernel's readahead for the mmap readers reaches)
    # mapped once and hashed once, however many READs asked for it at the same moment.
    assert st["blocks_verified"] == st["blocks_mapped"] <= 2, st
    assert st["cache_hits"] >= 16 * 150  # the O_DIRECT reads all reached the daemon
