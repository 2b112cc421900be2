"""Chunk index (LMDB) and block cache, without a mount."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from modelfs.cache import BlockCache, block_hash
from modelfs.index import ChunkIndex, version_id
from modelfs.mapped import MappedBlocks
from modelfs.remote import ObjectInfo

INFO = ObjectInfo("m/model.safetensors", 100, '"etag-1"', 0.0)


def test_index_records_survive_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "index")
    vid = version_id("src", INFO)
    idx = ChunkIndex(path, 1 << 26)
    h = block_hash(b"x" * 64)
    idx.record(vid, "src", INFO, 64, h, 36)
    idx.record(vid, "src", INFO, 0, block_hash(b"y"), 64)
    idx.close()
    idx = ChunkIndex(path, 1 << 26)
    assert idx.lookup(vid, 64) == (h, 36)
    assert sorted(idx.extents(vid)) == [0, 64]
    assert idx.lookup(vid, 128) is None
    assert next(iter(idx.versions().values()))["key"] == INFO.key
    idx.close()


def test_version_id_changes_with_etag_size_and_source() -> None:
    base = version_id("src", INFO)
    assert version_id("src", ObjectInfo(INFO.key, 100, '"etag-2"', 0.0)) != base
    assert version_id("src", ObjectInfo(INFO.key, 101, INFO.etag, 0.0)) != base
    assert version_id("other", INFO) != base
    assert version_id("src", ObjectInfo(INFO.key, 100, INFO.etag, 99.0)) == base  # mtime is not identity


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_garbage_or_truncated_lmdb_is_rebuilt(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "index"
    idx = ChunkIndex(str(path), 1 << 26)
    idx.record(version_id("s", INFO), "s", INFO, 0, block_hash(b"z"), 1)
    idx.close()
    data = path / "data.mdb"
    if damage == "garbage":
        data.write_bytes(os.urandom(data.stat().st_size))
    else:
        with open(data, "r+b") as f:
            f.truncate(100)
    idx = ChunkIndex(str(path), 1 << 26)  # must not raise
    assert idx.lookup(version_id("s", INFO), 0) is None
    idx.record(version_id("s", INFO), "s", INFO, 0, block_hash(b"z"), 1)
    idx.close()
    assert any(p.name.startswith("index.corrupt-") for p in tmp_path.iterdir())


def test_many_threads_read_and_write_index(tmp_path: Path) -> None:
    idx = ChunkIndex(str(tmp_path / "index"), 1 << 26)
    vid = version_id("s", INFO)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(200):
                idx.record(vid, "s", INFO, (t * 1000 + i) * 64, block_hash(bytes([t, i % 256])), 64)
                assert idx.lookup(vid, (t * 1000 + i) * 64) is not None
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(idx.extents(vid)) == 32 * 200
    idx.close()


def test_cache_put_read_dedup_and_permissions(tmp_path: Path) -> None:
    cache = BlockCache(str(tmp_path), "domain")
    data = os.urandom(100_000)
    h = block_hash(data)
    assert cache.put(h, data) is True
    assert cache.put(h, data) is False  # identical content stored once
    assert cache.read(h, len(data), 1000, 5000) == data[1000:6000]
    assert cache.bytes_stored == len(data) and cache.blocks_stored == 1
    assert os.stat(cache.path(h)).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "blocks").st_mode & 0o777 == 0o700
    cache.close()


def test_cache_domains_do_not_share_blocks(tmp_path: Path) -> None:
    a = BlockCache(str(tmp_path), "bucket-a")
    b = BlockCache(str(tmp_path), "bucket-b")
    data = b"same bytes" * 100
    h = block_hash(data)
    a.put(h, data)
    assert not b.contains(h)
    assert b.read(h, len(data), 0, 10) is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
def test_corrupt_block_is_detected_on_first_serve_and_dropped(tmp_path: Path, damage: str) -> None:
    data = os.urandom(50_000)
    h = block_hash(data)
    BlockCache(str(tmp_path), "d").put(h, data)
    path = BlockCache(str(tmp_path), "d").path(h)
    raw = bytearray(Path(path).read_bytes())
    if damage == "flip":
        raw[12345] ^= 0x01
    elif damage == "truncate":
        raw = raw[:40_000]
    else:
        raw += b"\0"
    Path(path).write_bytes(bytes(raw))
    dropped: list[bytes] = []
    fresh = BlockCache(str(tmp_path), "d", on_corrupt=dropped.append)  # a new process: nothing verified yet
    fresh.scan()
    assert fresh.read(h, len(data), 0, 100) is None
    assert dropped == [h]
    assert not os.path.exists(path)
    assert fresh.put(h, data) is True
    assert fresh.read(h, len(data), 0, 100) == data[:100]


def test_a_copy_handed_out_never_changes_and_every_load_is_verified(tmp_path: Path) -> None:
    """A loaded block is a private copy of the bytes that were hashed: a byte flipped in place afterwards
    (what the soak does to a live cache) never shows in it, and the next load of the file, the first of
    this process or not, is hashed again, found bad, dropped, never served."""
    data = os.urandom(50_000)
    h = block_hash(data)
    dropped: list[bytes] = []
    cache = BlockCache(str(tmp_path), "d", on_corrupt=dropped.append)
    cache.put(h, data)
    held = cache.load(h, len(data))
    assert held is not None and bytes(held) == data and cache.verified(h)
    stat = os.stat(cache.path(h))
    fd = os.open(cache.path(h), os.O_RDWR)
    try:
        os.pwrite(fd, bytes([data[777] ^ 0xFF]), 777)
    finally:
        os.close(fd)
    assert bytes(held) == data  # the copy does not see the write
    assert cache.load(h, len(data)) is None  # hashed again: bad, dropped
    assert dropped == [h] and not os.path.exists(cache.path(h)) and not cache.verified(h)
    assert stat.st_size == len(data)


def test_a_truncated_or_replaced_block_is_never_served(tmp_path: Path) -> None:
    """A block file truncated under the daemon is dropped at its next load; one stored again meanwhile
    (a refetch) is a new file and is not dropped by a load that found the old one bad."""
    data = os.urandom(3 * 4096 + 100)  # not a multiple of O_DIRECT's alignment
    h = block_hash(data)
    cache = BlockCache(str(tmp_path), "d")
    cache.put(h, data)
    assert bytes(cache.load(h, len(data)) or b"") == data
    os.truncate(cache.path(h), 4096)
    assert cache.load(h, len(data)) is None and not os.path.exists(cache.path(h))
    assert cache.put(h, data) is True
    old_inode = os.stat(cache.path(h)).st_ino + 1  # a file that is no longer there
    cache.drop(h, "corrupt", old_inode)
    assert os.path.exists(cache.path(h))  # the good new file stays
    assert bytes(cache.load(h, len(data)) or b"") == data


def test_scan_sweeps_temp_files_and_counts(tmp_path: Path) -> None:
    cache = BlockCache(str(tmp_path), "d")
    data = b"a" * 5000
    h = block_hash(data)
    cache.put(h, data)
    tmp = cache.path(h) + ".tmp.999.0"
    Path(tmp).write_bytes(b"partial")
    fresh = BlockCache(str(tmp_path), "d")
    fresh.scan()
    assert not os.path.exists(tmp)
    assert fresh.bytes_stored == 5000 and fresh.blocks_stored == 1


def test_held_blocks_bound_bytes_and_count_and_hold_no_descriptor(tmp_path: Path) -> None:
    """Copies are bounded by count and by bytes; a view handed out stays valid after its copy left the
    pool; no copy holds a file descriptor."""
    cache = BlockCache(str(tmp_path), "d")
    blocks = [os.urandom(1000 + i) for i in range(50)]
    for b in blocks:
        cache.put(block_hash(b), b)
    before = len(os.listdir("/proc/self/fd"))
    maps = MappedBlocks(budget=1 << 20, max_maps=8)
    kept = None
    for i, b in enumerate(blocks):
        m = cache.load(block_hash(b), len(b))
        assert m is not None
        view = maps.put(block_hash(b), m)
        del m
        assert bytes(view[10:30]) == b[10:30]
        if i == 0:
            kept = view  # a view handed out stays valid after its copy left the pool
        del view
        assert len(maps) <= 8 and len(os.listdir("/proc/self/fd")) == before
    assert kept is not None and bytes(kept) == blocks[0]
    assert maps.view(block_hash(blocks[0]), 0, 10) is None  # dropped from the pool long ago
    assert bytes(maps.view(block_hash(blocks[-1]), 5, 10) or b"") == blocks[-1][5:15]
    small = MappedBlocks(budget=3 * 1049)
    for b in blocks[:10]:
        small.put(block_hash(b), cache.load(block_hash(b), len(b)))  # type: ignore[arg-type]
        assert small.bytes <= 3 * 1049
    del kept
    maps.clear()
    small.clear()


def test_blocks_are_read_whether_or_not_their_pages_are_cached(tmp_path: Path) -> None:
    """`load` copies what the page cache holds and reads the rest with O_DIRECT: the same bytes either way,
    for lengths on and off O_DIRECT's alignment."""
    cache = BlockCache(str(tmp_path), "d")
    for size in (1 << 20, (1 << 20) + 123, 5000):
        data = os.urandom(size)
        h = block_hash(data)
        cache.put(h, data)
        assert bytes(cache.load(h, size) or b"") == data  # pages cached (just written)
        fd = os.open(cache.path(h), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop the block's pages
            assert bytes(cache.load(h, size) or b"") == data  # read from disk
            os.pread(fd, 8192, 0)  # the first pages cached, the rest not
        finally:
            os.close(fd)
        assert bytes(cache.load(h, size) or b"") == data
