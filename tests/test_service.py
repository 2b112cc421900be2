"""Running as a service: systemd units, sd_notify readiness, SIGTERM, the mount helper, metrics, status."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from modelfs import mount
from modelfs.mount import is_mounted
from modelfs.testing.faultproxy import Fault, FaultProxy
from modelfs.testing.seaweed import SeaweedServer
from tests.conftest import Checkpoint, Mount, cli, requires_fuse
from tests.conftest import sha256_file as sha

pytestmark = [requires_fuse, pytest.mark.mount]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("unit", ["mnt-models.mount"])  # modelfs@.service: verified as installed, test_install
def test_systemd_units_verify(unit: str, tmp_path: Path) -> None:
    text = (REPO / "systemd" / unit).read_text()
    name = unit
    (tmp_path / name).write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True,
                       cwd=tmp_path)
    problems = [line for line in r.stderr.splitlines() if name.split("@")[0] in line or "modelfs" in line]
    assert r.returncode == 0 and not problems, r.stderr


def _foreground(source: str, mnt: Path, cache: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "modelfs", "mount", source, str(mnt), "--cache-dir", str(cache),
                             "--foreground", *args], env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_notify_ready_only_once_serving_then_stopping_on_sigterm(checkpoint: Checkpoint, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(120)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    daemon = _foreground(str(checkpoint.root), mnt, tmp_path / "cache", {"NOTIFY_SOCKET": str(sock_path)})
    try:
        first = sock.recv(4096).decode()
        assert "READY=1" in first and "STATUS=served" in first, first
        # READY came only once the mount serves: a file reads right away.
        assert sha(mnt / checkpoint.torch_file) == sha(checkpoint.root / checkpoint.torch_file)
        daemon.send_signal(signal.SIGTERM)
        messages = []
        while not any("STOPPING=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        assert daemon.wait(timeout=60) == 0
        assert not is_mounted(str(mnt))
    finally:
        if daemon.poll() is None:
            daemon.kill()
        if is_mounted(str(mnt)):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        sock.close()


def test_sigterm_with_a_blocked_reader_unmounts_and_exits(seaweed: SeaweedServer, s3_checkpoint: str,
                                                          checkpoint: Checkpoint, tmp_path: Path) -> None:
    with FaultProxy(seaweed.endpoint_url) as proxy:
        env = {**seaweed.env(), "AWS_ENDPOINT_URL": proxy.endpoint_url}
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        daemon = _foreground(s3_checkpoint, mnt, tmp_path / "cache", env, "-o", "prefetch.whole_file=false",
                             "-o", "fetch.deadline=600")
        reader = None
        try:
            assert _wait_mounted(mnt)
            proxy.add_rule(Fault.stall(600), method="GET", path_contains="step-100")
            target = str(mnt / checkpoint.torch_file)
            reader = subprocess.Popen([sys.executable, "-c", f"open({target!r}, 'rb').read()"],
                                      stderr=subprocess.DEVNULL)
            assert proxy.wait_stalled(1, timeout=60)
            began = time.monotonic()
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=60) == 0
            # The blocked READ is given the grace (SHUTDOWN_GRACE, 5 s), then cancelled and answered: the
            # daemon is gone after the grace and well before the watchdog's fusectl abort would be needed.
            # The upper bound allows 4 s beyond the grace for the unmount on a loaded machine; a longer grace,
            # or a daemon left to the watchdog, fails it.
            took = time.monotonic() - began
            assert mount.SHUTDOWN_GRACE <= took < min(mount.SHUTDOWN_GRACE + 4, mount.ABORT_AFTER), took
            assert not is_mounted(str(mnt))
            assert reader.wait(timeout=60) != 0  # the blocked reader got an error, not a hang
        finally:
            for p in (daemon, reader):
                if p is not None and p.poll() is None:
                    p.kill()
            if is_mounted(str(mnt)):
                subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
            proxy.release()


def _wait_mounted(mnt: Path, limit: float = 120) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            if is_mounted(str(mnt)) and os.getxattr(mnt, "user.modelfs.pid"):
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def test_mount_helper_and_umount(checkpoint: Checkpoint, tmp_path: Path) -> None:
    helper = BIN / "mount.modelfs"
    cmd = [str(helper)] if helper.exists() else [sys.executable, "-c",
                                                  "import sys; from modelfs.cli import mount_helper; "
                                                  "sys.exit(mount_helper())"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = f"rw,_netdev,nofail,cache_dir={tmp_path / 'cache'},prefetch.whole_file=false"
    r = subprocess.run([*cmd, str(checkpoint.root), str(mnt), "-o", opts], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    pid = int(os.getxattr(mnt, "user.modelfs.pid"))
    try:
        assert sorted(os.listdir(mnt)) == sorted(os.listdir(checkpoint.root))
        assert subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0
        assert not is_mounted(str(mnt))
    finally:
        if is_mounted(str(mnt)):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    bad = subprocess.run([*cmd, str(checkpoint.root), str(mnt), "-o", "bogus"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown mount option 'bogus'" in bad.stderr


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(modelfs_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_metrics_move_by_the_right_amounts(seaweed: SeaweedServer, s3_checkpoint: str, checkpoint: Checkpoint,
                                          mounter: Callable[..., Mount]) -> None:
    port = free_port()
    m = mounter(s3_checkpoint, env=seaweed.env(), args=["-o", f"metrics.address=127.0.0.1:{port}",
                                                       "-o", "prefetch.whole_file=false",
                                                       "-o", "prefetch.sequential=false"])
    before = _scrape(port)
    size = checkpoint.files()[checkpoint.torch_file]
    assert sha(m.path / checkpoint.torch_file) == sha(checkpoint.root / checkpoint.torch_file)
    after = _scrape(port)
    assert after["modelfs_bytes_served_total"] - before["modelfs_bytes_served_total"] == size
    assert after["modelfs_bytes_fetched_total"] - before["modelfs_bytes_fetched_total"] == size
    gets = after["modelfs_gets_total"] - before["modelfs_gets_total"]
    assert gets >= 1 and after["modelfs_fetch_seconds_count"] - before.get("modelfs_fetch_seconds_count", 0) == gets
    assert after["modelfs_bytes_in_cache"] >= size and after['modelfs_errors_total{kind="store_errors"}'] == 0
    assert after["modelfs_offline"] == 0


def test_status_for_liveness_probes(seaweed: SeaweedServer, s3_checkpoint: str,
                                    mounter: Callable[..., Mount]) -> None:
    with FaultProxy(seaweed.endpoint_url) as proxy:
        env = {**seaweed.env(), "AWS_ENDPOINT_URL": proxy.endpoint_url}
        m = mounter(s3_checkpoint, env=env, args=["-o", "s3.read_timeout=1", "-o", "s3.max_attempts=2",
                                                  "-o", "fetch.deadline=5"])
        ok = cli("status", str(m.path), env=env)
        assert ok.returncode == 0 and "store reachable  ok" in ok.stdout, ok.stdout
        proxy.blackhole(True)
        down = cli("status", str(m.path), env=env)
        assert down.returncode == 1 and "store reachable  FAILED" in down.stdout, down.stdout
        proxy.blackhole(False)
    gone = cli("status", str(m.path.parent / "nowhere"))
    assert gone.returncode == 1


def test_cache_admin_ls_verify_pin_gc(checkpoint: Checkpoint, mounter: Callable[..., Mount]) -> None:
    m = mounter(str(checkpoint.root), args=["-o", "prefetch.checkpoint_sets=false"])
    shard = sorted(f for f in checkpoint.files() if f.endswith(".safetensors"))[0]
    (m.path / shard).read_bytes()
    (m.path / checkpoint.torch_file).read_bytes()
    m.umount()
    cache = str(m.cache_dir)
    ls = cli("cache", "ls", "--cache-dir", cache)
    assert ls.returncode == 0 and shard in ls.stdout and checkpoint.torch_file in ls.stdout, ls.stdout
    # A flipped block is found and dropped by verify.
    blocks = sorted(p for p in (m.cache_dir / "blocks").rglob("*") if p.is_file())
    raw = bytearray(blocks[0].read_bytes())
    raw[0] ^= 1
    blocks[0].write_bytes(bytes(raw))
    bad = cli("cache", "verify", "--cache-dir", cache, "-q")
    assert bad.returncode == 1 and "1 corrupt" in bad.stdout and not blocks[0].exists()
    assert cli("cache", "verify", "--cache-dir", cache, "-q").returncode == 0
    # Pin the torch checkpoint, gc everything else away.
    assert cli("cache", "pin", checkpoint.torch_file.split("/")[0] + "/", "--cache-dir", cache).returncode == 0
    gc = cli("cache", "gc", "--to", "0", "--cache-dir", cache)
    assert gc.returncode == 0, gc.stderr
    after = cli("cache", "ls", "--cache-dir", cache).stdout
    torch_line = next(line for line in after.splitlines() if line.endswith(checkpoint.torch_file))
    shard_line = next(line for line in after.splitlines() if line.endswith(shard))
    assert "yes" in torch_line and not torch_line.strip().startswith("0 B")  # pinned: kept
    assert shard_line.strip().startswith("0 B")  # not pinned: evicted
    assert cli("cache", "unpin", checkpoint.torch_file.split("/")[0] + "/", "--cache-dir", cache).returncode == 0
    assert cli("cache", "gc", "--to", "0", "--cache-dir", cache).returncode == 0
    assert not [p for p in (m.cache_dir / "blocks").rglob("*") if p.is_file()]
