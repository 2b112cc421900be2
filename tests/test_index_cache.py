"""Chunk index (LMDB) and the file cache (one sparse file per file version), without a mount."""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import json
import mmap
import os
import struct
import threading
from pathlib import Path

import lmdb
import pytest
import trio

from modelfs import cache as cache_mod
from modelfs.cache import FileCache, integrity
from modelfs.cache import base as cache_base
from modelfs.cache.scrub import IOPRIO_CLASS_IDLE, IOPRIO_CLASS_SHIFT, Scrub, io_priority
from modelfs.catalog.index import ChunkIndex, version_id
from modelfs.catalog.version import FileVersion
from modelfs.digest import content_hash
from modelfs.mapped import MappedBlocks, private_copy
from modelfs.remote import ObjectInfo
from modelfs.remote.local import LocalStore
from modelfs.stats import Stats

INFO = ObjectInfo("m/model.safetensors", 100, '"etag-1"', 0.0)
EXT = 64 * 1024  # extent size of the versions below (a multiple of the page size)


def make_version(key: str, size: int, identity: str = "src", extent_size: int = EXT) -> FileVersion:
    return FileVersion.of(identity, ObjectInfo(key, size, f'"{key}-etag"', 0.0), extent_size)


def fill(cache: FileCache, ver: FileVersion) -> dict[int, bytes]:
    """Write every extent of `ver` (random bytes); returns start -> bytes."""
    out: dict[int, bytes] = {}
    for start, length in ver.extents():
        data = os.urandom(length)
        assert cache.write(ver, start, data, content_hash(data))
        out[start] = data
    return out


def read(cache: FileCache, vid: bytes, start: int, offset: int, size: int, nowait: bool = False) -> bytes | int:
    """pread into a fresh buffer: the bytes read, or pread's return value when it read nothing."""
    buf = bytearray(b"\xa5" * size)  # not zeros: a read that wrote nothing is told apart from a hole
    n = cache.pread(vid, start, offset, memoryview(buf), nowait=nowait)
    return bytes(buf[:n]) if n > 0 else n


def new_index(tmp_path: Path) -> ChunkIndex:
    return ChunkIndex(str(tmp_path / "index"), 1 << 24)


# -- the index ---------------------------------------------------------------------------------------------


def test_index_records_survive_reopen(tmp_path: Path) -> None:
    """Extent hashes are statements about immutable content: they outlive the process that learnt them."""
    path = str(tmp_path / "index")
    vid = version_id("src", INFO)
    idx = ChunkIndex(path, 1 << 26)
    h = content_hash(b"x" * 64)
    idx.record(vid, "src", "dom", INFO, 64, h, 36)
    idx.record(vid, "src", "dom", INFO, 0, content_hash(b"y"), 64)
    idx.close()
    idx = ChunkIndex(path, 1 << 26)
    assert idx.lookup(vid, 64) == (h, 36)
    assert sorted(idx.extents(vid)) == [0, 64]
    assert idx.lookup(vid, 128) is None
    rec = idx.versions()[vid]
    assert rec["key"] == INFO.key and rec["domain"] == "dom" and rec["source"] == "src"
    assert idx.present() == {}  # a hash recorded is not bytes stored
    idx.close()


def test_present_entries_are_marked_and_unmarked(tmp_path: Path) -> None:
    """`present` is what a restarted cache believes its files hold: marked after a write, unmarked before a
    punch; the extents table (content) stays either way."""
    idx = new_index(tmp_path)
    vid = version_id("src", INFO)
    a, b = content_hash(b"a"), content_hash(b"b")
    assert idx.mark_present(vid, "src", "dom", INFO, [(0, a, 64), (64, b, 36)])
    assert idx.present() == {vid: {0: (a, 64), 64: (b, 36)}}
    idx.unmark([(vid, 0)])
    idx.close()
    idx = new_index(tmp_path)
    assert idx.present() == {vid: {64: (b, 36)}}
    assert idx.extents(vid) == {0: (a, 64), 64: (b, 36)}
    assert idx.note_load(vid, "src", "dom", INFO) == 1 and idx.note_load(vid, "src", "dom", INFO) == 2
    unseen = version_id("src", ObjectInfo("m/other.safetensors", 10, '"e"', 0.0))
    assert idx.note_load(unseen, "src", "dom", INFO) == 1  # a version with no record yet gets one
    assert idx.versions()[unseen]["loads"] == 1
    idx.close()


def test_version_id_changes_with_etag_size_and_source() -> None:
    base = version_id("src", INFO)
    assert version_id("src", ObjectInfo(INFO.key, 100, '"etag-2"', 0.0)) != base
    assert version_id("src", ObjectInfo(INFO.key, 101, INFO.etag, 0.0)) != base
    assert version_id("other", INFO) != base
    assert version_id("src", ObjectInfo(INFO.key, 100, INFO.etag, 99.0)) == base  # mtime is not identity


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_garbage_or_truncated_lmdb_is_rebuilt(tmp_path: Path, damage: str) -> None:
    """An unreadable index costs warmth only: moved aside, rebuilt empty, never an error."""
    path = tmp_path / "index"
    idx = ChunkIndex(str(path), 1 << 26)
    idx.record(version_id("s", INFO), "s", "d", INFO, 0, content_hash(b"z"), 1)
    idx.close()
    data = path / "data.mdb"
    if damage == "garbage":
        data.write_bytes(os.urandom(data.stat().st_size))
    else:
        with open(data, "r+b") as f:
            f.truncate(100)
    idx = ChunkIndex(str(path), 1 << 26)  # must not raise
    assert idx.lookup(version_id("s", INFO), 0) is None
    idx.record(version_id("s", INFO), "s", "d", INFO, 0, content_hash(b"z"), 1)
    idx.close()
    assert any(p.name.startswith("index.corrupt-") for p in tmp_path.iterdir())


def test_schema_1_index_is_upgraded_in_place(tmp_path: Path) -> None:
    """An index written by the block-cache daemon (schema 1) keeps its extents and listings (true forever)
    but claims no bytes are present: schema 1 kept them in `blocks/`, which is removed."""
    path = tmp_path / "index"
    vid = version_id("src", INFO)
    h = content_hash(b"old content")
    env = lmdb.open(str(path), map_size=1 << 24, max_dbs=8)
    meta, versions, extents, listings = (env.open_db(n) for n in (b"meta", b"versions", b"extents", b"listings"))
    with env.begin(write=True) as txn:
        txn.put(b"schema", b"1", db=meta)
        txn.put(vid, json.dumps({"source": "src", "key": INFO.key, "etag": INFO.etag, "size": INFO.size,
                                 "last_used": 1.0}).encode(), db=versions)
        txn.put(vid + struct.pack(">Q", 0), struct.pack(">16sI", h, 64), db=extents)
        txn.put(b"src\0m/", json.dumps({"dirs": ["sub"], "objects": [["model.safetensors", 100, INFO.etag, 0.0]]})
                .encode(), db=listings)
    env.close()
    old_block = tmp_path / "blocks" / "d" / "ab" / "cd" / h.hex()
    old_block.parent.mkdir(parents=True)
    old_block.write_bytes(b"old content")

    idx = ChunkIndex(str(path), 1 << 24)
    assert not any(p.name.startswith("index.corrupt-") for p in tmp_path.iterdir())  # upgraded, not rebuilt
    assert idx.lookup(vid, 0) == (h, 64) and idx.extents(vid) == {0: (h, 64)}
    listing = idx.load_listing("src", "m/")
    assert listing is not None and listing.dirs == ["sub"]
    assert idx.present() == {}
    with idx.env.begin(db=idx.env.open_db(b"meta")) as txn:
        assert txn.get(b"schema") == b"2"
    cache = FileCache(str(tmp_path), idx, "d", "src", min_free=0)
    assert cache.bytes_stored == 0 and cache.files == 0
    assert not cache.present(vid, 0) and read(cache, vid, 0, 0, 10) == -1
    assert not (tmp_path / "blocks").exists()
    cache.close()
    idx.close()
    again = ChunkIndex(str(path), 1 << 24)  # the upgrade stuck: schema 2 opens as it is
    assert again.lookup(vid, 0) == (h, 64)
    again.close()


def test_many_threads_read_and_write_index(tmp_path: Path) -> None:
    """LMDB serializes the daemon's writer threads; no record is lost."""
    idx = ChunkIndex(str(tmp_path / "index"), 1 << 26)
    vid = version_id("s", INFO)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(200):
                idx.record(vid, "s", "d", INFO, (t * 1000 + i) * 64, content_hash(bytes([t, i % 256])), 64)
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


# -- the file cache ----------------------------------------------------------------------------------------


def test_write_pread_permissions_and_bytes_stored(tmp_path: Path) -> None:
    """Extents land at their own offset of the version's one private file and are served from there."""
    idx = new_index(tmp_path)
    cache = FileCache(str(tmp_path), idx, "domain", "src", min_free=0)
    ver = make_version("m/a.bin", 2 * EXT + 1000)
    data = fill(cache, ver)
    assert cache.write(ver, EXT, data[EXT], content_hash(data[EXT])) is False  # present already
    assert read(cache, ver.vid, EXT, 1000, 5000) == data[EXT][1000:6000]
    assert read(cache, ver.vid, 2 * EXT, 0, 1000) == data[2 * EXT]
    assert cache.bytes_stored == 2 * EXT + 1000 and cache.files == 1
    assert cache.complete(ver.vid) and cache.all_trusted(ver.vid)
    path = cache.path(ver.vid)
    assert Path(path).read_bytes() == b"".join(data[s] for s in sorted(data))  # the file IS the version
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "files").st_mode & 0o777 == 0o700
    assert idx.present() == {ver.vid: {s: (content_hash(b), len(b)) for s, b in data.items()}}
    cache.close()
    idx.close()


def test_a_partly_written_version_is_sparse_and_not_complete(tmp_path: Path) -> None:
    """A file holds only what was written (the rest is a hole), and is not complete (no passthrough)."""
    idx = new_index(tmp_path)
    cache = FileCache(str(tmp_path), idx, "d", "src", min_free=0, preallocate=False)
    ver = make_version("m/big.bin", 16 * EXT)
    data = os.urandom(EXT)
    cache.write(ver, 8 * EXT, data, content_hash(data))
    assert os.stat(cache.path(ver.vid)).st_size == 16 * EXT
    assert os.stat(cache.path(ver.vid)).st_blocks * 512 <= 2 * EXT
    assert not cache.complete(ver.vid) and cache.present_bytes(ver.vid) == EXT
    assert read(cache, ver.vid, 0, 0, 10) == -1 and read(cache, ver.vid, 8 * EXT, 0, EXT) == data
    cache.close()
    idx.close()


def test_trust_domains_never_share_content(tmp_path: Path) -> None:
    """Hashes are fast, not collision-resistant: content is found by hash only within one trust domain."""
    idx = new_index(tmp_path)
    data = b"same bytes" * 1000
    h = content_hash(data)
    a = FileCache(str(tmp_path), idx, "bucket-a", "s3:a", min_free=0)
    va = make_version("m/x.bin", len(data), identity="s3:a")
    assert a.write(va, 0, data, h)
    assert a.locate(h, len(data)) == (va.vid, 0)
    assert a.locate(h, len(data), besides=(va.vid, 0)) is None
    a.close()
    b = FileCache(str(tmp_path), idx, "bucket-b", "s3:b", min_free=0)  # the next daemon, another bucket
    assert b.present(va.vid, 0)  # the bytes are there ...
    assert b.locate(h, len(data)) is None  # ... but not for this domain
    vb = make_version("m/x.bin", len(data), identity="s3:b")
    assert b.write(vb, 0, data, h)
    assert b.locate(h, len(data)) == (vb.vid, 0)
    assert b.bytes_stored == 2 * len(data)  # stored once per domain
    b.close()
    a = FileCache(str(tmp_path), idx, "bucket-a", "s3:a", min_free=0)
    assert a.locate(h, len(data)) == (va.vid, 0)
    assert a.locate(h, len(data), besides=(va.vid, 0)) is None
    a.close()
    idx.close()


DAMAGES = ["flip", "zeroed", "shorter", "longer"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_extent_is_found_by_a_new_process_dropped_and_written_again(tmp_path: Path, damage: str) -> None:
    """Files are not fsync'ed and root may write them: a new daemon trusts nothing it did not hash, drops
    (punches out, unrecords, counts) a damaged extent, and never serves its bytes; it can be stored again.
    flip: one bit of the middle extent; zeroed: the file cut into its last extent and grown back (the cut
    reads as zeros); shorter/longer: the file is not the version's size (dropped whole at start)."""
    idx = new_index(tmp_path)
    ver = make_version("m/w.bin", 3 * EXT - 100)
    first = FileCache(str(tmp_path), idx, "d", "src", min_free=0)
    data = fill(first, ver)
    first.close()
    path = str(tmp_path / "files" / ver.vid.hex())
    size = ver.info.size
    victim = EXT if damage == "flip" else 2 * EXT
    if damage == "flip":
        fd = os.open(path, os.O_RDWR)
        os.pwrite(fd, bytes([data[EXT][12345] ^ 0x01]), EXT + 12345)
        os.close(fd)
    elif damage == "zeroed":
        os.truncate(path, 2 * EXT + 10)
        os.truncate(path, size)
    elif damage == "shorter":
        os.truncate(path, 2 * EXT + 10)
    else:
        with open(path, "ab") as f:
            f.write(b"\0")

    stats = Stats()
    fresh = FileCache(str(tmp_path), idx, "d", "src", min_free=0, stats=stats)  # a new process
    for start, length in ver.extents():
        got = fresh.read_verified(ver.vid, start, length)
        if start == victim or damage in ("shorter", "longer"):
            assert got is None, start
        else:
            assert got is not None and bytes(got) == data[start]
    assert not fresh.present(ver.vid, victim) and not fresh.trusted(ver.vid, victim)
    assert read(fresh, ver.vid, victim, 0, 100) == -1
    assert (ver.vid, victim) not in [(v, s) for v, ext in idx.present().items() for s in ext]
    assert fresh.bytes_stored == sum(len(b) for s, b in data.items() if fresh.present(ver.vid, s))
    if damage in ("flip", "zeroed"):  # the other extents are fine, and trusted now
        assert fresh.bytes_stored == size - len(data[victim])
        assert read(fresh, ver.vid, 0, 0, 100) == data[0][:100]
    assert not fresh.verify(ver.vid, victim, len(data[victim]))  # dropped once, not twice

    assert fresh.write(ver, victim, data[victim], content_hash(data[victim]))  # refetched, stored again
    assert read(fresh, ver.vid, victim, 0, len(data[victim])) == data[victim]
    assert fresh.present(ver.vid, victim) and fresh.trusted(ver.vid, victim)
    assert os.stat(path).st_size == size
    fresh.close()
    again = FileCache(str(tmp_path), idx, "d", "src", min_free=0)  # and it survives the next restart
    got = again.read_verified(ver.vid, victim, len(data[victim]))
    assert got is not None and bytes(got) == data[victim]
    again.close()
    # Damage is counted (stats.corrupt_extents) whichever way it was found: a file of the wrong size when
    # the cache starts (its extents), a damaged extent when a check meets it (one).
    assert stats.corrupt_extents >= 1, f"{damage}: the damaged cache file was dropped without being counted"
    if damage in ("flip", "zeroed"):
        assert stats.corrupt_extents == 1
    idx.close()


def test_scan_at_start_reconciles_files_and_index(tmp_path: Path) -> None:
    """At start the files on disk and the present table must agree: a file no present entry names (a crash
    after the write, before the commit; a stray) is deleted, and entries whose file is gone are dropped."""
    idx = new_index(tmp_path)
    cache = FileCache(str(tmp_path), idx, "d", "src", min_free=0)
    kept, gone, unnamed = (make_version(f"m/{n}.bin", 2 * EXT) for n in ("kept", "gone", "unnamed"))
    data = fill(cache, kept)
    fill(cache, gone)
    fill(cache, unnamed)
    cache.close()
    files = tmp_path / "files"
    os.unlink(files / gone.vid.hex())
    idx.unmark([(unnamed.vid, s) for s, _ in unnamed.extents()])  # as if the commit never happened
    strays = [files / ("ab" * 16), files / "not-hex", files / f"probe.tmp.{os.getpid()}.0"]
    for p in strays:
        p.write_bytes(b"x" * 100)

    fresh = FileCache(str(tmp_path), idx, "d", "src", min_free=0)
    assert sorted(os.listdir(files)) == [kept.vid.hex()]
    assert fresh.files == 1 and fresh.bytes_stored == 2 * EXT
    assert set(idx.present()) == {kept.vid}
    assert not fresh.present(gone.vid, 0) and not fresh.present(unnamed.vid, 0)
    assert idx.extents(gone.vid)  # what the content is stays known
    assert fresh.complete(kept.vid) and not fresh.all_trusted(kept.vid)
    got = fresh.read_verified(kept.vid, EXT, EXT)
    assert got is not None and bytes(got) == data[EXT]
    again = os.urandom(EXT)
    assert fresh.write(gone, 0, again, content_hash(again)) is True  # not believed present: stored anew
    assert read(fresh, gone.vid, 0, 0, EXT) == again
    fresh.close()
    idx.close()


def test_a_new_process_trusts_nothing_until_it_verified(tmp_path: Path) -> None:
    """Bytes written by another process are served only once this one hashed them; those it wrote itself
    are served at once."""
    idx = new_index(tmp_path)
    ver = make_version("m/t.bin", 2 * EXT)
    first = FileCache(str(tmp_path), idx, "d", "src", min_free=0)
    data = fill(first, ver)
    assert first.trusted(ver.vid, 0) and first.all_trusted(ver.vid) and first.untrusted(ver.vid) == []
    assert first.reads_verified == 0
    first.close()

    fresh = FileCache(str(tmp_path), idx, "d", "src", min_free=0)
    assert fresh.present(ver.vid, 0) and fresh.complete(ver.vid)
    assert not fresh.trusted(ver.vid, 0) and not fresh.all_trusted(ver.vid)
    assert fresh.untrusted(ver.vid) == [(0, EXT), (EXT, EXT)]
    assert read(fresh, ver.vid, 0, 0, 10) == -1 and read(fresh, ver.vid, 0, 0, 10, nowait=True) == -1
    assert fresh.verify(ver.vid, 0, EXT) and fresh.reads_verified == 1
    assert fresh.trusted(ver.vid, 0) and read(fresh, ver.vid, 0, 0, 10) == data[0][:10]
    assert not fresh.all_trusted(ver.vid) and fresh.untrusted(ver.vid) == [(EXT, EXT)]
    assert read(fresh, ver.vid, EXT, 0, 10) == -1
    assert fresh.verify(ver.vid, EXT, EXT)
    assert fresh.all_trusted(ver.vid) and fresh.untrusted(ver.vid) == []
    fresh.close()
    idx.close()


def test_with_trust_restarts_a_daemon_of_the_same_boot_trusts_a_sealed_file_while_it_is_unchanged(
        tmp_path: Path) -> None:
    """On storage that checks nothing (ext4 here), `cache.trust_restarts`: a complete, checked file is sealed
    with the boot's id, and the next process trusts it whole without reading anything back. A write through
    the filesystem (ctime moves), a seal of another boot, or the setting off: it is read back as before."""
    idx = new_index(tmp_path)
    ver, other = make_version("m/t.bin", 2 * EXT), make_version("m/u.bin", EXT)
    first = FileCache(str(tmp_path), idx, "d", "src", min_free=0, trust_restarts=True)
    assert first.storage.kind == "unverified" and first.seals
    fill(first, ver)
    fill(first, other)
    assert sorted(first.unsealed()) == sorted([ver.vid, other.vid])
    assert first.seal(ver.vid) and first.unsealed() == [other.vid]
    first.close()  # seals the other at shutdown
    seal = idx.version(ver.vid)["seal"]  # type: ignore[index]
    assert seal["boot"] == integrity.boot_id() and seal["ino"] == os.stat(first.path(ver.vid)).st_ino

    fresh = FileCache(str(tmp_path), idx, "d", "src", min_free=0, trust_restarts=True)
    assert fresh.all_trusted(ver.vid) and fresh.all_trusted(other.vid) and fresh.files_trusted_sealed == 2
    assert fresh.reads_verified == 0 and fresh.unsealed() == []
    fresh.close()

    off = FileCache(str(tmp_path), idx, "d", "src", min_free=0)  # the setting off: nothing trusted unread
    assert not off.seals and not off.all_trusted(ver.vid) and off.files_trusted_sealed == 0
    off.close()

    idx.seal(other.vid, {**idx.version(other.vid)["seal"], "boot": "another boot"})  # type: ignore[dict-item]
    with open(first.path(ver.vid), "r+b") as f:  # the same byte written back: only the timestamps move
        f.seek(5)
        byte = f.read(1)
        f.seek(5)
        f.write(byte)
    again = FileCache(str(tmp_path), idx, "d", "src", min_free=0, trust_restarts=True)
    assert again.files_trusted_sealed == 0
    assert not again.all_trusted(ver.vid) and not again.all_trusted(other.vid)
    assert again.untrusted(ver.vid) == [(0, EXT), (EXT, EXT)]
    again.close()
    idx.close()


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def cached(path: str, offset: int, size: int) -> bool:
    """Whether any page of [offset, offset+size) of a file is in the page cache (mincore: asks without
    reading, so it starts no readahead, as a read with RWF_NOWAIT that misses does)."""
    lo = offset - offset % mmap.PAGESIZE
    pages = -(-(offset + size - lo) // mmap.PAGESIZE)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), pages * mmap.PAGESIZE, access=mmap.ACCESS_COPY,
                                          offset=lo) as m:
        vec = (ctypes.c_ubyte * pages)()
        buf = (ctypes.c_char * len(m)).from_buffer(m)
        try:
            if _libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(len(m)), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del buf
        return any(v & 1 for v in vec)


def drop_pages(path: str, offset: int, size: int) -> None:
    """Drop a file's pages from the page cache until [offset, offset+size) is really out: DONTNEED is
    advisory (a page still in a per-CPU batch stays), so it is asked again, a bounded number of times."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        for _ in range(100):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if not cached(path, offset, size):
                return
        pytest.fail("the kernel kept the file's pages cached")
    finally:
        os.close(fd)


def test_pread_nowait_reads_only_what_the_page_cache_holds(tmp_path: Path) -> None:
    """The trio thread never waits for the disk: `nowait` returns the bytes when their pages are cached and
    0 when they are not (then a worker thread reads them)."""
    idx = new_index(tmp_path)
    cache = FileCache(str(tmp_path), idx, "d", "src", min_free=0)
    ver = make_version("m/p.bin", 4 * EXT)
    data = fill(cache, ver)
    assert read(cache, ver.vid, EXT, 100, 5000, nowait=True) == data[EXT][100:5100]  # just written: cached
    assert cached(cache.path(ver.vid), EXT + 100, 5000)
    drop_pages(cache.path(ver.vid), EXT + 100, 5000)
    assert read(cache, ver.vid, EXT, 100, 5000, nowait=True) == 0  # neither a wait nor wrong bytes
    assert read(cache, ver.vid, EXT, 100, 5000) == data[EXT][100:5100]  # from disk
    assert read(cache, ver.vid, EXT, 100, 5000, nowait=True) == data[EXT][100:5100]  # cached again
    cache.close()
    idx.close()


def test_open_fds_stay_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache of many versions must not run out of descriptors: idle files are closed past MAX_FDS, and
    reopened when read again."""
    monkeypatch.setattr(cache_base, "MAX_FDS", 4)
    idx = new_index(tmp_path)
    cache = FileCache(str(tmp_path), idx, "d", "src", min_free=0)
    files = os.path.realpath(tmp_path / "files")

    def open_fds() -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}").startswith(files + "/")
            except OSError:
                pass
        return n

    versions = [make_version(f"m/{i}.bin", 5000 + i) for i in range(12)]
    data = {}
    for ver in versions:
        data[ver.vid] = fill(cache, ver)[0]
        assert read(cache, ver.vid, 0, 0, 100) == data[ver.vid][:100]
        assert open_fds() <= 4
    for ver in versions:  # every one reopened and read right
        assert read(cache, ver.vid, 0, 0, len(data[ver.vid])) == data[ver.vid]
        assert open_fds() <= 4
    cache.close()
    assert open_fds() == 0
    idx.close()


def test_held_copies_bound_bytes_and_count(tmp_path: Path) -> None:
    """Extents the cache had no room for are held in memory, bounded by count and by bytes; a view handed
    out stays valid after its copy left the pool; no copy holds a file descriptor."""
    extents = [os.urandom(1000 + i) for i in range(50)]
    before = len(os.listdir("/proc/self/fd"))
    maps = MappedBlocks(budget=1 << 20, max_maps=8)
    kept = None
    for i, b in enumerate(extents):
        view = maps.put(content_hash(b), private_copy(b))
        assert bytes(view[10:30]) == b[10:30]
        if i == 0:
            kept = view  # a view handed out stays valid after its copy left the pool
        del view
        assert len(maps) <= 8 and len(os.listdir("/proc/self/fd")) == before
    assert kept is not None and bytes(kept) == extents[0]
    assert maps.view(content_hash(extents[0]), 0, 10) is None  # dropped from the pool long ago
    assert bytes(maps.view(content_hash(extents[-1]), 5, 10) or b"") == extents[-1][5:15]
    small = MappedBlocks(budget=3 * 1049)
    for b in extents[:10]:
        small.put(content_hash(b), private_copy(b))
        assert small.bytes <= 3 * 1049 and len(small) <= 3
    too_big = os.urandom(4 * 1049)
    assert bytes(small.put(content_hash(too_big), private_copy(too_big))) == too_big
    assert content_hash(too_big) not in small
    del kept
    maps.clear()
    small.clear()


def test_the_files_to_check_at_start_are_the_last_loaded_in_the_order_a_loader_opens_them(tmp_path: Path) -> None:
    """A new daemon checks from its start the complete files of its source it does not trust yet, loaded most
    recently first, directory by directory, a directory's files in name order (its shards as a loader opens
    them), up to its budget; each extent is checked once however many ask at the same time."""
    idx = new_index(tmp_path)
    other = make_version("m/c/y.bin", EXT, identity="other")
    elsewhere = FileCache(str(tmp_path), idx, "d", "other", min_free=0)  # a daemon of another source, before
    fill(elsewhere, other)
    elsewhere.close()
    cache = FileCache(str(tmp_path), idx, "d", "src", min_free=0)
    a2, a1 = make_version("m/a/model-00002.safetensors", 2 * EXT), make_version("m/a/model-00001.safetensors", EXT)
    b, partial = make_version("m/b/x.safetensors", EXT), make_version("m/b/partial.bin", 2 * EXT)
    for v in (a2, a1, b):
        fill(cache, v)
    half = os.urandom(EXT)
    assert cache.write(partial, 0, half, content_hash(half))  # not complete: never checked at start
    for v in (a1, a2, b):  # b's directory was loaded last
        idx.note_load(v.vid, "src", "d", v.info)
    assert cache.to_check_at_start(1 << 40) == []  # this process wrote them: trusted already
    cache.close()

    fresh = FileCache(str(tmp_path), idx, "d", "src", min_free=0)  # the next daemon
    assert fresh.to_check_at_start(1 << 40) == [(b.vid, b.info.key), (a1.vid, a1.info.key), (a2.vid, a2.info.key)]
    assert fresh.to_check_at_start(2 * EXT + EXT // 2) == [(b.vid, b.info.key), (a1.vid, a1.info.key)]
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(fresh.verify(b.vid, 0, EXT))) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == [True] * 4 and fresh.reads_verified == 1  # read back once, the others waited for it
    assert fresh.to_check_at_start(1 << 40) == [(a1.vid, a1.info.key), (a2.vid, a2.info.key)]
    fresh.close()
    idx.close()


def test_a_check_streams_extents_larger_than_its_buffer_and_finds_a_byte_changed_in_any_chunk(
        tmp_path: Path) -> None:
    """Extents of 2.5 chunks at offsets no page edge matches, the last one cut short by the file's end: the
    check (a new process's read-back, and the scrub's O_DIRECT read) hashes them CHECK_CHUNK at a time
    through one buffer of that size per thread, and a byte changed in the first, a middle or the last chunk
    of an extent is found."""
    chunk = cache_mod.CHECK_CHUNK
    bounds = [0, 5 * chunk // 2 + 100, 5 * chunk + 3, 6 * chunk + 77]
    data = bytearray(os.urandom(bounds[-1]))
    extents = [(a, b - a, content_hash(data[a:b])) for a, b in itertools.pairwise(bounds)]
    ver = FileVersion.of("src", ObjectInfo("m/big.safetensors", len(data), '"e"', 0.0), 4 * chunk, extents)
    index = new_index(tmp_path)
    root = str(tmp_path / "c")
    cache = FileCache(root, index, "src", "src", min_free=0)
    for start, length, digest in extents:
        assert cache.write(ver, start, bytes(data[start:start + length]), digest)
    cache.close()
    hits: list[list[bool | None]] = []
    for victim in (bounds[1] + 5, bounds[1] + chunk + 7, bounds[2] - 1):  # extent 1: first, middle, last chunk
        with open(os.path.join(root, "files", ver.vid.hex()), "r+b") as f:
            f.seek(victim)
            f.write(bytes([data[victim] ^ 0x10]))
        cache = FileCache(root, index, "src", "src", min_free=0)
        hits.append([cache.scrub_read(ver.vid, s, n) for s, n, _ in extents])
        got = [cache.verify(ver.vid, s, n) for s, n, _ in extents]
        assert got == [True, False, True], (victim, got)
        assert len(cache._local.buf) == chunk  # one chunk's buffer, not an extent's
        assert cache.write(ver, bounds[1], bytes(data[bounds[1]:bounds[2]]), extents[1][2])  # fetched again
        cache.close()
    assert hits == [[True, False, True]] * 3
    index.close()


# -- the scrub's reads and in-place heal -----------------------------------------------------------------------

def test_the_scrub_finds_a_damaged_extent_and_a_page_aligned_rewrite_heals_it(tmp_path: Path) -> None:
    """Extents at offsets no page edge matches (a manifest's tensor boundaries): the bytes to write anew for a
    damaged one cover whole pages and whole extents (its neighbours on shared pages too), so the write reads
    nothing from disk, and every byte written belongs to an extent whose hash is checked."""
    bounds = [0, 8192, 13000, 13500, 20480, 40000, 70001]
    data = os.urandom(bounds[-1])
    extents = [(a, b - a, content_hash(data[a:b])) for a, b in itertools.pairwise(bounds)]
    ver = FileVersion.of("src", ObjectInfo("m/x.safetensors", len(data), '"e"', 0.0), EXT, extents)
    index = new_index(tmp_path)
    cache = FileCache(str(tmp_path / "c"), index, "src", "src")
    for start, length, digest in extents:
        assert cache.write(ver, start, data[start:start + length], digest)
    assert all(cache.scrub_read(ver.vid, s, n) for s, n, _ in extents)
    with open(cache.path(ver.vid), "r+b") as f:  # a byte of the extent [13000, 13500) changed on disk
        f.seek(13100)
        f.write(bytes([data[13100] ^ 1]))
    assert [cache.scrub_read(ver.vid, s, n) for s, n, _ in extents] == [True, True, False, True, True, True]
    span = cache.heal_range(ver.vid, [13000])
    assert span is not None
    lo, hi, covered = span
    # pages [12288, 16384) hold it; they reach into [8192, 13000) and [13500, 20480), whose edges are pages'
    assert (lo, hi) == (8192, 20480) and [s for s, _, _ in covered] == [8192, 13000, 13500]
    assert cache.rewrite(ver.vid, lo, memoryview(data[lo:hi]), [s for s, _, _ in covered])
    assert all(cache.scrub_read(ver.vid, s, n) for s, n, _ in extents)
    with open(cache.path(ver.vid), "rb") as f:
        assert f.read() == data
    cache.close()
    index.close()


def test_the_scrub_reads_in_the_idle_io_class_and_gives_the_thread_back_as_it_was(tmp_path: Path) -> None:
    """Each scrub read runs with its worker thread in the idle I/O class (a loader's reads of the same disk go
    first), and the thread's priority is put back after it: trio gives the same thread other jobs later."""
    data = os.urandom(3 * EXT + 100)
    extents = [(s, min(EXT, len(data) - s), content_hash(data[s:s + EXT])) for s in range(0, len(data), EXT)]
    ver = FileVersion.of("src", ObjectInfo("m/x.safetensors", len(data), '"e"', 0.0), EXT, extents)
    index = new_index(tmp_path)
    seen: list[tuple[int, int]] = []  # (the priority during a read, the thread's id)

    class Watched(FileCache):
        def scrub_read(self, vid: bytes, start: int, length: int) -> bool | None:
            seen.append((io_priority(), threading.get_ident()))
            return super().scrub_read(vid, start, length)

    cache = Watched(str(tmp_path / "c"), index, "src", "src")
    for start, length, digest in extents:
        assert cache.write(ver, start, data[start:start + length], digest)
    stats = Stats()
    (tmp_path / "src").mkdir()  # the store is not asked: nothing to heal
    scrub = Scrub(cache, index, LocalStore(str(tmp_path / "src")), stats, 1 << 40, 0.0, lambda: 0)
    threads: set[int] = set()

    async def main() -> None:
        with trio.move_on_after(60):  # a bound that only detects a hang
            async with trio.open_nursery() as nursery:
                nursery.start_soon(scrub.run)
                while stats.scrub_bytes < len(data):
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        # the threads that did the reads, asked again from trio's cache: their priority is what it was
        for _ in range(4):
            threads.add(await trio.to_thread.run_sync(lambda: (io_priority(), threading.get_ident())))

    trio.run(main)
    assert stats.scrub_bytes >= len(data) and stats.scrub_damaged == 0, stats  # a pass or more
    assert seen and all(prio >> IOPRIO_CLASS_SHIFT == IOPRIO_CLASS_IDLE for prio, _ in seen), seen
    assert {tid for _, tid in seen} & {tid for _, tid in threads}  # the same thread, asked again
    assert all(prio >> IOPRIO_CLASS_SHIFT != IOPRIO_CLASS_IDLE for prio, _ in threads), threads
    cache.close()
    index.close()
