"""FUSE passthrough through real mounts and the real kernel: a file whose every extent is in its cache file
(and checked) is opened with that very file as the backing file, and the kernel serves it, with no READ
reaching the daemon (`bytes_served` stays put). There is no copy: the cache file a cold load wrote is what
the kernel reads, from the next open on, in the same daemon. Loaders must see the source's bytes whichever
way.

The rest of the suite runs mostly on the READ path (a file's first open is cold);
`test_passthrough_off_serves_every_read_through_the_daemon` runs the loads here with passthrough off."""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modelfs.service.mount import alive
from tests.conftest import Checkpoint, Mount, eventually, requires_fuse
from tests.conftest import sha256_file as sha

pytestmark = [requires_fuse, pytest.mark.mount,
              pytest.mark.skipif("mount.passthrough=off" in os.environ.get("MODELFS_TEST_MOUNT_OPTIONS", ""),
                                 reason="the suite runs with passthrough off")]


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def drop_caches() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3")


def warm(m: Mount, src: Path) -> None:
    """Read every file once (cold: through the daemon, or by passthrough if prefetch completed it first), then
    wait until the daemon is idle: every file is complete in the cache by then."""
    names = _files(src)
    for name in names:
        assert sha(m.path / name) == sha(src / name), name
    assert eventually(lambda: idle(m)), m.stats()
    assert m.stats()["files_complete"] == len(names), m.stats()


def idle(m: Mount) -> bool:
    st = m.stats()
    return st["fetches_in_flight"] == 0 and st["prefetch_queue"] == 0


def cache_files(m: Mount) -> list[Path]:
    return sorted((m.cache_dir / "files").iterdir())


def allocated(paths: list[Path]) -> int:
    """Bytes the filesystem allocated for these files (sparse files count what they hold)."""
    return sum(p.stat().st_blocks * 512 for p in paths)


def load_everything(root: Path, src: Path, ckpt: Checkpoint) -> None:
    """What loaders do: load_file, safe_open slices, torch.load(mmap=True), random preads."""
    shards = sorted((src / ckpt.hf_dir).glob("*.safetensors"))
    assert shards
    for shard in shards:
        got, want = load_file(root / ckpt.hf_dir / shard.name), load_file(shard)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), shard.name
        with safe_open(root / ckpt.hf_dir / shard.name, "pt") as f, safe_open(shard, "pt") as g:
            for key in list(g.keys())[:5]:
                assert torch.equal(f.get_slice(key)[1:3], g.get_slice(key)[1:3]), key
    got = torch.load(root / ckpt.torch_file, mmap=True, weights_only=True)
    want = torch.load(src / ckpt.torch_file, weights_only=True)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    rng = random.Random(7)
    for name in _files(src):
        size = (src / name).stat().st_size
        fd, ref = os.open(root / name, os.O_RDONLY), os.open(src / name, os.O_RDONLY)
        try:
            for _ in range(50):
                off, n = rng.randrange(size), rng.randrange(1, 3 << 20)
                assert os.pread(fd, n, off) == os.pread(ref, n, off), (name, off, n)
        finally:
            os.close(fd)
            os.close(ref)


def test_loads_through_passthrough_equal_the_source(checkpoint: Checkpoint,
                                                    mounter: Callable[..., Mount]) -> None:
    m = mounter(str(checkpoint.root))
    warm(m, checkpoint.root)
    drop_caches()
    served = m.stats()["bytes_served"]
    load_everything(m.path, checkpoint.root, checkpoint)
    # mmap of a file while another process reads it
    shard = sorted((checkpoint.root / checkpoint.hf_dir).glob("*.safetensors"))[0]
    reader = subprocess.Popen([sys.executable, "-c", "import hashlib, sys; "
                               "print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())",
                               str(m.path / checkpoint.hf_dir / shard.name)], stdout=subprocess.PIPE, text=True)
    with open(m.path / checkpoint.hf_dir / shard.name, "rb") as f, \
            mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        mapped = hashlib.sha256(mm).hexdigest()
    out, _ = reader.communicate(timeout=120)
    assert mapped == out.strip() == sha(shard)
    st = m.stats()
    assert st["passthrough_opens"] >= 10 and st["passthrough_refused"] == 0, st
    assert st["bytes_served"] == served, st  # the kernel served every byte: no READ reached the daemon


def test_the_cache_holds_each_byte_once(checkpoint: Checkpoint, mounter: Callable[..., Mount]) -> None:
    """After a cold load, the files the kernel serves by passthrough are the cache: while every file is served
    by passthrough (the state warm loads run in), the cache directory holds the checkpoint once (no second copy
    beside content-addressed blocks), index and log included."""
    m = mounter(str(checkpoint.root))
    warm(m, checkpoint.root)
    names = _files(checkpoint.root)
    before = m.stats()["passthrough_opens"]
    for name in names:
        assert sha(m.path / name) == sha(checkpoint.root / name), name
    total = sum((checkpoint.root / n).stat().st_size for n in names)
    st = m.stats()
    assert st["passthrough_opens"] == before + len(names) and st["bytes_in_cache"] == total, st
    everything = [p for p in m.cache_dir.rglob("*") if p.is_file()]
    assert allocated(everything) <= 1.05 * total, (allocated(everything), total)


def test_the_open_after_a_load_completes_a_file_is_passthrough(checkpoint: Checkpoint,
                                                                mounter: Callable[..., Mount]) -> None:
    """In the same daemon, with no wait for quiet and no copy built: once a file's last extent is in, its next
    open is served by the kernel."""
    m = mounter(str(checkpoint.root))
    name = checkpoint.torch_file
    assert sha(m.path / name) == sha(checkpoint.root / name)  # cold: through the daemon
    assert eventually(lambda: idle(m)), m.stats()
    before = m.stats()
    assert before["files_complete"] >= 1, before
    with open(m.path / name, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == sha(checkpoint.root / name)
    after = m.stats()
    assert after["passthrough_opens"] == before["passthrough_opens"] + 1, after
    assert after["bytes_served"] == before["bytes_served"] and after["gets"] == before["gets"], after


def cold_load_shards(m: Mount, ckpt: Checkpoint) -> dict[str, int]:
    """load_file of every shard through a fresh mount, each checked against the source; the daemon's counters."""
    shards = sorted((ckpt.root / ckpt.hf_dir).glob("*.safetensors"))
    for shard in shards:
        got, want = load_file(m.path / ckpt.hf_dir / shard.name), load_file(shard)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), shard.name
    return m.stats()


def test_a_cold_load_reads_each_shard_by_passthrough_once_it_has_arrived(checkpoint: Checkpoint,
                                                                         mounter: Callable[..., Mount]) -> None:
    """The first open of a shard still arriving waits for its last byte and is answered by passthrough: the
    loader reads it at local-disk speed while the next shards arrive, not one byte goes through a READ (no
    copy into a reply), and each byte is fetched once."""
    st = cold_load_shards(mounter(str(checkpoint.root)), checkpoint)
    shards = sorted((checkpoint.root / checkpoint.hf_dir).glob("*.safetensors"))
    assert st["bytes_served"] == 0 and st["passthrough_opens"] >= len(shards), st
    assert st["open_waits"] >= 1 and st["open_wait_expired"] == 0, st
    assert st["bytes_fetched"] == sum(p.stat().st_size for p in shards), st


def test_passthrough_wait_0_serves_a_cold_load_through_the_daemon(checkpoint: Checkpoint,
                                                                  mounter: Callable[..., Mount]) -> None:
    """The first shard is read through the daemon while it arrives (the others may be complete by their opens)."""
    st = cold_load_shards(mounter(str(checkpoint.root), args=["-o", "mount.passthrough_wait=0"]), checkpoint)
    first = sorted((checkpoint.root / checkpoint.hf_dir).glob("*.safetensors"))[0]
    assert st["bytes_served"] >= first.stat().st_size and st["open_waits"] == 0, st


def test_a_new_daemon_on_a_complete_cache_opens_every_file_by_passthrough(checkpoint: Checkpoint,
                                                                          mounter: Callable[..., Mount]) -> None:
    """A daemon restarted right after a cold load: every open of the next load is a passthrough open (each
    file checked once, ahead of its open where it can be), no READ reaches the daemon and nothing is fetched."""
    m = mounter(str(checkpoint.root))
    warm(m, checkpoint.root)
    m.umount()
    m = m.remount()
    drop_caches()
    names = _files(checkpoint.root)
    for name in names:
        assert sha(m.path / name) == sha(checkpoint.root / name), name
    st = m.stats()
    assert st["passthrough_opens"] == len(names) and st["bytes_served"] == 0 and st["gets"] == 0, st
    assert st["extents_verified"] > 0 and st["files_corrupt"] == 0, st  # checked before the kernel got them


def test_a_damaged_cache_file_is_found_before_it_is_served(checkpoint: Checkpoint,
                                                           mounter: Callable[..., Mount]) -> None:
    """A byte changed in every cache file between two daemons (bit rot, a stray write): the next daemon's
    check before the first passthrough open finds it, drops that extent and fetches it again; the loader
    gets the right bytes, and once the file is whole again its opens are passthrough opens."""
    m = mounter(str(checkpoint.root))
    warm(m, checkpoint.root)
    m.umount()
    files = cache_files(m)
    assert len(files) == len(_files(checkpoint.root))
    for path in files:  # one byte changed in each, as bit rot or a stray write would
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x40]))
    m = m.remount()
    # The check fails: a checkpoint file's open waits for the damaged extent to be fetched again and is then
    # served by passthrough (`mount.passthrough_wait`); any other file is served through the daemon meanwhile.
    for name in _files(checkpoint.root):
        assert sha(m.path / name) == sha(checkpoint.root / name), name
    st = m.stats()
    assert st["files_corrupt"] == len(files) and st["corrupt_extents"] == len(files), st
    weights = [n for n in _files(checkpoint.root) if n.endswith((".safetensors", ".pt"))]
    assert st["passthrough_opens"] == len(weights) and st["gets"] >= len(files), st
    assert eventually(lambda: idle(m) and m.stats()["files_complete"] == len(files)), m.stats()
    drop_caches()
    opens = m.stats()["passthrough_opens"]
    for name in _files(checkpoint.root):
        assert sha(m.path / name) == sha(checkpoint.root / name), name
    assert m.stats()["passthrough_opens"] == opens + len(files)


def test_a_new_version_upstream_while_a_passthrough_handle_is_open(tmp_path: Path, checkpoint: Checkpoint,
                                                                   mounter: Callable[..., Mount]) -> None:
    """The old handle keeps its version's bytes (from its cache file), a new open sees the new version."""
    src = tmp_path / "src"
    shutil.copytree(checkpoint.root / "run42", src)
    name = "step-100.pt"
    old = (src / name).read_bytes()
    m = mounter(str(src), args=["-o", "mount.metadata_ttl=1"])
    warm(m, src)
    opens = m.stats()["passthrough_opens"]
    with open(m.path / name, "rb") as held:
        assert m.stats()["passthrough_opens"] == opens + 1
        new = bytes(b ^ 0xFF for b in old[:4096]) + old[4096:]
        tmp = src / "new.tmp"
        tmp.write_bytes(new)
        os.utime(tmp, (time.time() + 5, time.time() + 5))
        os.replace(tmp, src / name)
        assert eventually(lambda: (m.path / name).read_bytes() == new)  # a new open: the new version
        drop_caches()
        held.seek(0)
        assert held.read() == old  # the held handle: its version, from its cache file
    assert len(cache_files(m)) == 2  # one file per version


def test_eviction_under_the_quota_with_a_passthrough_file_open(tmp_path: Path, checkpoint: Checkpoint,
                                                               mounter: Callable[..., Mount]) -> None:
    """A quota smaller than the checkpoint, one file held open by passthrough while every other file is loaded:
    the others evict each other, never a byte of the held file (the kernel reads it at any time); loads stay
    right and the quota holds."""
    sizes = {n: (checkpoint.root / n).stat().st_size for n in _files(checkpoint.root)}
    big = max(sizes, key=lambda n: sizes[n])
    quota = sizes[big] + int(1.5 * max(s for n, s in sizes.items() if n != big))
    assert quota < sum(sizes.values())
    m = mounter(str(checkpoint.root), args=["-o", f"cache.max_size={quota}", "-o", "cache.min_free=0",
                                            "-o", "prefetch.checkpoint_sets=false"])
    assert sha(m.path / big) == sha(checkpoint.root / big)
    assert eventually(lambda: idle(m) and m.stats()["files_complete"] == 1), m.stats()
    opens = m.stats()["passthrough_opens"]
    with open(m.path / big, "rb") as held:
        assert m.stats()["passthrough_opens"] == opens + 1
        for _ in range(2):
            for name in sizes:
                if name != big:
                    assert sha(m.path / name) == sha(checkpoint.root / name), name
        assert eventually(lambda: idle(m)), m.stats()
        drop_caches()
        assert hashlib.sha256(held.read()).hexdigest() == sha(checkpoint.root / big)
        st = m.stats()
        assert st["evictions"] > 0 and st["bytes_in_cache"] <= quota, st
        assert allocated(cache_files(m)) <= quota, (allocated(cache_files(m)), quota)


def test_sigterm_with_passthrough_files_open_exits_within_the_grace(checkpoint: Checkpoint,
                                                                    mounter: Callable[..., Mount]) -> None:
    m = mounter(str(checkpoint.root))
    warm(m, checkpoint.root)
    name = checkpoint.torch_file
    with open(m.path / name, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert m.stats()["passthrough_opens"] >= 1
        assert hashlib.sha256(mm).hexdigest() == sha(checkpoint.root / name)
        os.kill(m.pid, signal.SIGTERM)
        deadline = time.monotonic() + 60  # a hang bound: the daemon's grace is seconds
        while alive(m.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(m.pid), "the daemon did not exit on SIGTERM with passthrough files open"


def test_passthrough_off_serves_every_read_through_the_daemon(checkpoint: Checkpoint,
                                                              mounter: Callable[..., Mount]) -> None:
    m = mounter(str(checkpoint.root), args=["-o", "mount.passthrough=off"])
    for _ in range(2):
        drop_caches()
        load_everything(m.path, checkpoint.root, checkpoint)
    st = m.stats()
    assert st["passthrough_opens"] == 0 and st["bytes_served"] > 0 and st["files_complete"] > 0, st


def test_passthrough_on_starts_where_the_kernel_offers_it(checkpoint: Checkpoint,
                                                          mounter: Callable[..., Mount]) -> None:
    m = mounter(str(checkpoint.root), args=["-o", "mount.passthrough=on"])
    warm(m, checkpoint.root)
    assert "FUSE passthrough on" in (m.cache_dir / "modelfs.log").read_text()
