"""Never wrong bytes from a cache file changed behind the daemon's back: under the filesystem (a bad disk: no
timestamp moves, the old bytes stay in memory until the pages are reclaimed), written in place or truncated
while a reader streams the file. Real mounts, the cache dir on a loop-mounted ext4.

The promise (DESIGN.md): an extent's bytes are hashed when they arrive and the first time each daemon reads
them back from its cache file; from then on that daemon serves them from the file (by its READs, or by the
kernel through passthrough) and need not notice a later change. So a change is caught by the first daemon
that uses the extent after it: a restarted daemon, or a running one that had not checked the extent yet.
It drops the extent, fetches it again and serves the right bytes.

Each read through the mount must return the source's bytes (or fail with EIO where the test says so); a wrong
byte, at any offset, fails the test with that offset. Pages the kernel keeps (the mount's page cache) must
not hold wrong bytes either: a second read with the page cache kept must be right.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from modelfs.cache import integrity
from modelfs.service.mount import abort_connection
from tests.conftest import Mount, eventually, requires_fuse
from tests.support.diskfault import (
    LoopFs,
    available,
    corrupt_under_fs,
    loop_btrfs,
    loop_ext4,
    truncate_in_place,
    write_in_place,
)

pytestmark = [requires_fuse, pytest.mark.mount,
              pytest.mark.skipif(available() is not None, reason=f"loop filesystems: {available()}")]

MiB = 1 << 20
EXTENT = 8 * MiB  # cache.extent_size's default: a plain file from a local directory is cut at these offsets
READ = MiB
#: A read pass (or a paused reader) that takes longer than this is hung: the bound only detects a hang.
HANG = 180.0
#: Cache dir settings: no min_free (the small loop filesystem is the cache's own disk).
CACHE_ARGS = ["-o", "cache.min_free=0"]
#: The daemon's READ path (where it reads its cache files back and checks them): no passthrough.
READ_PATH = ["-o", "mount.passthrough=off"]
#: No read-ahead by the daemon: it reads back (and checks) only the extents the reader has reached.
NO_PREFETCH = ["-o", "prefetch.whole_file=false", "-o", "prefetch.checkpoint_sets=false",
               "-o", "prefetch.sequential=false"]
PASSTHROUGH_OFF = "mount.passthrough=off" in os.environ.get("MODELFS_TEST_MOUNT_OPTIONS", "")


def drop_caches(what: int = 3) -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text(str(what))


@pytest.fixture
def cache_disk(tmp_path: Path) -> Iterator[LoopFs]:
    """An ext4 of its own for the cache dir. Requested before `mounter`, so it is torn down after the
    daemons (a lazy unmount and a deferred detach would cope anyway)."""
    with loop_ext4(tmp_path, 512 * MiB, mountpoint=tmp_path / "cachedisk") as fs:
        yield fs


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local source tree with one safetensors shard of 72 MiB: nine 8 MiB extents of random-looking bytes."""
    from tests.support.checkpoints import make_safetensors_checkpoint

    root = tmp_path_factory.mktemp("integrity-src")
    make_safetensors_checkpoint(root / "ckpt", total_bytes=72 * MiB, shards=1, seed=11)
    return root


def shard(root: Path) -> str:
    return next(p.relative_to(root).as_posix() for p in (root / "ckpt").glob("*.safetensors"))


def cache_file(cache_dir: Path, size: int) -> Path:
    """The version file of the one source file of `size` bytes the mount has cached (`files/<vid hex>`)."""
    found = [p for p in (cache_dir / "files").iterdir() if p.stat().st_size == size]
    assert len(found) == 1, f"no single cache file of {size} bytes: {found}"
    return found[0]


def idle(m: Mount) -> bool:
    st = m.stats()
    return st["fetches_in_flight"] == 0 and st["prefetch_queue"] == 0


@dataclass
class Pass:
    """What one read pass through the mount got: wrong ranges (file offset of the first wrong byte, how
    many bytes of that read were wrong) and the offsets of reads that failed with EIO."""

    wrong: list[tuple[int, int]] = field(default_factory=list)
    eio: list[int] = field(default_factory=list)
    done: bool = False

    def describe(self) -> str:
        return (f"{len(self.wrong)} reads with wrong bytes: " + ", ".join(
            f"first wrong byte at offset {o} (extent {o // EXTENT}, {o % EXTENT} into it), {n} bytes of the read wrong"
            for o, n in self.wrong[:6]) + f"; EIO at {self.eio[:6]}")


def check_read(fd: int, ref: bytes, off: int, out: Pass) -> None:
    """One READ-sized read at `off`, compared with the source: preads until it is whole, as a reader loops on a
    short read (the kernel returns what it read before a block that failed, then EIO at that block)."""
    want = ref[off:off + READ]
    got = b""
    while len(got) < len(want):
        try:
            part = os.pread(fd, len(want) - len(got), off + len(got))
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                raise AssertionError(f"the daemon is gone (ENOTCONN) at offset {off}: {out.describe()}") from e
            if e.errno != errno.EIO:
                raise
            out.eio.append(off + len(got))
            if got != want[:len(got)]:
                break  # wrong bytes before the failure: reported below
            return
        if not part:
            break
        got += part
    if got != want:
        diffs = [i for i in range(min(len(got), len(want))) if got[i] != want[i]]
        first = diffs[0] if diffs else min(len(got), len(want))
        out.wrong.append((off + first, len(diffs) + abs(len(got) - len(want))))


def daemon_state(pid: int) -> str:
    """The daemon's threads and where each waits (for a hang's report): a daemon that dies while one of its
    threads sleeps uninterruptibly in the FUSE connection stays, dumping core, until the connection is
    aborted."""
    parts = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")) if os.path.exists(f"/proc/{pid}/task") else []:
        try:
            state = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            parts.append(f"{tid} {state} {Path(f'/proc/{pid}/task/{tid}/wchan').read_text()}")
        except OSError:
            continue
    return f"daemon {pid}: " + ("; ".join(parts) or "gone")


def read_pass(m: Mount, rel: str, ref: bytes, pause_at: int | None = None,
              at_pause: Callable[[], None] | None = None) -> Pass:
    """Read the whole file in READ-sized preads, in order, in a thread (so a hang fails the test instead of
    holding it); at `pause_at`, run `at_pause` in the reader's own sequence, then read on at once. A hang
    aborts the mount's FUSE connection before it fails the test, so nothing stays blocked behind it."""
    path = m.path / rel
    out = Pass()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                for off in range(0, len(ref), READ):
                    if off == pause_at and at_pause is not None:
                        at_pause()
                    check_read(fd, ref, off, out)
            finally:
                os.close(fd)
            out.done = True
        except BaseException as e:  # reported by the caller's thread
            failure.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(HANG)
    if t.is_alive():
        state = daemon_state(m.pid)
        if m.minor is not None:
            abort_connection(m.minor)
        t.join(30)
        raise AssertionError(f"a read through the mount did not return in {HANG:.0f} s (hung): {state}; "
                             f"{out.describe()}")
    if failure:
        raise failure[0]
    return out


@pytest.mark.parametrize("path", ["read", "passthrough"])
@pytest.mark.parametrize("when", ["stopped", "unchecked", "checked"])
def test_disk_corruption_under_pages_is_caught_by_the_first_daemon_to_use_it(
        when: str, path: str, cache_disk: LoopFs, source: Path, mounter: Callable[..., Mount]) -> None:
    """A byte of an extent's cache file changes on disk, under the filesystem (no ctime or mtime moves), and
    its pages leave memory (as memory pressure would). The first daemon to use the extent after that must not
    return the changed byte: it catches the damage (corrupt_extents; on the passthrough path at the check
    before the kernel gets the file: files_corrupt), fetches that extent again (and only that one) and
    serves the right bytes, also from its pages afterwards.

    stopped: changed while no daemon runs, between two. unchecked: changed under a new daemon that has not
    used the file yet. checked: changed under the daemon that wrote the extent (so trusts it): that daemon
    serves from the cache file and need not notice; the next daemon must."""
    if path == "passthrough" and PASSTHROUGH_OFF:
        pytest.skip("the suite runs with passthrough off")
    rel = shard(source)
    ref = (source / rel).read_bytes()
    assert len(ref) > 6 * EXTENT
    args = [*CACHE_ARGS, *(READ_PATH if path == "read" else [])]
    cache_dir = cache_disk.mountpoint / "cache"
    m = mounter(str(source), args=args, cache_dir=cache_dir)
    first = read_pass(m, rel, ref)  # cold: every extent fetched, hashed, written into the cache file
    assert not first.wrong and not first.eio, first.describe()
    assert eventually(lambda: idle(m) and m.stats()["files_complete"] == 1), m.stats()
    victim = cache_file(cache_dir, len(ref))

    k = 1
    within = 3 * MiB + 4321

    def damage() -> None:
        corrupt_under_fs(cache_disk, victim, k * EXTENT + within)
        drop_caches(3)  # the mount's pages go too: the next read reaches the daemon or the cache file

    if when == "checked":
        damage()
        served = read_pass(m, rel, ref)  # this daemon trusts the extent: what it serves is not asserted
        assert served.done
        m.umount()
        m = m.remount()
    elif when == "stopped":
        m.umount()
        damage()
        m = m.remount()
    else:  # the new daemon does not check files at its start: this case is about one that has not yet
        m.umount()
        m = m.remount(args=[*args, "-o", "cache.check_at_start=0"])
        assert m.stats()["extents_verified"] == 0, m.stats()  # nothing of the cache file read back yet
        damage()
    fresh = read_pass(m, rel, ref)
    assert not fresh.wrong and not fresh.eio, (f"byte {within} of extent {k} (file offset {k * EXTENT + within}) "
                                               f"was changed on disk: {fresh.describe()}")
    st = m.stats()
    assert st["corrupt_extents"] == 1, "the damaged extent was served without being noticed" + f": {st}"
    assert st["files_corrupt"] == (1 if path == "passthrough" else 0), st
    assert st["gets"] == 1 and st["bytes_fetched"] == EXTENT, st  # that extent, and only it, fetched again
    assert eventually(lambda: idle(m)), m.stats()
    again = read_pass(m, rel, ref)  # page cache kept: right and whole
    assert not again.wrong and not again.eio, again.describe()
    if path == "passthrough":  # whole and trusted again: the kernel serves the file
        assert m.stats()["passthrough_opens"] >= 1, m.stats()


@pytest.mark.parametrize("case", ["intact", "damaged", "off"])
def test_a_new_daemon_checks_the_files_loaded_last_from_its_start(case: str, cache_disk: LoopFs, source: Path,
                                                                  mounter: Callable[..., Mount]) -> None:
    """On storage that checks nothing (ext4), a new daemon reads back and checks the complete files loaded
    most recently from its start, before any open (cache.check_at_start): a loader that comes later opens them
    by passthrough with nothing left to check. A byte changed on disk while no daemon ran is found there,
    before any reader meets it: the extent is dropped, and fetched again (only it) when read. With the setting
    at 0, nothing is read back before the open, which checks the file."""
    if PASSTHROUGH_OFF:
        pytest.skip("the suite runs with passthrough off")
    rel = shard(source)
    ref = (source / rel).read_bytes()
    extents = -(-len(ref) // EXTENT)
    cache_dir = cache_disk.mountpoint / "cache"
    m = mounter(str(source), args=CACHE_ARGS, cache_dir=cache_dir)
    first = read_pass(m, rel, ref)
    assert not first.wrong and not first.eio, first.describe()
    assert eventually(lambda: idle(m) and m.stats()["files_complete"] == 1), m.stats()
    victim = cache_file(cache_dir, len(ref))
    m.umount()
    if case == "damaged":
        corrupt_under_fs(cache_disk, victim, 2 * EXTENT + 12345)
    drop_caches(3)
    m = m.remount(args=[*CACHE_ARGS, "-o", "cache.check_at_start=0"] if case == "off" else CACHE_ARGS)
    if case == "off":
        assert m.stats()["extents_verified"] == 0, m.stats()
    else:  # no open yet: the daemon reads the file back on its own
        assert eventually(lambda: m.stats()["extents_verified"] == extents), m.stats()
        st = m.stats()
        assert st["files_checked_at_start"] == (case == "intact"), st
        assert st["corrupt_extents"] == st["files_corrupt"] == (case == "damaged"), st
        assert st["gets"] == 0 and st["bytes_served"] == 0 and st["passthrough_opens"] == 0, st
    again = read_pass(m, rel, ref)
    assert not again.wrong and not again.eio, again.describe()
    st = m.stats()
    assert st["extents_verified"] == extents, st  # each extent read back once: at start, or at the open
    if case == "damaged":
        assert st["gets"] == 1 and st["bytes_fetched"] == EXTENT, st  # that extent, and only it
    else:
        assert st["gets"] == 0 and st["passthrough_opens"] >= 1 and st["bytes_served"] == 0, st
    m.umount()


@pytest.mark.parametrize("fault", ["write", "truncate"])
@pytest.mark.parametrize("daemon", ["warm", "restarted"])
def test_a_cache_file_changed_in_place_while_a_reader_streams_it(daemon: str, fault: str, cache_disk: LoopFs,
                                                                 source: Path, mounter: Callable[..., Mount]) -> None:
    """A reader streams the file in 1 MiB reads through the daemon's READ path. Half-way through extent 1 the
    cache file is changed through the filesystem (ctime moves) and the reader reads on at once: written in
    place in extent 1 (being read) and in extents ahead, or truncated. No read hangs, whatever the change.

    warm: the daemon that wrote every extent (it trusts them all); the file is truncated in the middle of
    extent 1 (its second half and every extent after it gone). It serves trusted extents from the cache file
    and need not notice a change (the design's promise), so reads of changed extents may be wrong; those of
    the others must be right, and a truncation must not make a read hang.
    restarted: a daemon restarted on the warm cache, which trusts no extent yet and reads ahead of no reader
    (it checks each extent at the reader's first READ of it); the file is truncated in the middle of extent 3
    (ahead of the reader). Every read of an extent it had not checked when the change came is right or EIO:
    the change is caught at the extent's first use, the extent fetched again.

    Then a second pass with the page cache kept: no EIO, and nothing wrong outside the changed extents the
    daemon had checked (nothing wrong stayed in the kernel's pages, the damaged extents were fetched again).
    Then the next daemon catches every change: right and whole."""
    rel = shard(source)
    ref = (source / rel).read_bytes()
    n = (len(ref) + EXTENT - 1) // EXTENT
    cache_dir = cache_disk.mountpoint / "cache"
    m = mounter(str(source), args=[*CACHE_ARGS, *READ_PATH, *NO_PREFETCH], cache_dir=cache_dir)
    warm = read_pass(m, rel, ref)  # every extent fetched, hashed and written into the cache file by this daemon
    assert not warm.wrong and not warm.eio, warm.describe()
    assert eventually(lambda: idle(m) and m.stats()["files_complete"] == 1), m.stats()
    victim = cache_file(cache_dir, len(ref))
    if daemon == "restarted":
        m.umount()
        m = m.remount()  # trusts nothing of the cache file yet
    drop_caches(3)  # the mount's pages go (and the cache file's)
    pause_at = EXTENT + 4 * MiB
    ahead = [3, 5, n - 2]
    cut = (EXTENT if daemon == "warm" else 3 * EXTENT) + EXTENT // 2
    changed: list[str] = []
    damaged: set[int] = set()
    # Extents the daemon may have checked when the change came: all (warm: it wrote them), else those its
    # READs had reached by the end of the change (a prefix: READs in file order; the kernel's read-ahead may
    # reach one more extent while the change is made, so the count is read after it).
    checked: set[int] = set(range(n)) if daemon == "warm" else set()

    def damage() -> None:
        if fault == "write":
            for k, offsets in [(1, [MiB, 4 * MiB + 512 * 1024, 6 * MiB + 99, EXTENT - 4096]),
                               *[(k, [0, 2 * MiB + 123, 5 * MiB + 7, EXTENT - 4096]) for k in ahead]]:
                for o in offsets:
                    write_in_place(victim, k * EXTENT + o, os.urandom(4096))
                changed.append(f"extent {k} written at {offsets}")
                damaged.add(k)
        else:
            truncate_in_place(victim, cut)
            changed.append(f"cache file truncated to {cut} (in extent {cut // EXTENT})")
            damaged.update(range(cut // EXTENT, n))
        if daemon == "restarted":
            checked.update(range(m.stats()["extents_verified"]))

    streamed = read_pass(m, rel, ref, pause_at=pause_at, at_pause=damage)
    assert streamed.done and changed
    assert 1 in checked, checked  # the reader was in extent 1: the daemon had checked it
    trusted = damaged & checked  # changed after the daemon checked them: wrong reads there are the design's

    def unpromised(p: Pass) -> list[tuple[int, int]]:
        return [(o, c) for o, c in p.wrong if o // EXTENT not in trusted]

    what = f"{daemon} daemon, {'; '.join(changed)} (extents it may have checked before: {sorted(checked)})"
    assert not unpromised(streamed), f"{what}: {streamed.describe()}"
    caught = m.stats()["corrupt_extents"]
    assert caught >= len(damaged - checked), (caught, sorted(damaged - checked))  # each caught at its first use
    kept = read_pass(m, rel, ref)  # page cache kept: whatever the first pass left there, and refetches
    assert not unpromised(kept), f"{what}, second pass: {kept.describe()}"
    assert not kept.eio, f"{what}: the damaged extents were not refetched: {kept.describe()}"
    caught = m.stats()["corrupt_extents"]
    m.umount()
    m = m.remount()  # the next daemon: it checks every extent at its first use, those the last one trusted too
    drop_caches(3)
    fresh = read_pass(m, rel, ref)
    assert not fresh.wrong and not fresh.eio, f"{what}, next daemon: {fresh.describe()}"
    if fault == "write" or not trusted:
        # Each damaged extent found once: by the daemon that had not checked it, or by the next one.
        assert caught + m.stats()["corrupt_extents"] == len(damaged), (caught, m.stats(), sorted(damaged))


# -- storage that verifies what the kernel reads: btrfs with data checksums --------------------------------------

requires_btrfs = pytest.mark.skipif(shutil.which("mkfs.btrfs") is None, reason="needs mkfs.btrfs (btrfs-progs)")


@pytest.fixture
def btrfs_disk(tmp_path: Path) -> Iterator[LoopFs]:
    """A btrfs of its own for the cache dir (data checksums on: its default)."""
    with loop_btrfs(tmp_path, 512 * MiB, mountpoint=tmp_path / "btrfsdisk") as fs:
        yield fs


def cold_then_restart(m: Mount, rel: str, ref: bytes) -> Mount:
    """A cold pass through `m`, its file complete; the daemon stopped and a new one started on the cache."""
    first = read_pass(m, rel, ref)
    assert not first.wrong and not first.eio, first.describe()
    assert eventually(lambda: idle(m) and m.stats()["files_complete"] == 1), m.stats()
    m.umount()
    return m.remount()


@pytest.mark.parametrize("fs", [pytest.param("btrfs", marks=requires_btrfs), "ext4 trust_restarts"])
def test_a_new_daemon_trusts_a_sealed_cache_file_without_reading_it_back(
        fs: str, tmp_path: Path, source: Path, mounter: Callable[..., Mount]) -> None:
    """On btrfs with data checksums the kernel checks every block it reads from disk, so a complete file that
    was sealed (made durable, its identity recorded) is trusted by the next daemon as it is: served at once,
    by passthrough or READs, with no byte of it read back and hashed by the daemon. On ext4, which checks
    nothing, only with `cache.trust_restarts` (the seal names the boot), and the storage says it verifies
    nothing."""
    rel = shard(source)
    ref = (source / rel).read_bytes()
    make, args = (loop_btrfs, CACHE_ARGS) if fs == "btrfs" else \
        (loop_ext4, [*CACHE_ARGS, "-o", "cache.trust_restarts=true"])
    with make(tmp_path, 512 * MiB, mountpoint=tmp_path / "disk") as disk:
        m = mounter(str(source), args=args, cache_dir=disk.mountpoint / "cache")
        m = cold_then_restart(m, rel, ref)
        st = m.stats()
        assert st["storage_verifies"] == (fs == "btrfs") and st["files_trusted_sealed"] == 1, st
        again = read_pass(m, rel, ref)
        assert not again.wrong and not again.eio, again.describe()
        st = m.stats()
        assert st["extents_verified"] == 0 and st["gets"] == 0, st
        if not PASSTHROUGH_OFF:
            assert st["passthrough_opens"] >= 1 and st["bytes_served"] == 0, st
        m.umount()


@requires_btrfs
@pytest.mark.parametrize("path", ["read", "passthrough"])
def test_rot_under_a_sealed_file_on_btrfs_is_never_served(path: str, btrfs_disk: LoopFs, source: Path,
                                                          mounter: Callable[..., Mount]) -> None:
    """A block of a sealed cache file changes under btrfs (no timestamp moves) and leaves memory: the new
    daemon trusts the file without reading it back, so the storage's checksum is what stands between the rot
    and the loader. Never a wrong byte: EIO through passthrough; through the daemon's READs the failed read
    drops the extent, which is fetched again and served right."""
    if path == "passthrough" and PASSTHROUGH_OFF:
        pytest.skip("the suite runs with passthrough off")
    rel = shard(source)
    ref = (source / rel).read_bytes()
    args = [*CACHE_ARGS, *(READ_PATH if path == "read" else [])]
    m = mounter(str(source), args=args, cache_dir=btrfs_disk.mountpoint / "cache")
    read_pass(m, rel, ref)
    assert eventually(lambda: idle(m) and m.stats()["files_complete"] == 1), m.stats()
    m.umount()
    victim = cache_file(btrfs_disk.mountpoint / "cache", len(ref))
    offset = 2 * EXTENT + 12345
    corrupt_under_fs(btrfs_disk, victim, offset)
    drop_caches(3)
    m = m.remount()
    assert m.stats()["files_trusted_sealed"] == 1, m.stats()
    fresh = read_pass(m, rel, ref)
    assert not fresh.wrong, f"byte {offset} was changed under btrfs: {fresh.describe()}"
    st = m.stats()
    if path == "read":
        assert not fresh.eio and st["corrupt_extents"] == 1 and st["bytes_fetched"] == EXTENT, st
    else:
        assert fresh.eio and all(offset - offset % 4096 - READ < o <= offset for o in fresh.eio), fresh.describe()


@pytest.mark.parametrize("fs", ["ext4", pytest.param("btrfs", marks=requires_btrfs)])
def test_passthrough_verified_serves_by_passthrough_only_from_storage_that_verifies(
        fs: str, tmp_path: Path, source: Path, mounter: Callable[..., Mount]) -> None:
    """mount.passthrough = verified: the kernel gets a cache file only where the storage checks what it reads;
    elsewhere (ext4) every open is served through the daemon, which checks what it serves."""
    if PASSTHROUGH_OFF:
        pytest.skip("the suite runs with passthrough off")
    rel = shard(source)
    ref = (source / rel).read_bytes()
    make = loop_btrfs if fs == "btrfs" else loop_ext4
    with make(tmp_path, 512 * MiB, mountpoint=tmp_path / "disk") as disk:
        m = mounter(str(source), args=[*CACHE_ARGS, "-o", "mount.passthrough=verified"],
                    cache_dir=disk.mountpoint / "cache")
        m = cold_then_restart(m, rel, ref)
        again = read_pass(m, rel, ref)
        assert not again.wrong and not again.eio, again.describe()
        st = m.stats()
        assert st["storage_verifies"] == (fs == "btrfs"), st
        assert (st["passthrough_opens"] > 0) == (fs == "btrfs"), st
        assert (st["bytes_served"] == 0) == (fs == "btrfs"), st
        m.umount()


@pytest.mark.parametrize("disk", ["ext4", pytest.param("btrfs", marks=requires_btrfs),
                                  pytest.param("btrfs nodatasum", marks=requires_btrfs),
                                  pytest.param("btrfs No_COW dir", marks=requires_btrfs)])
def test_the_storage_kind_is_what_the_filesystem_checks(disk: str, tmp_path: Path) -> None:
    """Only btrfs with data checksums counts as verifying: not ext4, not btrfs mounted nodatasum, not a
    directory marked No_COW (its files get no checksums)."""
    make = loop_ext4 if disk == "ext4" else loop_btrfs
    with make(tmp_path, 512 * MiB, options="nodatasum" if "nodatasum" in disk else "") as fs:
        d = fs.mountpoint / "cache"
        d.mkdir()
        if "No_COW" in disk:
            subprocess.run(["chattr", "+C", str(d)], check=True)
        storage = integrity.probe(str(d))
        assert storage.verifies == (disk == "btrfs"), storage


@requires_btrfs
def test_a_sealed_file_written_through_the_filesystem_is_read_back_again(btrfs_disk: LoopFs, source: Path,
                                                                         mounter: Callable[..., Mount]) -> None:
    """btrfs checksums a stray write as it writes it: the seal, not the storage, must catch it. The write moves
    the file's mtime and ctime, so the next daemon does not trust the seal, reads the file back, finds the
    changed extent and fetches it again."""
    rel = shard(source)
    ref = (source / rel).read_bytes()
    m = mounter(str(source), args=CACHE_ARGS, cache_dir=btrfs_disk.mountpoint / "cache")
    read_pass(m, rel, ref)
    assert eventually(lambda: idle(m) and m.stats()["files_complete"] == 1), m.stats()
    m.umount()
    write_in_place(cache_file(btrfs_disk.mountpoint / "cache", len(ref)), 3 * EXTENT + 777, b"stray")
    m = m.remount()
    assert m.stats()["files_trusted_sealed"] == 0, m.stats()
    fresh = read_pass(m, rel, ref)
    assert not fresh.wrong and not fresh.eio, fresh.describe()
    st = m.stats()
    assert st["corrupt_extents"] == 1 and st["bytes_fetched"] == EXTENT, st


# -- the scrub: rot under a checked file found and healed in place while the daemon runs -------------------------

#: A scrub that starts at once and reads fast (the default waits for 60 s of idleness and reads 32 MiB/s).
SCRUB_NOW = ["-o", "cache.scrub_after=0", "-o", "cache.scrub_rate=1GiB"]


@pytest.mark.parametrize("fs", ["ext4", "ext4 trust_restarts", pytest.param("btrfs", marks=requires_btrfs)])
def test_the_scrub_heals_rot_under_a_checked_file_before_any_reader_meets_it(
        fs: str, tmp_path: Path, source: Path, mounter: Callable[..., Mount]) -> None:
    """A block of a complete cache file rots under the filesystem (no timestamp moves). A daemon that trusts
    the file (on btrfs, and on ext4 with `cache.trust_restarts`: by its seal, reading nothing back; a daemon
    that wrote it would too) would serve it
    by passthrough: the wrong bytes on ext4, EIO on btrfs. Its scrub reads the file back from disk, finds the
    damaged extent, fetches it again and writes it over the bad block in place, before any read: the next
    reader gets the right bytes, from the same file, and nothing else was fetched. (The rot is put in while no
    daemon runs: a scrub running at full speed would otherwise heal it under the helper that checks it took.)"""
    rel = shard(source)
    ref = (source / rel).read_bytes()
    make = loop_btrfs if fs == "btrfs" else loop_ext4
    trust = ["-o", "cache.trust_restarts=true"] if fs == "ext4 trust_restarts" else []
    with make(tmp_path, 512 * MiB, mountpoint=tmp_path / "disk") as disk:
        cache_dir = disk.mountpoint / "cache"
        m = mounter(str(source), args=[*CACHE_ARGS, *trust, "-o", "cache.scrub_rate=0"], cache_dir=cache_dir)
        first = read_pass(m, rel, ref)
        assert not first.wrong and not first.eio, first.describe()
        assert eventually(lambda: idle(m) and m.stats()["files_complete"] == 1), m.stats()
        m.umount()
        victim = cache_file(cache_dir, len(ref))
        offset = 4 * EXTENT + 999
        corrupt_under_fs(disk, victim, offset)
        drop_caches(3)
        # (On plain ext4 the new daemon would find the rot first, checking the file from its start: off here,
        # the scrub is what is tested.)
        no_start_check = ["-o", "cache.check_at_start=0"] if fs == "ext4" else []
        m = mounter(str(source), args=[*CACHE_ARGS, *trust, *no_start_check, *SCRUB_NOW], cache_dir=cache_dir)
        assert eventually(lambda: m.stats()["scrub_healed"] >= 1), m.stats()
        st = m.stats()
        assert st["scrub_damaged"] == 1 and st["gets"] == 1 and st["bytes_fetched"] == EXTENT, st
        assert st["files_trusted_sealed"] == (fs != "ext4"), st
        drop_caches(3)
        again = read_pass(m, rel, ref)
        assert not again.wrong and not again.eio, again.describe()
        st = m.stats()
        assert st["files_complete"] == 1 and st["bytes_fetched"] == EXTENT, st
        m.umount()
