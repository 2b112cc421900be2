"""FUSE passthrough through real mounts and the real kernel: a file whose every extent is cached gets a
verified whole-file copy, and later opens of it are served by the kernel from that copy, with no READ
reaching the daemon (`bytes_served` stays put). Loaders must see the source's bytes whichever way.

The rest of the suite runs mostly on the READ path (a file's first open in a daemon has no copy yet);
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

from modelfs.mount import alive
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
    """Read every file once (through the daemon: no copy yet), then wait until each has its copy."""
    names = _files(src)
    for name in names:
        assert sha(m.path / name) == sha(src / name), name
    assert eventually(lambda: m.stats()["backing_files"] >= len(names)), m.stats()


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
    assert st["backing_bytes"] == sum((checkpoint.root / n).stat().st_size for n in _files(checkpoint.root))


def test_a_damaged_copy_is_found_before_it_is_served_and_built_again(tmp_path: Path, checkpoint: Checkpoint,
                                                                      mounter: Callable[..., Mount]) -> None:
    m = mounter(str(checkpoint.root))
    warm(m, checkpoint.root)
    m.umount()
    copies = sorted((m.cache_dir / "backing").iterdir())
    assert len(copies) == len(_files(checkpoint.root))
    for copy in copies:  # one byte changed in each, as bit rot or a stray write would
        with open(copy, "r+b") as f:
            f.seek(os.path.getsize(copy) // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x40]))
    m = m.remount()
    for name in _files(checkpoint.root):  # the check fails: served through the daemon, right bytes
        assert sha(m.path / name) == sha(checkpoint.root / name), name
    st = m.stats()
    assert st["backing_corrupt"] == len(copies) and st["passthrough_opens"] == 0, st
    assert eventually(lambda: m.stats()["backing_built"] >= len(copies)), m.stats()
    drop_caches()
    for name in _files(checkpoint.root):
        assert sha(m.path / name) == sha(checkpoint.root / name), name
    assert m.stats()["passthrough_opens"] == len(copies)


def test_a_new_version_upstream_while_a_passthrough_handle_is_open(tmp_path: Path, checkpoint: Checkpoint,
                                                                   mounter: Callable[..., Mount]) -> None:
    """The old handle keeps its version's bytes (from its copy), a new open sees the new version, and the
    old version's copy is deleted once nothing uses it."""
    src = tmp_path / "src"
    shutil.copytree(checkpoint.root / "run42", src)
    name = "step-100.pt"
    old = (src / name).read_bytes()
    m = mounter(str(src), args=["-o", "mount.metadata_ttl=1"])
    warm(m, src)
    copy_of_old = next((m.cache_dir / "backing").iterdir())
    with open(m.path / name, "rb") as held:
        assert m.stats()["passthrough_opens"] == 1
        new = bytes(b ^ 0xFF for b in old[:4096]) + old[4096:]
        tmp = src / "new.tmp"
        tmp.write_bytes(new)
        os.utime(tmp, (time.time() + 5, time.time() + 5))
        os.replace(tmp, src / name)
        assert eventually(lambda: (m.path / name).read_bytes() == new)  # a new open: the new version
        drop_caches()
        held.seek(0)
        assert held.read() == old  # the held handle: its version, from its copy
    drop_caches()  # the kernel lets go of the old inode: the daemon drops it, and its copy
    assert eventually(lambda: not copy_of_old.exists() and m.stats()["backing_files"] <= 1), m.stats()


def test_eviction_under_the_quota_with_a_passthrough_file_open(tmp_path: Path, checkpoint: Checkpoint,
                                                               mounter: Callable[..., Mount]) -> None:
    """Copies go before blocks, never one in use; loads stay right and the quota holds."""
    total = sum((checkpoint.root / n).stat().st_size for n in _files(checkpoint.root))
    quota = int(total * 1.4)
    m = mounter(str(checkpoint.root), args=["-o", f"cache.max_size={quota}", "-o", "cache.min_free=0"])
    big = max(_files(checkpoint.root), key=lambda n: (checkpoint.root / n).stat().st_size)
    assert sha(m.path / big) == sha(checkpoint.root / big)
    assert eventually(lambda: m.stats()["backing_files"] == 1)
    with open(m.path / big, "rb") as held:
        assert m.stats()["passthrough_opens"] == 1
        for name in _files(checkpoint.root):  # the rest: blocks, then copies, past the quota
            assert sha(m.path / name) == sha(checkpoint.root / name), name
        time.sleep(3)  # copies are built when the daemon is quiet: give them the chance to press the quota
        for name in _files(checkpoint.root):
            assert sha(m.path / name) == sha(checkpoint.root / name), name
        drop_caches()
        assert hashlib.sha256(held.read()).hexdigest() == sha(checkpoint.root / big)
        st = m.stats()
        assert st["bytes_in_cache"] + st["backing_bytes"] <= quota, st
        assert (m.cache_dir / "backing" / os.listdir(m.cache_dir / "backing")[0]).exists()


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
    assert st["passthrough_opens"] == 0 and st["backing_files"] == 0 and st["bytes_served"] > 0, st
    assert not (m.cache_dir / "backing").exists() or not os.listdir(m.cache_dir / "backing")


def test_passthrough_on_starts_where_the_kernel_offers_it(checkpoint: Checkpoint,
                                                          mounter: Callable[..., Mount]) -> None:
    m = mounter(str(checkpoint.root), args=["-o", "mount.passthrough=on"])
    warm(m, checkpoint.root)
    assert "FUSE passthrough on" in (m.cache_dir / "modelfs.log").read_text()
