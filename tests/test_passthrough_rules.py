"""The passthrough rules without a mount and without root: a real cache on this disk, the kernel's side in
memory (`Registry`: what FUSE_DEV_IOC_BACKING_OPEN / _CLOSE keep). The kernel is handed only a complete file
this process trusts whole, one backing id per version while handles are open, held against eviction until
the last is released; a file an earlier daemon wrote is read back and hashed first, and a damaged one is not
handed over; a refusal latches passthrough off."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from modelfs.cache import FileCache
from modelfs.catalog.index import ChunkIndex
from modelfs.catalog.version import FileVersion
from modelfs.digest import content_hash
from modelfs.passthrough.kernel import Kernel
from modelfs.passthrough.opens import Passthrough
from modelfs.remote import ObjectInfo
from modelfs.stats import Stats

EXT = 64 << 10


class Registry:
    """The kernel's backing files, in memory: what each id would serve, and the calls made."""

    def __init__(self, refuse: int = 0) -> None:
        self.files: dict[int, bytes] = {}
        self.registered = 0
        self.refuse = refuse  # an errno the kernel answers every registration with (0: none)

    def register(self, fd: int) -> int:
        self.registered += 1
        if self.refuse:
            raise OSError(self.refuse, os.strerror(self.refuse))
        backing_id = self.registered
        self.files[backing_id] = os.pread(fd, os.fstat(fd).st_size, 0)
        return backing_id

    def unregister(self, backing_id: int) -> None:
        del self.files[backing_id]

    def kernel(self) -> Kernel:
        return Kernel(lambda: True, self.register, self.unregister)


def version(data: bytes) -> FileVersion:
    extents = [(s, min(EXT, len(data) - s), content_hash(data[s:s + EXT])) for s in range(0, len(data), EXT)]
    return FileVersion.of("src", ObjectInfo("m/model.safetensors", len(data), '"e1"', 0.0), EXT, extents)


def new_cache(root: Path, max_size: int = 0) -> FileCache:
    return FileCache(str(root / "cache"), ChunkIndex(str(root / "index"), 1 << 24), "src", "src", min_free=0,
                     max_size=max_size)


def fill(cache: FileCache, ver: FileVersion, data: bytes, upto: int | None = None, since: int = 0) -> None:
    """Write the extents in [since, upto) of `ver` into its cache file, as GETs would."""
    for start, (digest, length) in sorted(ver.known.items()):
        if since <= start and (upto is None or start < upto):
            assert cache.write(ver, start, data[start:start + length], digest)


def close(cache: FileCache) -> None:
    cache.close()
    cache.index.close()


def test_one_backing_id_per_version_held_against_eviction_and_given_back_with_the_last_handle(
        tmp_path: Path) -> None:
    data = os.urandom(5 * EXT + 123)
    ver, cache, kernel = version(data), new_cache(tmp_path, max_size=8 * EXT), Registry()
    fill(cache, ver, data)
    pt = Passthrough(cache, Stats(), kernel.kernel())

    async def main() -> None:
        first, second = await pt.open(ver), await pt.open(ver)
        assert first == second != 0 and kernel.registered == 1
        assert kernel.files[first] == data  # the cache file itself, every byte
        assert not cache.make_room(4 * EXT)  # room only by evicting it, which its registration forbids
        assert cache.complete(ver.vid)
        pt.release(ver)
        assert first in kernel.files  # one handle still open
        pt.release(ver)
        assert not kernel.files  # the last one gave the id back
        assert pt.stats.passthrough_opens == 2
        assert cache.make_room(4 * EXT) and not cache.complete(ver.vid)  # no longer held: evicted

    trio.run(main)
    close(cache)


def test_a_partial_file_is_never_handed_to_the_kernel(tmp_path: Path) -> None:
    data = os.urandom(4 * EXT)
    ver, cache, kernel = version(data), new_cache(tmp_path), Registry()
    fill(cache, ver, data, upto=3 * EXT)  # the last extent has not arrived
    pt = Passthrough(cache, Stats(), kernel.kernel())
    assert trio.run(pt.open, ver) == 0 and kernel.registered == 0
    fill(cache, ver, data, since=3 * EXT)
    assert trio.run(pt.open, ver) != 0 and kernel.registered == 1
    close(cache)


@pytest.mark.parametrize("damaged", [False, True])
def test_a_file_an_earlier_daemon_wrote_is_checked_before_the_kernel_gets_it(damaged: bool, tmp_path: Path) -> None:
    """A new daemon trusts nothing it did not hash (on storage that verifies nothing, as here): the first
    open reads back and hashes every extent; a damaged one is dropped (fetched again later) and the open is
    served through the daemon meanwhile."""
    data = os.urandom(6 * EXT)
    ver = version(data)
    earlier = new_cache(tmp_path)
    fill(earlier, ver, data)
    path = earlier.path(ver.vid)
    close(earlier)
    if damaged:
        with open(path, "r+b") as f:
            f.seek(2 * EXT + 77)
            f.write(bytes([data[2 * EXT + 77] ^ 0x20]))
    cache, kernel, stats = new_cache(tmp_path), Registry(), Stats()
    pt = Passthrough(cache, stats, kernel.kernel())
    ver = version(data)  # as the new daemon learns it
    assert cache.complete(ver.vid) and not cache.all_trusted(ver.vid)
    backing_id = trio.run(pt.open, ver)
    assert cache.reads_verified == 6
    if damaged:
        assert backing_id == 0 and kernel.registered == 0
        assert stats.files_corrupt == 1 and not cache.present(ver.vid, 2 * EXT)
    else:
        assert backing_id != 0 and kernel.files[backing_id] == data and stats.files_corrupt == 0
        assert trio.run(pt.open, ver) == backing_id and cache.reads_verified == 6  # checked once
    close(cache)


def test_a_refusal_latches_passthrough_off(tmp_path: Path) -> None:
    """The kernel refused a backing file (no CAP_SYS_ADMIN, a stacked filesystem): every later open is served
    through the daemon, without asking again, and the refusal is counted once."""
    data = os.urandom(2 * EXT)
    ver, cache, kernel = version(data), new_cache(tmp_path), Registry(refuse=errno.EPERM)
    fill(cache, ver, data)
    pt = Passthrough(cache, Stats(), kernel.kernel())
    assert trio.run(pt.open, ver) == 0 and not pt.available
    assert trio.run(pt.open, ver) == 0 and kernel.registered == 1
    assert pt.stats.passthrough_refused == 1 and pt.stats.passthrough_opens == 0
    close(cache)


def test_an_inode_open_in_cached_mode_gets_no_passthrough_open_until_that_handle_is_released(
        tmp_path: Path) -> None:
    """The kernel refuses a mix of modes on one inode: an open made while the file was partial (cached mode,
    served through READs) keeps later opens of that inode in cached mode, even once the file is complete;
    after it is released the next open is passthrough, and the count of each mode goes back to nothing."""
    data = os.urandom(3 * EXT)
    ver, cache, kernel = version(data), new_cache(tmp_path), Registry()
    fill(cache, ver, data, upto=2 * EXT)
    pt = Passthrough(cache, Stats(), kernel.kernel())
    inode = 7

    async def main() -> None:
        assert await pt.open_handle(1, inode, ver) == 0 and pt.in_cached_mode(inode)  # partial: cached mode
        fill(cache, ver, data, since=2 * EXT)  # complete now
        assert await pt.open_handle(2, inode, ver) == 0 and kernel.registered == 0  # still: handle 1 is open
        pt.release_handle(1, inode, ver)
        assert pt.in_cached_mode(inode)  # handle 2 too
        pt.release_handle(2, inode, ver)
        assert not pt.in_cached_mode(inode)
        backing_id = await pt.open_handle(3, inode, ver)
        assert backing_id and kernel.files[backing_id] == data and not pt.in_cached_mode(inode)
        pt.release_handle(3, inode, ver)
        assert not kernel.files

    trio.run(main)
    close(cache)


def test_the_checks_at_start_keep_to_the_directories_opened_once_a_loader_comes(tmp_path: Path) -> None:
    """A new daemon checks the files loaded last from its start, before any open: the kernel then gets them
    with no check left (`check_at_start`). Once a file is opened, only its directory's files are checked on:
    the loader named its checkpoint, and another one's files get no disk time."""
    def ver_of(key: str, data: bytes) -> FileVersion:
        extents = [(s, min(EXT, len(data) - s), content_hash(data[s:s + EXT])) for s in range(0, len(data), EXT)]
        return FileVersion.of("src", ObjectInfo(key, len(data), '"e1"', 0.0), EXT, extents)

    files = {key: os.urandom(3 * EXT) for key in ("m/a/1.safetensors", "m/a/2.safetensors", "m/b/1.safetensors")}
    vers = {key: ver_of(key, data) for key, data in files.items()}
    cache = new_cache(tmp_path)
    for key, ver in vers.items():
        fill(cache, ver, files[key])
    cache.close()  # the next daemon trusts none of them yet
    for opened in ("", "m/a/1.safetensors"):
        cache = FileCache(str(tmp_path / "cache"), cache.index, "src", "src", min_free=0)
        stats, kernel = Stats(), Registry()
        pt = Passthrough(cache, stats, kernel.kernel())
        if opened:
            pt.opening(vers[opened])
        trio.run(pt.check_at_start, 1 << 30)
        checked = {key for key, ver in vers.items() if cache.all_trusted(ver.vid)}
        assert checked == ({"m/a/1.safetensors", "m/a/2.safetensors"} if opened else set(files)), checked
        assert stats.files_checked_at_start == len(checked) and cache.reads_verified == 3 * len(checked)
        assert kernel.registered == 0  # checking hands nothing to the kernel
        cache.close()
    close(cache)
