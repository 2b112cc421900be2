"""Running as a service: systemd units, sd_notify readiness, SIGTERM, the mount helper, metrics, status."""

from __future__ import annotations

import errno
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

from modelfs.catalog.index import ChunkIndex
from modelfs.service import mount
from modelfs.service.mount import is_mounted
from modelfs.stats import human
from tests.conftest import Checkpoint, Mount, cli, requires_fuse
from tests.conftest import sha256_file as sha
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.seaweed import SeaweedServer

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
                                                  "import sys; from modelfs.service.cli import mount_helper; "
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


def cached_versions(cache_dir: Path) -> dict[str, tuple[Path, dict[int, tuple[bytes, int]]]]:
    """key -> (its version file, {start: (hash, length)} of the extents present in it), from the index of a
    cache dir no daemon holds."""
    index = ChunkIndex(str(cache_dir / "index"), 1 << 30)
    try:
        present = index.present()
        return {str(rec["key"]): (cache_dir / "files" / vid.hex(), present.get(vid, {}))
                for vid, rec in index.versions().items()}
    finally:
        index.close()


def version_of(cache_dir: Path, rel: str) -> tuple[Path, dict[int, tuple[bytes, int]]]:
    (found,) = [v for key, v in cached_versions(cache_dir).items() if key.endswith(rel)]
    return found


def ls_rows(cache_dir: str) -> tuple[dict[str, tuple[str, str, bool]], str]:
    """`modelfs cache ls`: key -> (cached, size, pinned) as shown, and the total line's amount."""
    r = cli("cache", "ls", "--cache-dir", cache_dir)
    assert r.returncode == 0, r.stderr
    rows: dict[str, tuple[str, str, bool]] = {}
    total = ""
    for line in r.stdout.splitlines()[1:]:
        if line.endswith("total in cache files"):
            total = line[:11].strip()
            continue
        m = re.fullmatch(r"\s*([0-9.]+ [KMGT]?i?B)\s+([0-9.]+ [KMGT]?i?B)  (yes|   )  (\S+)  (\S+)", line)
        assert m, line
        rows[m.group(5)] = (m.group(1), m.group(2), m.group(3) == "yes")
    assert total, r.stdout
    return rows, total


def flip(path: Path, at: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 1]), at)
    finally:
        os.close(fd)


def is_hole(path: Path, start: int, length: int) -> bool:
    """Whether [start, start+length) of a sparse file holds no data (punched out)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            return os.lseek(fd, start, os.SEEK_DATA) >= start + length
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data from there to the end of the file
                return True
            raise
    finally:
        os.close(fd)


def test_cache_admin_ls_verify_pin_gc(checkpoint: Checkpoint, mounter: Callable[..., Mount]) -> None:
    """`modelfs cache` on version files: ls shows each file version's cached bytes and the total in cache
    files; verify reads back every present extent, and drops a bad one when no daemon holds the cache dir,
    only reports it while one does (that daemon checks the file before its first use); gc --to SIZE punches
    the least recently used extents of unpinned models, and pins keep a model's extents."""
    m = mounter(str(checkpoint.root), args=["-o", "prefetch.checkpoint_sets=false"])
    shard = sorted(f for f in checkpoint.files() if f.endswith(".safetensors"))[0]
    sizes = checkpoint.files()
    (m.path / shard).read_bytes()
    (m.path / checkpoint.torch_file).read_bytes()  # used after the shard: more recently
    in_cache = m.stats()["bytes_in_cache"]
    assert in_cache == sizes[shard] + sizes[checkpoint.torch_file], m.stats()
    m.umount()
    cache = str(m.cache_dir)
    rows, total = ls_rows(cache)
    assert rows[shard] == (human(sizes[shard]), human(sizes[shard]), False), rows
    assert rows[checkpoint.torch_file] == (human(sizes[checkpoint.torch_file]),) * 2 + (False,), rows
    assert total == human(in_cache)
    torch_path, torch_extents = version_of(m.cache_dir, checkpoint.torch_file)
    shard_path, shard_extents = version_of(m.cache_dir, shard)
    torch_ref = (checkpoint.root / checkpoint.torch_file).read_bytes()
    assert torch_path.read_bytes() == torch_ref and shard_path.read_bytes() == (checkpoint.root / shard).read_bytes()
    extents = len(torch_extents) + len(shard_extents)
    first, second = sorted(torch_extents)[:2]

    # A flipped byte while a daemon holds the cache dir: reported, not dropped (the daemon's accounting is
    # its own); the daemon finds it when the file is first opened (it checks nothing at its start here: that
    # would race the report), and fetches that extent again.
    flip(torch_path, second + 100)
    live = m.remount(args=[*m.args, "-o", "cache.check_at_start=0"])
    report = cli("cache", "verify", "--cache-dir", cache, "-q")
    assert report.returncode == 1 and f"{extents} extents checked, 1 corrupt" in report.stdout, report.stdout
    assert f"{torch_path.name} at {second}" in report.stderr, report.stderr
    assert torch_path.read_bytes() != torch_ref and not is_hole(torch_path, second, torch_extents[second][1])
    assert ls_rows(cache)[0][checkpoint.torch_file][0] == human(sizes[checkpoint.torch_file])  # still present
    assert sha(live.path / checkpoint.torch_file) == sha(checkpoint.root / checkpoint.torch_file)
    st = live.stats()
    assert st["corrupt_extents"] == 1 and st["gets"] == 1, st
    live.umount()
    assert torch_path.read_bytes() == torch_ref  # written again in place
    assert cli("cache", "verify", "--cache-dir", cache, "-q").returncode == 0

    # With no daemon: the bad extent is dropped (punched out, no longer present), the rest kept.
    flip(torch_path, first + 5)
    bad = cli("cache", "verify", "--cache-dir", cache, "-q")
    assert bad.returncode == 1 and f"{extents} extents checked, 1 corrupt" in bad.stdout, bad.stdout
    assert f"{torch_path.name} at {first}" in bad.stderr, bad.stderr
    _, now = version_of(m.cache_dir, checkpoint.torch_file)
    assert sorted(now) == sorted(s for s in torch_extents if s != first)
    assert is_hole(torch_path, first, torch_extents[first][1])
    torch_cached = sizes[checkpoint.torch_file] - torch_extents[first][1]
    assert ls_rows(cache)[0][checkpoint.torch_file][0] == human(torch_cached)
    good = cli("cache", "verify", "--cache-dir", cache, "-q")
    assert good.returncode == 0 and f"{extents - 1} extents checked, 0 corrupt" in good.stdout, good.stdout

    # gc --to SIZE: least recently used first, and no more than it takes: the shard (used first, complete) goes
    # whole, its file deleted (a complete file may still be mapped through passthrough, so it is never punched);
    # the torch checkpoint (used last, incomplete since verify dropped an extent) keeps all of its own.
    target = torch_cached + sizes[shard] // 2
    gc = cli("cache", "gc", "--to", str(target), "--cache-dir", cache)
    assert gc.returncode == 0, gc.stderr
    _, torch_now = version_of(m.cache_dir, checkpoint.torch_file)
    _, shard_now = version_of(m.cache_dir, shard)
    assert sorted(torch_now) == sorted(now) and shard_now == {}
    assert not shard_path.exists() and torch_path.exists()
    rows, total = ls_rows(cache)
    assert rows[shard][0] == "0 B" and total == human(torch_cached), (rows, total)

    # An incomplete file is punched extent by extent, least recently used first, no more than it takes.
    keep = torch_cached - sum(sorted(n for _, n in now.values())[:2])
    gc = cli("cache", "gc", "--to", str(keep), "--cache-dir", cache)
    assert gc.returncode == 0, gc.stderr
    _, torch_now = version_of(m.cache_dir, checkpoint.torch_file)
    kept = sum(length for _, length in torch_now.values())
    assert keep - max(n for _, n in now.values()) < kept <= keep and torch_path.exists(), (kept, keep)
    for start, (_, length) in now.items():
        assert is_hole(torch_path, start, length) == (start not in torch_now), start
    torch_cached = kept

    # Pin the torch checkpoint, gc everything else away.
    assert cli("cache", "pin", checkpoint.torch_file.split("/")[0] + "/", "--cache-dir", cache).returncode == 0
    gc = cli("cache", "gc", "--to", "0", "--cache-dir", cache)
    assert gc.returncode == 0, gc.stderr
    rows, total = ls_rows(cache)
    assert rows[checkpoint.torch_file] == (human(torch_cached), human(sizes[checkpoint.torch_file]), True), rows
    assert rows[shard][0] == "0 B" and not rows[shard][2]  # not pinned: evicted
    assert total == human(torch_cached)
    assert not shard_path.exists()  # a file left with no extent is deleted
    assert cli("cache", "unpin", checkpoint.torch_file.split("/")[0] + "/", "--cache-dir", cache).returncode == 0
    assert cli("cache", "gc", "--to", "0", "--cache-dir", cache).returncode == 0
    assert not list((m.cache_dir / "files").iterdir())
    assert ls_rows(cache)[1] == "0 B"
