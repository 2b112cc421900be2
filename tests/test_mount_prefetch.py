"""Prefetch through real mounts (SeaweedFS S3): warm-up CLI, concurrent loaders, page-cache push."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Checkpoint, Mount, cli, eventually, requires_fuse

pytestmark = [requires_fuse, pytest.mark.mount, pytest.mark.s3]

LOAD_SCRIPT = """
import sys, torch
from tests.support.checkpoints import load_all_safetensors
tensors = load_all_safetensors(__import__("pathlib").Path(sys.argv[1]))
ref = torch.load(sys.argv[2], weights_only=True)
assert tensors.keys() == ref.keys()
assert all(torch.equal(tensors[k], ref[k]) for k in ref)
"""


def test_prefetch_cli_warms_the_cache_then_a_load_needs_no_get(seaweed: object, s3_checkpoint: str,
                                                               checkpoint: Checkpoint,
                                                               mounter: Callable[..., Mount]) -> None:
    m = mounter(s3_checkpoint, env=seaweed.env())  # type: ignore[attr-defined]
    r = cli("prefetch", str(m.path / checkpoint.hf_dir), env=m.env)
    assert r.returncode == 0, r.stderr
    assert "prefetch" in r.stderr and "B/s" in r.stderr  # tqdm progress: bytes and rate
    hf_bytes = sum(s for f, s in checkpoint.files().items() if f.startswith(checkpoint.hf_dir))
    stats = m.stats()
    assert stats["bytes_fetched"] == hf_bytes
    for f in checkpoint.files():
        if f.startswith(checkpoint.hf_dir):
            assert int(__import__("os").getxattr(m.path / f, "user.modelfs.cached")) == checkpoint.files()[f]
    gets = stats["gets"]
    (m.path / checkpoint.hf_dir / "model.safetensors.index.json").read_bytes()
    for f in sorted((m.path / checkpoint.hf_dir).glob("*.safetensors")):
        f.read_bytes()
    assert m.stats()["gets"] == gets
    bad = cli("prefetch", "/proc/version")
    assert bad.returncode != 0 and "not on a modelfs mount" in bad.stderr


def test_four_processes_loading_at_once_fetch_each_byte_once(seaweed: object, s3_checkpoint: str,
                                                             checkpoint: Checkpoint, tmp_path: Path,
                                                             mounter: Callable[..., Mount]) -> None:
    torch = pytest.importorskip("torch")
    ref = tmp_path / "ref.pt"
    torch.save(checkpoint.safetensors, ref)
    m = mounter(s3_checkpoint, env=seaweed.env())  # type: ignore[attr-defined]
    procs = [subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT, str(m.path / checkpoint.hf_dir), str(ref)])
             for _ in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0, 0]
    hf_bytes = sum(s for f, s in checkpoint.files().items() if f.startswith(checkpoint.hf_dir))
    stats = m.stats()
    assert stats["bytes_fetched"] <= hf_bytes * 1.02, stats


def test_cold_load_with_prefetch_fetches_each_byte_once(seaweed: object, s3_checkpoint: str, checkpoint: Checkpoint,
                                                    mounter: Callable[..., Mount]) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    m = mounter(s3_checkpoint, env=seaweed.env())  # type: ignore[attr-defined]
    hf = m.path / checkpoint.hf_dir
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        for name, t in load_file(hf / shard).items():
            assert torch.equal(t, checkpoint.safetensors[name])
    stats = m.stats()
    assert stats["pushed_bytes"] == 0  # page-cache push, off by default (`make bench`: it cost more than it saved)
    assert stats["prefetch_bytes"] > 0
    hf_bytes = sum(s for f, s in checkpoint.files().items() if f.startswith(checkpoint.hf_dir))
    assert stats["bytes_fetched"] <= hf_bytes * 1.02


def test_an_opened_checkpoint_is_pushed_into_the_page_cache(seaweed: object, s3_checkpoint: str,
                                                            checkpoint: Checkpoint,
                                                            mounter: Callable[..., Mount]) -> None:
    """The first read of an opened shard pushes all the rest of it into the kernel page cache, so reading
    it through that fd afterwards never reaches the daemon. (`pushed_bytes` alone only counts what the
    daemon handed to notify_store.) An open alone fetches nothing: the kernel may hold the file. Push is off by
    default: this mount turns it on."""
    # (pushes are for opens served through the daemon: with push on, an open does not wait to be passthrough)
    m = mounter(s3_checkpoint, env=seaweed.env(), args=["-o", "prefetch.page_cache_push=true"])  # type: ignore[attr-defined]
    shard = sorted(f for f in checkpoint.files() if f.startswith(checkpoint.hf_dir) and f.endswith(".safetensors"))[0]
    size = checkpoint.files()[shard]
    fd = os.open(m.path / shard, os.O_RDONLY)
    try:
        time.sleep(1)
        assert m.stats()["bytes_fetched"] == 0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: the READ asks for one page
        assert os.pread(fd, 1, 0) == (checkpoint.root / shard).read_bytes()[:1]  # starts whole-file prefetch
        first = m.stats()["bytes_served"]
        # No other READ until the push is done: the daemon leaves bytes a READ already answered out of a push.
        assert eventually(lambda: m.stats()["pushed_bytes"] >= size - first), m.stats()
        before = m.stats()
        assert before["pushed_bytes"] == size - first and before["push_errors"] == 0, before
        assert before["bytes_served"] == first <= 1 << 20, before
        got = bytearray()
        while chunk := os.pread(fd, 1 << 20, len(got)):
            got += chunk
        assert bytes(got) == (checkpoint.root / shard).read_bytes()
        after = m.stats()
        # Every byte came from the page cache: the kernel sent the daemon no READ.
        assert after["bytes_served"] == before["bytes_served"], after
    finally:
        os.close(fd)


DIRECT_READ = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT wants
out = open(sys.argv[2], "wb")
pos = 0
while True:
    n = os.preadv(fd, [buf], pos)
    out.write(buf[:n])
    pos += n
    if n < len(buf):
        break
"""


def read_direct(path: Path, out: Path) -> bytes:
    r = subprocess.run([sys.executable, "-c", DIRECT_READ, str(path), str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return out.read_bytes()


def idle(m: Mount) -> bool:
    st = m.stats()
    return st["fetches_in_flight"] == 0 and st["prefetch_queue"] == 0


@pytest.mark.parametrize("cold", ["passthrough", "daemon"])
def test_a_loader_reading_with_o_direct_gets_every_byte_and_nothing_is_pushed(cold: str, seaweed: object,
                                                                              s3_checkpoint: str,
                                                                              checkpoint: Checkpoint, tmp_path: Path,
                                                                              mounter: Callable[..., Mount]) -> None:
    """Loaders that bypass the page cache (Run:ai Model Streamer's io_uring_direct, fastsafetensors) read with
    O_DIRECT in large aligned pieces: cold (by passthrough once the open has waited for the file's last byte,
    or through the daemon while the file fills, `mount.passthrough_wait=0`) and again from a new daemon (the
    file complete: the kernel reads the cache file, O_DIRECT too), every byte is the source's, and the daemon
    hands nothing to a page cache they never read."""
    shard = sorted(f for f in checkpoint.files() if f.startswith(checkpoint.hf_dir) and f.endswith(".safetensors"))[0]
    want = (checkpoint.root / shard).read_bytes()
    args = ["-o", "mount.passthrough_wait=0"] if cold == "daemon" else []
    m = mounter(s3_checkpoint, env=seaweed.env(), args=args)  # type: ignore[attr-defined]
    assert read_direct(m.path / shard, tmp_path / "cold.bin") == want
    st = m.stats()
    if cold == "daemon":
        assert st["pushed_bytes"] == 0 and st["bytes_served"] > 0, st  # through the daemon, nothing pushed
    else:
        assert st["passthrough_opens"] == 1 and st["bytes_served"] == 0 and st["open_waits"] == 1, st
    assert eventually(lambda: idle(m)), m.stats()
    hf_bytes = sum(s for f, s in checkpoint.files().items() if f.startswith(checkpoint.hf_dir))
    assert m.stats()["bytes_fetched"] <= hf_bytes * 1.02, m.stats()  # the shard and its set, each byte once
    m.umount()
    m = m.remount()
    Path("/proc/sys/vm/drop_caches").write_text("3")
    assert read_direct(m.path / shard, tmp_path / "warm.bin") == want
    st = m.stats()
    assert st["passthrough_opens"] == 1 and st["bytes_served"] == 0 and st["gets"] == 0, st
