"""Cache space: quota, LRU eviction, pins, prefetch protection, a full filesystem; offline listings.

Pure logic over real files (and a real, small tmpfs for ENOSPC): no mount needed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from modelfs.cache import BlockCache, CacheFull, block_hash
from modelfs.index import ChunkIndex
from modelfs.remote import Listing, ObjectInfo

BLOCK = 64 * 1024


def blocks(n: int) -> list[bytes]:
    return [os.urandom(BLOCK) for _ in range(n)]


def test_quota_evicts_least_recently_used_first(tmp_path: Path) -> None:
    evicted: list[tuple[int, int]] = []
    cache = BlockCache(str(tmp_path), "d", max_size=4 * BLOCK, on_evict=lambda k, n: evicted.append((k, n)))
    data = blocks(6)
    for b in data[:4]:
        assert cache.put(block_hash(b), b)
    assert cache.read(block_hash(data[0]), BLOCK, 0, 10) == data[0][:10]  # 0 is now most recent
    cache.put(block_hash(data[4]), data[4])
    cache.put(block_hash(data[5]), data[5])
    kept = {i for i, b in enumerate(data) if cache.contains(block_hash(b))}
    assert kept == {0, 3, 4, 5}
    assert cache.bytes_stored == 4 * BLOCK == sum(f.stat().st_size for f in (tmp_path / "blocks").rglob("*")
                                                  if f.is_file())
    assert (sum(k for k, _ in evicted), sum(n for _, n in evicted)) == (2, 2 * BLOCK)


def test_room_an_eviction_frees_is_not_given_out_before_the_file_is_gone(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that evicts a large block to store a small one frees more than it needs; while that file
    is still being unlinked, a second writer must not count the surplus as free (the disk would hold
    more than the quota): bytes on disk never exceed cache.max_size."""
    unit = 64 * 1024
    big, small, a, b = os.urandom(2 * unit), os.urandom(unit), os.urandom(unit), os.urandom(unit)
    cache = BlockCache(str(tmp_path), "d", max_size=3 * unit)
    cache.put(block_hash(big), big)
    cache.put(block_hash(small), small)
    slow_path = cache.path(block_hash(big))
    unlinking, go_on = threading.Event(), threading.Event()
    real_unlink = os.unlink

    def unlink(path: str, *args: object, **kwargs: object) -> None:
        if os.fspath(path) == slow_path:  # the big block's unlink is held, as on a busy disk
            unlinking.set()
            go_on.wait(30)
        real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", unlink)
    first = threading.Thread(target=cache.put, args=(block_hash(a), a))
    first.start()
    assert unlinking.wait(30)

    def on_disk() -> int:
        return sum(p.stat().st_size for p in (tmp_path / "blocks").rglob("*") if p.is_file())

    try:
        cache.put(block_hash(b), b)
    except CacheFull:
        pass
    assert on_disk() <= 3 * unit
    go_on.set()
    first.join(30)
    assert on_disk() <= 3 * unit and cache.bytes_stored <= 3 * unit


def test_a_block_being_read_is_never_evicted(tmp_path: Path) -> None:
    cache = BlockCache(str(tmp_path), "d", max_size=2 * BLOCK)
    a, b, c = blocks(3)
    cache.put(block_hash(a), a)
    cache.put(block_hash(b), b)
    with cache.held(block_hash(a)):
        cache.put(block_hash(c), c)  # a is oldest but pinned: b goes
        assert cache.contains(block_hash(a)) and not cache.contains(block_hash(b))
    with cache.held(block_hash(a)), cache.held(block_hash(c)), pytest.raises(CacheFull):
        cache.put(block_hash(b), b)  # everything pinned: no room, nothing written
    assert cache.bytes_stored <= 2 * BLOCK
    assert not any(".tmp." in f.name for f in (tmp_path / "blocks").rglob("*"))


def test_prefetch_protection_keeps_blocks_of_the_current_load(tmp_path: Path) -> None:
    cache = BlockCache(str(tmp_path), "d", max_size=3 * BLOCK)
    old, cur1, cur2, new = blocks(4)
    cache.put(block_hash(old), old)
    since = time.monotonic()
    cache.put(block_hash(cur1), cur1)
    cache.put(block_hash(cur2), cur2)
    assert cache.headroom(protect_since=since) == BLOCK  # only `old` may go
    assert cache.make_room(BLOCK, protect_since=since)  # evicts `old`
    assert not cache.contains(block_hash(old))
    cache.put(block_hash(new), new)
    assert not cache.make_room(BLOCK, protect_since=since)  # all three are of this load
    assert cache.make_room(BLOCK)  # a demand read may evict anything unpinned


def test_quota_and_order_survive_a_restart(tmp_path: Path) -> None:
    cache = BlockCache(str(tmp_path), "d")
    data = blocks(3)
    for b in data:
        cache.put(block_hash(b), b)
    cache.close()
    again = BlockCache(str(tmp_path), "other-domain", max_size=2 * BLOCK)  # quota counts every domain
    assert again.bytes_stored == 3 * BLOCK
    extra = os.urandom(BLOCK)
    again.put(block_hash(extra), extra)
    assert again.bytes_stored == 2 * BLOCK


@pytest.fixture
def small_fs(tmpfs: Callable[..., Path]) -> Path:
    """A real 4 MiB tmpfs."""
    return tmpfs("small", "size=4m")


def test_a_full_filesystem_evicts_and_never_leaves_partial_blocks(small_fs: Path) -> None:
    cache = BlockCache(str(small_fs), "d")  # no quota, no free-space floor: the disk fills up for real
    data = [os.urandom(512 * 1024) for _ in range(16)]  # 8 MiB into a 4 MiB filesystem
    for b in data:
        try:
            cache.put(block_hash(b), b)
        except CacheFull:
            pytest.fail("a full disk must be handled by evicting")
    st = os.statvfs(small_fs)
    assert cache.bytes_stored <= st.f_blocks * st.f_frsize
    assert not any(".tmp." in f.name for f in small_fs.rglob("*"))
    newest = data[-1]
    assert cache.read(block_hash(newest), len(newest), 0, len(newest)) == newest
    on_disk = sum(f.stat().st_size for f in (small_fs / "blocks").rglob("*") if f.is_file())
    assert on_disk == cache.bytes_stored


def test_a_block_larger_than_the_filesystem_raises_cache_full(small_fs: Path) -> None:
    cache = BlockCache(str(small_fs), "d")
    big = os.urandom(6 << 20)
    with pytest.raises(CacheFull):
        cache.put(block_hash(big), big)
    assert not any(f.is_file() for f in (small_fs / "blocks").rglob("*"))


def test_listings_round_trip_for_offline_mode(tmp_path: Path) -> None:
    idx = ChunkIndex(str(tmp_path / "index"), 1 << 24)
    odd = "caf\u00e9-\udcff.bin"  # a key that is not valid UTF-8 survives as-is (the namespace hides it)
    listing = Listing(dirs=["sub"], objects=[("a.safetensors", ObjectInfo("m/a.safetensors", 10, '"e1"', 1.5)),
                                             (odd, ObjectInfo("m/" + odd, 3, '"e2"', 2.0))])
    idx.save_listing("s3:x/b/", "m/", listing)
    assert idx.load_listing("s3:x/b/", "m/") == listing
    assert idx.load_listing("s3:x/b/", "other/") is None
    assert idx.load_listing("s3:y/b/", "m/") is None  # per source
    idx.close()
    again = ChunkIndex(str(tmp_path / "index"), 1 << 24)
    assert again.load_listing("s3:x/b/", "m/") == listing
    again.close()
