"""Chunk index (LMDB) and block cache, without a mount."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from modelfs.cache import BlockCache, block_hash
from modelfs.index import ChunkIndex, version_id
from modelfs.mapped import MappedBlocks, populate
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


def test_a_block_written_to_after_it_was_verified_is_verified_again(tmp_path: Path) -> None:
    """Verification is once per process, but not for a file written to since: a byte flipped in place
    (what the soak does to a live cache) is caught at the next mapping, and by `changed` for a mapping
    the daemon already holds, never served as good."""
    data = os.urandom(50_000)
    h = block_hash(data)
    dropped: list[bytes] = []
    cache = BlockCache(str(tmp_path), "d", on_corrupt=dropped.append)
    cache.put(h, data)
    held = cache.map(h, len(data))
    assert held is not None and held[:100] == data[:100] and cache.changed([h]) == []
    fd = os.open(cache.path(h), os.O_RDWR)
    try:
        os.pwrite(fd, bytes([data[777] ^ 0xFF]), 777)
    finally:
        os.close(fd)
    assert held[777] != data[777]  # a mapping shows the write at once: the daemon must drop it
    assert cache.changed([h]) == [h]
    held.close()
    assert cache.map(h, len(data)) is None  # verified again: bad, dropped
    assert dropped == [h] and not os.path.exists(cache.path(h))


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


def test_mapped_blocks_bound_descriptors_and_bytes(tmp_path: Path) -> None:
    """Each mapping holds an fd (CPython's mmap keeps a dup): the pool caps them by count and by bytes, and
    a dropped mapping gives its fd back once no view of it is left."""
    cache = BlockCache(str(tmp_path), "d")
    blocks = [os.urandom(1000 + i) for i in range(50)]
    for b in blocks:
        cache.put(block_hash(b), b)
    before = len(os.listdir("/proc/self/fd"))
    maps = MappedBlocks(budget=1 << 20, max_maps=8)
    kept = None
    for i, b in enumerate(blocks):
        m = cache.map(block_hash(b), len(b))
        assert m is not None
        view = maps.put(block_hash(b), m)
        del m
        assert bytes(view[10:30]) == b[10:30]
        if i == 0:
            kept = view  # a view handed out stays valid after its mapping left the pool
        del view
        assert len(maps) <= 8 and len(os.listdir("/proc/self/fd")) - before <= 9
    assert kept is not None and bytes(kept) == blocks[0]
    assert maps.view(block_hash(blocks[0]), 0, 10) is None  # dropped from the pool long ago
    assert bytes(maps.view(block_hash(blocks[-1]), 5, 10) or b"") == blocks[-1][5:15]
    small = MappedBlocks(budget=3 * 1049)
    for b in blocks[:10]:
        small.put(block_hash(b), cache.map(block_hash(b), len(b)))  # type: ignore[arg-type]
        assert small.bytes <= 3 * 1049
    del kept
    maps.clear()
    small.clear()
    assert len(os.listdir("/proc/self/fd")) == before


def test_views_of_unresident_pages_are_refused(tmp_path: Path) -> None:
    """mincore: a READ over pages the kernel dropped must not fault them in on the trio thread."""
    cache = BlockCache(str(tmp_path), "d")
    data = os.urandom(1 << 20)
    h = block_hash(data)
    cache.put(h, data)
    maps = MappedBlocks(budget=4 << 20)
    m = cache.map(h, len(data))
    assert m is not None
    maps.put(h, m)
    assert bytes(maps.view(h, 4096, 65536) or b"") == data[4096:69632]
    del m
    maps.clear()
    fd = os.open(cache.path(h), os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop the block's pages from the page cache
    finally:
        os.close(fd)
    unpopulated = cache.map(h, len(data), populate=False)
    assert unpopulated is not None
    maps.put(h, unpopulated)
    assert maps.view(h, 0, 65536) is None and maps.not_resident == 1
    entry = maps.entry(h)
    assert entry is not None
    populate(entry, 1000, 65536)  # what the worker-thread path does: fault the same mapping's pages in
    assert bytes(maps.view(h, 0, 65536) or b"") == data[:65536]
