"""Cache space: quota, LRU eviction by punching holes, reads and passthrough holds, prefetch protection, a full
filesystem; offline listings.

Pure logic over real files (and a real, small tmpfs for ENOSPC): no mount needed.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from modelfs.cache import CacheFull, FileCache
from modelfs.cache import space as cache_space
from modelfs.catalog.index import ChunkIndex
from modelfs.catalog.version import FileVersion
from modelfs.digest import content_hash
from modelfs.remote import Listing, ObjectInfo
from modelfs.stats import Stats

EXT = 64 * 1024  # a multiple of the page size: punching an extent frees exactly its pages


def make_version(key: str, size: int, extent_size: int = EXT, identity: str = "src") -> FileVersion:
    return FileVersion.of(identity, ObjectInfo(key, size, f'"{key}-etag"', 0.0), extent_size)


def new_index(tmp_path: Path) -> ChunkIndex:
    return ChunkIndex(str(tmp_path / "index"), 1 << 24)


def put(cache: FileCache, ver: FileVersion, start: int, length: int) -> bytes:
    """Write `length` random bytes as `ver`'s extent at `start`; returns them."""
    data = os.urandom(length)
    assert cache.write(ver, start, data, content_hash(data))
    return data


def read(cache: FileCache, vid: bytes, start: int, size: int) -> bytes | int:
    buf = bytearray(size)
    n = cache.pread(vid, start, 0, memoryview(buf))
    return bytes(buf[:n]) if n >= 0 else n


def on_disk(root: Path) -> int:
    """Bytes the cache files really take (they are sparse: their sizes say nothing)."""
    files = root / "files"
    return sum(p.stat().st_blocks * 512 for p in files.iterdir() if p.is_file()) if files.exists() else 0


def close_to(allocated: int, stored: int) -> bool:
    """Allocation is by pages; a filesystem may take a page or two of metadata per file."""
    return stored <= allocated <= stored + 64 * 1024


def test_quota_evicts_least_recently_used_extents_first(tmp_path: Path) -> None:
    """Over the quota, the extents not used for longest are punched out of their files, files still filling
    (a read makes an extent most recent); the room they took on disk is really given back."""
    stats = Stats()
    idx = new_index(tmp_path)
    cache = FileCache(str(tmp_path), idx, "d", "src", max_size=4 * EXT, min_free=0, stats=stats)
    # One more extent each than is ever written: the files stay incomplete (a complete file goes whole).
    one, two = make_version("m/one.bin", 5 * EXT), make_version("m/two.bin", 3 * EXT)
    keys = [(one, 0), (one, EXT), (two, 0), (one, 2 * EXT), (two, EXT), (one, 3 * EXT)]
    data = [put(cache, v, s, EXT) for v, s in keys[:4]]
    assert read(cache, one.vid, 0, 10) == data[0][:10]  # (one, 0) is now the most recent
    data += [put(cache, v, s, EXT) for v, s in keys[4:]]
    kept = {i for i, (v, s) in enumerate(keys) if cache.present(v.vid, s)}
    assert kept == {0, 3, 4, 5}
    assert (stats.evictions, stats.evicted_bytes) == (2, 2 * EXT)
    assert cache.bytes_stored == 4 * EXT
    assert close_to(on_disk(tmp_path), cache.bytes_stored), (on_disk(tmp_path), cache.bytes_stored)
    for i in kept:
        v, s = keys[i]
        assert read(cache, v.vid, s, EXT) == data[i]
    assert read(cache, one.vid, EXT, 10) == -1
    present = idx.present()
    assert sorted(present[one.vid]) == [0, 2 * EXT, 3 * EXT] and sorted(present[two.vid]) == [EXT]
    cache.close()
    idx.close()


def test_a_file_left_with_no_extent_is_deleted(tmp_path: Path) -> None:
    """Eviction of a file's last extent removes the file itself (no empty sparse files pile up)."""
    idx = new_index(tmp_path)
    cache = FileCache(str(tmp_path), idx, "d", "src", max_size=2 * EXT, min_free=0)
    old, new = make_version("m/old.bin", EXT), make_version("m/new.bin", 2 * EXT)
    put(cache, old, 0, EXT)
    put(cache, new, 0, EXT)
    put(cache, new, EXT, EXT)
    assert os.listdir(tmp_path / "files") == [new.vid.hex()] and cache.files == 1
    cache.close()
    idx.close()


def test_room_an_eviction_frees_is_not_given_out_before_the_punch_is_done(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that evicts a large extent to store a small one frees more than it needs; while that extent
    is still being punched out, a second writer must not count the surplus as free (the disk would hold
    more than the quota): bytes on disk never exceed cache.max_size."""
    idx = new_index(tmp_path)
    cache = FileCache(str(tmp_path), idx, "d", "src", max_size=3 * EXT, min_free=0)
    held = make_version("m/held.bin", 4 * EXT, extent_size=2 * EXT)  # (0, 2 EXT), (2 EXT, 2 EXT): never complete
    put(cache, held, 0, 2 * EXT)  # oldest: the one the first writer evicts
    put(cache, held, 2 * EXT, EXT)  # keeps the file alive: the big extent is punched, not unlinked
    assert close_to(on_disk(tmp_path), 3 * EXT)
    punching, go_on = threading.Event(), threading.Event()
    real_punch = cache_space.punch

    def slow_punch(fd: int, offset: int, length: int) -> None:
        if length == 2 * EXT:  # the big extent's punch is held, as on a busy disk
            punching.set()
            assert go_on.wait(30)
        real_punch(fd, offset, length)

    monkeypatch.setattr(cache_space, "punch", slow_punch)
    a, b = make_version("m/a.bin", EXT), make_version("m/b.bin", EXT)
    a_data, b_data = os.urandom(EXT), os.urandom(EXT)
    results: list[object] = []

    def first_writer() -> None:
        try:
            results.append(cache.write(a, 0, a_data, content_hash(a_data)))
        except BaseException as e:
            results.append(e)

    first = threading.Thread(target=first_writer)
    first.start()
    try:
        assert punching.wait(30)
        with pytest.raises(CacheFull):  # the only room is the big extent's, not given back yet
            cache.write(b, 0, b_data, content_hash(b_data))
        assert on_disk(tmp_path) <= 3 * EXT
        assert not cache.present(b.vid, 0) and not (tmp_path / "files" / b.vid.hex()).exists()
    finally:
        go_on.set()
        first.join(30)
    assert results == [True]
    assert on_disk(tmp_path) <= 3 * EXT and cache.bytes_stored == 2 * EXT
    assert close_to(on_disk(tmp_path), cache.bytes_stored)
    assert read(cache, a.vid, 0, EXT) == a_data
    assert cache.write(b, 0, b_data, content_hash(b_data))  # the room is free now
    assert on_disk(tmp_path) <= 3 * EXT
    cache.close()
    idx.close()


def test_an_extent_being_read_is_never_evicted(tmp_path: Path) -> None:
    """A punch under a read in progress would serve zeros: the oldest extent is skipped while it is read,
    and with every extent read no room is made (CacheFull, nothing left behind)."""
    idx = new_index(tmp_path)
    cache = FileCache(str(tmp_path), idx, "d", "src", max_size=2 * EXT, min_free=0)
    va, vb, vc = (make_version(f"m/{n}.bin", EXT) for n in "abc")
    a, b = put(cache, va, 0, EXT), put(cache, vb, 0, EXT)
    with cache._reading(va.vid, 0, trusted=True) as got:
        assert got is not None
        put(cache, vc, 0, EXT)  # a is the oldest but being read: b goes
        assert cache.present(va.vid, 0) and not cache.present(vb.vid, 0)
        assert os.pread(got[0], EXT, 0) == a
    with cache._reading(va.vid, 0, trusted=True), cache._reading(vc.vid, 0, trusted=True):
        with pytest.raises(CacheFull):
            cache.write(vb, 0, b, content_hash(b))  # everything being read: no room, nothing written
        assert cache.present(va.vid, 0) and cache.present(vc.vid, 0) and not cache.present(vb.vid, 0)
    assert cache.bytes_stored == 2 * EXT and not (tmp_path / "files" / vb.vid.hex()).exists()
    assert read(cache, va.vid, 0, EXT) == a  # a is the most recent now
    assert cache.write(vb, 0, b, content_hash(b))  # reads over: c (now the oldest) goes
    assert not cache.present(vc.vid, 0) and cache.present(va.vid, 0)
    cache.close()
    idx.close()


def test_a_file_held_by_passthrough_is_never_evicted(tmp_path: Path) -> None:
    """The kernel reads a passthrough file at any time, unseen by the daemon: a held file loses no byte,
    however old, until the hold is released; then, complete, it is evicted whole."""
    idx = new_index(tmp_path)
    cache = FileCache(str(tmp_path), idx, "d", "src", max_size=3 * EXT, min_free=0)
    held, other, new = make_version("m/held.bin", 2 * EXT), make_version("m/o.bin", EXT), make_version("m/n.bin", EXT)
    h0, h1 = put(cache, held, 0, EXT), put(cache, held, EXT, EXT)
    o = put(cache, other, 0, EXT)
    assert cache.all_trusted(held.vid)
    cache.hold(held.vid, 1)
    cache.hold(held.vid, 1)  # two passthrough opens
    n = put(cache, new, 0, EXT)  # held's extents are the oldest: other goes
    assert not cache.present(other.vid, 0) and cache.present(held.vid, 0)
    with cache._reading(new.vid, 0, trusted=True), pytest.raises(CacheFull):
        cache.write(other, 0, o, content_hash(o))  # a held file and an extent being read: no room
    cache.hold(held.vid, -1)  # one open left: still held
    with cache._reading(new.vid, 0, trusted=True), pytest.raises(CacheFull):
        cache.write(other, 0, o, content_hash(o))
    assert (tmp_path / "files" / held.vid.hex()).read_bytes() == h0 + h1  # every byte still on disk
    assert cache.all_trusted(held.vid)
    cache.hold(held.vid, -1)
    assert cache.write(other, 0, o, content_hash(o))  # released: it may go, whole (it is complete)
    assert not cache.present(held.vid, 0) and not cache.present(held.vid, EXT) and cache.present(new.vid, 0)
    assert not (tmp_path / "files" / held.vid.hex()).exists()
    assert read(cache, other.vid, 0, EXT) == o and read(cache, new.vid, 0, EXT) == n
    cache.close()
    idx.close()


def test_prefetch_protection_keeps_extents_of_the_current_load(tmp_path: Path) -> None:
    """Prefetch must not evict what the load it serves has just fetched or read: only extents last used
    before `protect_since` count as room for it."""
    idx = new_index(tmp_path)
    cache = FileCache(str(tmp_path), idx, "d", "src", max_size=3 * EXT, min_free=0)
    old, stale, cur1, new = (make_version(f"m/{n}.bin", EXT) for n in ("old", "stale", "c1", "new"))
    put(cache, old, 0, EXT)
    put(cache, stale, 0, EXT)
    since = time.monotonic()
    assert read(cache, old.vid, 0, 10) != -1  # read by this load: protected from now on
    put(cache, cur1, 0, EXT)
    assert cache.headroom(protect_since=since) == EXT  # only `stale` may go
    assert cache.headroom() == 3 * EXT
    assert cache.make_room(EXT, protect_since=since)  # evicts `stale`
    assert not cache.present(stale.vid, 0) and cache.present(old.vid, 0) and cache.present(cur1.vid, 0)
    put(cache, new, 0, EXT)
    assert cache.headroom(protect_since=since) == 0
    assert not cache.make_room(EXT, protect_since=since)  # all three are of this load: nothing evicted
    assert cache.bytes_stored == 3 * EXT
    assert cache.make_room(EXT)  # a demand read may evict anything unpinned: the least recent goes
    assert not cache.present(old.vid, 0) and cache.present(cur1.vid, 0) and cache.present(new.vid, 0)
    assert cache.bytes_stored == 2 * EXT
    cache.close()
    idx.close()


def test_pinned_content_is_never_evicted(tmp_path: Path) -> None:
    """`keep` (pinned models) protects content by hash, in any file."""
    idx = new_index(tmp_path)
    cache = FileCache(str(tmp_path), idx, "d", "src", max_size=2 * EXT, min_free=0)
    pinned, plain, new = (make_version(f"m/{n}.bin", EXT) for n in ("p", "q", "n"))
    p = put(cache, pinned, 0, EXT)
    put(cache, plain, 0, EXT)
    cache.keep({content_hash(p)})
    put(cache, new, 0, EXT)
    assert cache.present(pinned.vid, 0) and not cache.present(plain.vid, 0)
    assert cache.headroom() == EXT
    cache.close()
    idx.close()


def test_quota_and_order_survive_a_restart(tmp_path: Path) -> None:
    """A restarted cache counts what its files hold, of every trust domain, against the quota, and evicts
    in the order versions were last loaded (`note_load`). (Files still filling: extents are punched.)"""
    idx = new_index(tmp_path)
    cache = FileCache(str(tmp_path), idx, "d", "src", min_free=0)
    vers = [make_version(f"m/{i}.bin", 3 * EXT) for i in range(3)]
    for v in vers:
        put(cache, v, 0, EXT)
        put(cache, v, EXT, EXT)
    idx.note_load(vers[0].vid, "src", "d", vers[0].info)  # loaded again last: the most recent now
    cache.close()
    idx.close()
    idx = new_index(tmp_path)
    again = FileCache(str(tmp_path), idx, "other-domain", "other", max_size=6 * EXT, min_free=0)
    assert again.bytes_stored == 6 * EXT and again.files == 3
    put(again, make_version("m/x.bin", EXT, identity="other"), 0, EXT)  # evicts the oldest: vers[1]'s first
    assert [again.present(v.vid, s) for v in vers for s in (0, EXT)] == [True, True, False, True, True, True]
    big = make_version("m/y.bin", 2 * EXT, extent_size=2 * EXT, identity="other")
    put(again, big, 0, 2 * EXT)  # then vers[1]'s second (its file goes) and vers[2]'s first
    assert [again.present(v.vid, s) for v in vers for s in (0, EXT)] == [True, True, False, False, False, True]
    assert again.bytes_stored == 6 * EXT and not (tmp_path / "files" / vers[1].vid.hex()).exists()
    assert close_to(on_disk(tmp_path), again.bytes_stored)
    again.close()
    idx.close()


@pytest.fixture
def small_fs(tmpfs: Callable[..., Path]) -> Path:
    """A real 4 MiB tmpfs."""
    return tmpfs("small", "size=4m")


def check_consistent(cache: FileCache, root: Path, written: dict[tuple[bytes, int], bytes]) -> None:
    """Every extent the cache says is present reads back right; the disk holds no more than that."""
    for (vid, start), data in written.items():
        if cache.present(vid, start):
            assert read(cache, vid, start, len(data)) == data
    assert close_to(on_disk(root), cache.bytes_stored), (on_disk(root), cache.bytes_stored)


@pytest.mark.parametrize("preallocate", [True, False])
def test_a_full_filesystem_evicts_and_never_leaves_partial_extents(small_fs: Path, tmp_path: Path,
                                                                   preallocate: bool) -> None:
    """No quota and no free-space floor: the disk fills up for real. The write that finds it full may be
    refused (CacheFull: served from memory), but no extent is ever half present, nothing on disk goes
    uncounted, and the writes after it make room."""
    idx = new_index(tmp_path)
    cache = FileCache(str(small_fs), idx, "d", "src", min_free=0, preallocate=preallocate)
    size = 384 * 1024  # 4 MiB is no multiple of it: the write that finds the disk full writes part of it
    vers = [make_version(f"m/{i}.bin", 4 * size, extent_size=size) for i in range(4)]  # 6 MiB in 4 MiB
    written: dict[tuple[bytes, int], bytes] = {}
    refused = 0
    for k in range(4):
        for v in vers:
            data = os.urandom(size)
            written[(v.vid, k * size)] = data
            try:
                assert cache.write(v, k * size, data, content_hash(data))
            except CacheFull:
                refused += 1
                assert not cache.present(v.vid, k * size)
            check_consistent(cache, small_fs, written)
    st = os.statvfs(small_fs)
    assert cache.bytes_stored <= st.f_blocks * st.f_frsize
    newest = vers[-1]
    assert read(cache, newest.vid, 3 * size, size) == written[(newest.vid, 3 * size)]
    assert refused <= 1
    cache.close()
    fresh = FileCache(str(small_fs), idx, "d", "src", min_free=0)  # what the index says matches the files
    assert fresh.bytes_stored == cache.bytes_stored
    for (vid, start), data in written.items():
        if fresh.present(vid, start):
            got = fresh.read_verified(vid, start, size)
            assert got is not None and bytes(got) == data
    fresh.close()
    idx.close()


def test_the_write_that_finds_the_disk_full_evicts_and_is_stored(small_fs: Path, tmp_path: Path) -> None:
    """A full disk is handled by evicting, as a full quota is: the extent that ran into ENOSPC is stored
    after room was made (not only the ones after it)."""
    idx = new_index(tmp_path)
    cache = FileCache(str(small_fs), idx, "d", "src", min_free=0)
    size = 512 * 1024
    for i in range(16):  # 8 MiB into 4 MiB
        v = make_version(f"m/{i}.bin", size, extent_size=size)
        data = os.urandom(size)
        try:
            cache.write(v, 0, data, content_hash(data))
        except CacheFull:
            pytest.fail(f"extent {i}: a full disk must be handled by evicting")
        assert read(cache, v.vid, 0, size) == data
    cache.close()
    idx.close()


@pytest.mark.parametrize("preallocate", [True, False])
@pytest.mark.parametrize("where", ["own file", "a file with another extent"])
def test_an_extent_larger_than_the_filesystem_raises_cache_full(small_fs: Path, tmp_path: Path,
                                                                preallocate: bool, where: str) -> None:
    """An extent that cannot fit is refused whole: nothing of it counts as present, and none of its bytes
    stay on disk (uncounted bytes would fill the disk behind the quota's back)."""
    idx = new_index(tmp_path)
    cache = FileCache(str(small_fs), idx, "d", "src", min_free=0, preallocate=preallocate)
    small = make_version("m/small.bin", 8 << 20, extent_size=EXT)
    s = put(cache, small, 0, EXT)
    big = make_version("m/big.bin", 6 << 20, extent_size=6 << 20) if where == "own file" else small
    data = os.urandom(6 << 20)
    with pytest.raises(CacheFull):
        cache.write(big, EXT, data, content_hash(data))
    assert not cache.present(big.vid, EXT)
    assert cache.bytes_stored == EXT and cache.present_bytes(small.vid) == EXT
    assert idx.present() == {small.vid: {0: (content_hash(s), EXT)}}
    assert os.listdir(small_fs / "files") == [small.vid.hex()]
    assert read(cache, small.vid, 0, EXT) == s
    assert close_to(on_disk(small_fs), cache.bytes_stored), (on_disk(small_fs), cache.bytes_stored)
    cache.close()
    idx.close()


def test_listings_round_trip_for_offline_mode(tmp_path: Path) -> None:
    """The last listing of each prefix is kept per source, as the store gave it, for offline mode."""
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


def test_a_write_waiting_on_a_punch_keeps_its_file_and_the_path_names_it(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The last extent of a file is dropped; while its punch is held, a write of the same extent waits and a
    write of another extent comes in. Neither may end up in a file the cache forgot (its LRU would name a file
    it no longer has: every later eviction failed) nor in a file no longer at the cache file's path (the
    kernel, handed the path for passthrough, would read another file than the one the daemon wrote)."""
    idx = new_index(tmp_path)
    cache = FileCache(str(tmp_path), idx, "d", "src", max_size=1 << 24, min_free=0)
    ver = make_version("m/w.bin", 3 * EXT)
    blocks = [os.urandom(EXT) for _ in range(3)]
    assert cache.write(ver, 0, blocks[0], content_hash(blocks[0]))
    held, go = threading.Event(), threading.Event()
    real_unmark = idx.unmark

    def slow_unmark(extents: object) -> None:  # the drop stops after marking the extent absent
        held.set()
        go.wait(10)
        real_unmark(extents)  # type: ignore[arg-type]

    monkeypatch.setattr(idx, "unmark", slow_unmark)
    dropper = threading.Thread(target=cache.drop, args=(ver.vid, 0, "damaged (test)"))
    dropper.start()
    assert held.wait(10)
    rewrite = threading.Thread(target=cache.write, args=(ver, 0, blocks[0], content_hash(blocks[0])))
    rewrite.start()
    time.sleep(0.2)  # the rewrite waits for the punch of its pages (it cannot finish before it)
    assert not cache.present(ver.vid, 0)
    monkeypatch.setattr(idx, "unmark", real_unmark)
    go.set()
    dropper.join(10)
    rewrite.join(10)
    assert cache.write(ver, EXT, blocks[1], content_hash(blocks[1]))
    assert cache.write(ver, 2 * EXT, blocks[2], content_hash(blocks[2]))
    assert cache.complete(ver.vid) and cache.all_trusted(ver.vid)
    assert cache.headroom() >= 0 and cache.make_room(1 << 20)  # every LRU entry names a file the cache has
    assert Path(cache.path(ver.vid)).read_bytes() == b"".join(blocks)  # what passthrough would hand the kernel
    f = cache._files[ver.vid]
    assert os.fstat(f.fd).st_ino == os.stat(cache.path(ver.vid)).st_ino and os.fstat(f.fd).st_nlink == 1


def test_punching_frees_the_pages_an_extent_leaves_alone_and_the_quota_counts_pages(tmp_path: Path) -> None:
    """Extents that do not start or end on a page: the quota counts the whole pages each touches, so the disk
    never holds more than `cache.max_size`; and once every extent sharing a page is gone, the page is freed
    (a punch frees out to page edges no other extent uses), so nothing is left allocated behind."""
    idx = new_index(tmp_path)
    size = 40 * 10_007
    cache = FileCache(str(tmp_path), idx, "d", "src", max_size=16 * 4096 * 4, min_free=0, preallocate=False)
    ver = make_version("m/odd.bin", size, extent_size=10_007)
    for k in range(40):
        n = min(10_007, size - k * 10_007)
        put(cache, ver, k * 10_007, n)
        allocated = os.stat(cache.path(ver.vid)).st_blocks * 512 if os.path.exists(cache.path(ver.vid)) else 0
        assert allocated <= cache.max_size, (k, allocated)
    cache.max_size = 1
    cache.make_room(0, partial=True)  # every extent punched out
    assert cache.bytes_stored == 0 and not os.path.exists(cache.path(ver.vid))
    ver2 = make_version("m/odd2.bin", size, extent_size=10_007)
    cache.max_size = 0
    for k in range(0, 40, 2):  # every other extent: the pages they share with absent neighbours
        put(cache, ver2, k * 10_007, 10_007)
    for k in range(0, 40, 4):
        cache.drop(ver2.vid, k * 10_007, "evicted (test)")
    left = os.stat(cache.path(ver2.vid)).st_blocks * 512
    from modelfs.cache.diskio import pages
    assert left <= sum(pages(k * 10_007, 10_007) for k in range(2, 40, 4)), left


def test_many_threads_writing_reading_dropping_and_evicting_never_see_wrong_bytes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Eight threads at once on a few versions with page-straddling extents and a quota of a dozen pages:
    writes, reads (page cache only, or not), checks, drops and evictions interleave every way. Every read
    that returns bytes returns the version's; every extent present at the end holds its bytes on disk; and no
    punch ever finds its file gone (a file deleted and made anew under a pending punch would have the punch
    land in the new file, on bytes just written there)."""
    caplog.set_level("WARNING", logger="modelfs.cache")
    idx = new_index(tmp_path)
    ext = 10_007
    rnd = random.Random(1)
    datas = [rnd.randbytes(ext * 8 + 123) for _ in range(6)]
    vers = [make_version(f"m/v{i}.bin", len(d), extent_size=ext) for i, d in enumerate(datas)]
    cache = FileCache(str(tmp_path), idx, "d", "src", max_size=48 * 4096, min_free=0)
    wrong: list[tuple[int, int]] = []

    def extents(i: int) -> list[tuple[int, int]]:
        return [(s, min(ext, len(datas[i]) - s)) for s in range(0, len(datas[i]), ext)]

    def work(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(3000):
            i = r.randrange(len(vers))
            s, n = r.choice(extents(i))
            want = datas[i][s:s + n]
            op = r.random()
            try:
                if op < 0.45:
                    cache.write(vers[i], s, want, content_hash(want))
                elif op < 0.85:
                    off = r.randrange(n)
                    buf = memoryview(bytearray(r.randrange(1, n - off + 1)))
                    if cache.pread(vers[i].vid, s, off, buf, nowait=r.random() < 0.5) == len(buf) and \
                            bytes(buf) != want[off:off + len(buf)]:
                        wrong.append((i, s))
                elif op < 0.92:
                    got = cache.read_verified(vers[i].vid, s, n)
                    if got is not None and bytes(got) != want:
                        wrong.append((i, s))
                elif op < 0.97:
                    cache.make_room(r.randrange(4096, 40_000))
                else:
                    cache.drop(vers[i].vid, s, "evicted (test)")
            except CacheFull:
                pass

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)  # a hang bound only
    assert not any(t.is_alive() for t in threads)
    assert not wrong, wrong[:5]
    for i, v in enumerate(vers):
        for s, n in extents(i):
            if cache.present(v.vid, s):
                with open(cache.path(v.vid), "rb") as f:
                    f.seek(s)
                    assert f.read(n) == datas[i][s:s + n], (i, s)
    assert not [r.getMessage() for r in caplog.records if "cannot free" in r.getMessage()]


def test_a_complete_file_is_evicted_whole_and_a_mapping_of_it_keeps_its_bytes(tmp_path: Path) -> None:
    """A complete file may have been handed to the kernel for passthrough, and a loader that mapped it keeps
    the mapping after it closed the file (and after the daemon let the backing id go): its bytes must never
    change. Eviction deletes such a file whole instead of punching it, so the mapping still reads the
    version's bytes, while files still filling give up single extents."""
    import mmap

    idx = new_index(tmp_path)
    cache = FileCache(str(tmp_path), idx, "d", "src", max_size=4 * EXT, min_free=0)
    done, filling = make_version("m/done.bin", 2 * EXT), make_version("m/filling.bin", 3 * EXT)
    d0, d1 = put(cache, done, 0, EXT), put(cache, done, EXT, EXT)
    f0 = put(cache, filling, 0, EXT)
    with open(cache.path(done.vid), "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)  # as a loader's mmap through passthrough
    put(cache, filling, EXT, EXT)
    put(cache, make_version("m/new.bin", EXT), 0, EXT)  # over the quota: `done` is the oldest
    assert not cache.present(done.vid, 0) and not cache.present(done.vid, EXT)
    assert not os.path.exists(cache.path(done.vid))  # deleted whole, never punched
    assert mapped[:] == d0 + d1  # the mapping still reads the version's bytes
    mapped.close()
    assert cache.present(filling.vid, 0) and read(cache, filling.vid, 0, EXT) == f0
    cache.close()
    idx.close()
