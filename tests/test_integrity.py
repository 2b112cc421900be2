"""Never wrong bytes, whatever happens to a cache block's file: changed under the filesystem (a bad disk:
no timestamp moves, the old bytes stay in memory until the pages are reclaimed), written in place or
truncated while a reader streams the file. Real mounts, the cache dir on a loop-mounted ext4.

Each read through the mount must return the source's bytes or fail with EIO; a wrong byte, at any
offset, fails the test with that offset. Pages the kernel keeps (the mount's page cache) must not hold
wrong bytes either: a second read with the page cache kept must be right.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import xxhash

from modelfs.mount import abort_connection
from modelfs.testing.diskfault import LoopFs, available, corrupt_under_fs, loop_ext4, truncate_in_place, write_in_place
from tests.conftest import Mount, requires_fuse

pytestmark = [requires_fuse, pytest.mark.mount,
              pytest.mark.skipif(available() is not None, reason=f"loop filesystems: {available()}")]

MiB = 1 << 20
EXTENT = 8 * MiB  # cache.extent_size's default: a plain file from a local directory is cut at these offsets
READ = MiB
#: A read pass (or a paused reader) that takes longer than this is hung: the bound only detects a hang.
HANG = 180.0
#: Cache dir settings: no min_free (the small loop filesystem is the cache's own disk).
# The block path's integrity: with passthrough a later open could be served from the file's copy (built
# from the blocks before the damage) and never load the block; copies are checked in test_passthrough.py.
CACHE_ARGS = ["-o", "cache.min_free=0", "-o", "mount.passthrough=off"]


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
    from modelfs.testing.checkpoints import make_safetensors_checkpoint

    root = tmp_path_factory.mktemp("integrity-src")
    make_safetensors_checkpoint(root / "ckpt", total_bytes=72 * MiB, shards=1, seed=11)
    return root


def shard(root: Path) -> str:
    return next(p.relative_to(root).as_posix() for p in (root / "ckpt").glob("*.safetensors"))


def block_file(cache_dir: Path, data: bytes) -> Path:
    """The cache file holding `data` (an extent's bytes): named by its xxh3-128, in any trust domain."""
    h = xxhash.xxh3_128_hexdigest(data)
    found = list((cache_dir / "blocks").glob(f"*/{h[:2]}/{h[2:4]}/{h}"))
    assert len(found) == 1, f"no single cache block for extent {h}: {found}"
    return found[0]


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
    """One READ-sized pread at `off`, compared with the source."""
    try:
        got = os.pread(fd, READ, off)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise AssertionError(f"the daemon is gone (ENOTCONN) at offset {off}: {out.describe()}") from e
        if e.errno != errno.EIO:
            raise
        out.eio.append(off)
        return
    want = ref[off:off + READ]
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


@pytest.mark.parametrize("pool", ["held", "dropped"])
def test_disk_corruption_under_pages_read_again_after_eviction(pool: str, cache_disk: LoopFs, source: Path,
                                                               mounter: Callable[..., Mount]) -> None:
    """A byte of a verified block changes on disk, under the filesystem (no ctime or mtime moves), and
    its pages leave memory (also the daemon's mapped ones: as memory pressure would). The next read of
    the file through the mount must not return the changed byte.

    held: the default map budget, so the daemon still holds the block (mapped or in memory) when the
    bytes change. dropped: a two-block budget, so the daemon dropped it before and loads it from disk.
    A daemon that loads from disk must catch the damage there (corrupt_blocks); one that still holds
    verified bytes of its own may serve them, and the damage must then be caught by the next daemon."""
    rel = shard(source)
    ref = (source / rel).read_bytes()
    assert len(ref) > 6 * EXTENT
    args = [*CACHE_ARGS] + (["-o", f"cache.map_budget={2 * EXTENT}"] if pool == "dropped" else [])
    cache_dir = cache_disk.mountpoint / "cache"
    m = mounter(str(source), args=args, cache_dir=cache_dir)
    first = read_pass(m, rel, ref)  # cold: every block fetched, verified, stored, mapped
    assert not first.wrong and not first.eio, first.describe()

    k = 1  # read early: with the two-block budget, long dropped from the pool by the end of the read
    victim = block_file(cache_dir, ref[k * EXTENT:(k + 1) * EXTENT])
    within = 3 * MiB + 4321
    corrupt_under_fs(cache_disk, victim, within)
    drop_caches(3)  # the mount's pages go too: the next read reaches the daemon
    after = read_pass(m, rel, ref)
    assert not after.wrong, (f"byte {within} of extent {k}'s block (file offset {k * EXTENT + within}) was "
                             f"changed on disk: {after.describe()}")
    caught = m.stats()["corrupt_blocks"]
    if pool == "dropped":
        assert caught >= 1, "the block was loaded from disk again and its damage went unseen"
    again = read_pass(m, rel, ref)  # refetched: right and whole, from the page cache or the daemon
    assert not again.wrong and not again.eio, again.describe()
    if not caught:
        m.umount()
        m2 = m.remount()
        drop_caches(3)
        fresh = read_pass(m2, rel, ref)
        assert not fresh.wrong and not fresh.eio, fresh.describe()
        assert m2.stats()["corrupt_blocks"] >= 1, "a new daemon served the damaged block without noticing"


@pytest.mark.parametrize("fault", ["write", "truncate"])
def test_a_block_changed_in_place_while_a_reader_streams_it(fault: str, cache_disk: LoopFs, source: Path,
                                                            mounter: Callable[..., Mount]) -> None:
    """A warm daemon has verified and mapped every block; a reader streams the file in 1 MiB reads. Half-way
    through extent 1, the block files of extent 1 (being read) and of extents ahead are written in place
    (pwrite, no truncation) or truncated to half, through the filesystem (ctime moves), and the reader
    reads on at once. Every read is right or EIO, none hangs; then a second pass with the page cache kept
    is right and whole (nothing wrong stayed in the kernel's pages, the damaged blocks were refetched)."""
    rel = shard(source)
    ref = (source / rel).read_bytes()
    n = (len(ref) + EXTENT - 1) // EXTENT
    cache_dir = cache_disk.mountpoint / "cache"
    m = mounter(str(source), args=CACHE_ARGS, cache_dir=cache_dir)
    warm = read_pass(m, rel, ref)  # every block stored; verified and mapped by this daemon
    assert not warm.wrong and not warm.eio, warm.describe()
    blocks = {k: block_file(cache_dir, ref[k * EXTENT:(k + 1) * EXTENT]) for k in range(n - 1)}
    drop_caches(1)  # the mount's pages go; the daemon's mappings stay
    pause_at = EXTENT + 4 * MiB
    ahead = [3, 5, n - 2]
    changed: list[str] = []

    def damage() -> None:
        if fault == "write":
            for k, offsets in [(1, [MiB, 4 * MiB + 512 * 1024, 6 * MiB + 99, EXTENT - 4096]),
                               *[(k, [0, 2 * MiB + 123, 5 * MiB + 7, EXTENT - 4096]) for k in ahead]]:
                for o in offsets:
                    write_in_place(blocks[k], o, os.urandom(4096))
                changed.append(f"extent {k} written at {offsets}")
        else:
            for k in (1, ahead[1]):
                truncate_in_place(blocks[k], EXTENT // 2)
                changed.append(f"extent {k} truncated to {EXTENT // 2}")

    streamed = read_pass(m, rel, ref, pause_at=pause_at, at_pause=damage)
    assert streamed.done and changed
    assert not streamed.wrong, f"{'; '.join(changed)}: {streamed.describe()}"
    kept = read_pass(m, rel, ref)  # page cache kept: whatever the first pass left there, and refetches
    assert not kept.wrong, f"{'; '.join(changed)}, second pass: {kept.describe()}"
    assert not kept.eio, f"{'; '.join(changed)}: the damaged blocks were not refetched: {kept.describe()}"
