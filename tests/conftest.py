"""Fixtures with real components: a SeaweedFS S3 server on loopback, generated checkpoints, real mounts.

Every mount a test makes is lazily unmounted and its daemon killed by pid at teardown, even when the
test fails, so a failing test never leaves a stale mount or a stray process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from modelfs.service.mount import abort_connection, alive, is_mounted, mount_minor
from tests.support.faultproxy import FaultProxy
from tests.support.seaweed import SeaweedServer

BUCKET = "models"
S3_PREFIX = "ckpts/"
CKPT_BYTES = 72 << 20  # >= 64 MiB: many 8 MiB extents per shard


def _fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None and os.geteuid() == 0


requires_fuse = pytest.mark.skipif(not _fuse_available(), reason="needs root, /dev/fuse and fusermount3")

#: Fixtures that start SeaweedFS, and those that mount: a test using one carries the marker, so
#: `-m "not mount and not s3"` (make test-fast) never starts either, whatever its module declares.
S3_FIXTURES = {"seaweed", "s3_checkpoint", "proxy"}
MOUNT_FIXTURES = {"mounter", "tmpfs"}


def pytest_collection_finish(session: pytest.Session) -> None:
    """The fs-verity VM takes minutes: started in the background when its test is selected, so the suite runs
    beside it (`tests/test_verity.py`)."""
    if any(item.nodeid.startswith("tests/test_verity.py") for item in session.items) and _fuse_available():
        from tests.test_verity import VM

        VM.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Never leave the VM running (an interrupted run)."""
    module = sys.modules.get("tests.test_verity")
    if module is not None:
        module.VM.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        if used & S3_FIXTURES or (callspec is not None and callspec.params.get("backend") == "s3"):
            item.add_marker(pytest.mark.s3)
        if used & MOUNT_FIXTURES:
            item.add_marker(pytest.mark.mount)


@dataclass
class Checkpoint:
    """A source tree: an HF-style sharded safetensors dir and a torch zip checkpoint, with their tensors."""

    root: Path
    safetensors: dict[str, Any]
    torch_state: dict[str, Any]
    hf_dir: str = "llama-test"
    torch_file: str = "run42/step-100.pt"

    def files(self) -> dict[str, int]:
        """Relative path -> size of every file in the tree."""
        return {p.relative_to(self.root).as_posix(): p.stat().st_size for p in self.root.rglob("*") if p.is_file()}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    from tests.support.checkpoints import make_safetensors_checkpoint, make_torch_checkpoint

    root = tmp_path_factory.mktemp("source")
    tensors = make_safetensors_checkpoint(root / "llama-test", total_bytes=CKPT_BYTES, shards=3, seed=0)
    (root / "run42").mkdir()
    state = make_torch_checkpoint(root / "run42" / "step-100.pt", total_bytes=24 << 20, seed=1)
    return Checkpoint(root, tensors, state)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path_factory.mktemp("weed")).start()
    try:
        yield server
    finally:
        server.stop(grace=2.0)  # weed ignores SIGTERM for ~15 s; its data is throwaway


@pytest.fixture
def proxy(seaweed: SeaweedServer) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the session's SeaweedFS, for one test."""
    with FaultProxy(seaweed.endpoint_url) as p:
        yield p


@pytest.fixture(scope="session")
def s3_checkpoint(seaweed: SeaweedServer, checkpoint: Checkpoint) -> str:
    """The checkpoint tree uploaded to SeaweedFS; returns its s3:// source URL."""
    seaweed.create_bucket(BUCKET)
    seaweed.upload_dir(checkpoint.root, BUCKET, S3_PREFIX)
    return f"s3://{BUCKET}/{S3_PREFIX}"


@dataclass
class Mount:
    """A live `modelfs mount` of `source` at `path`, made through the real CLI."""

    source: str
    path: Path
    cache_dir: Path
    env: dict[str, str]
    pid: int = 0
    args: list[str] = field(default_factory=list)
    minor: int | None = None  # the FUSE connection's number under /sys/fs/fuse/connections

    def stats(self) -> dict[str, int]:
        return json.loads(os.getxattr(self.path, "user.modelfs.stats"))

    def umount(self) -> None:
        r = cli("umount", str(self.path), env=self.env)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(str(self.path))

    def remount(self, args: list[str] | None = None) -> Mount:
        """Mount the same source again, at the same path, with the same cache dir (and the same options, or
        `args`)."""
        return self.factory(self.source, env=self.env, args=self.args if args is None else args,
                            cache_dir=self.cache_dir, path=self.path)

    factory: Callable[..., Mount] = field(default=lambda *a, **k: None, repr=False)  # type: ignore[assignment]


def eventually(check: Callable[[], bool], limit: float = 120.0) -> bool:
    """Poll `check` until it holds: a bounded wait for a background state change (it only detects a hang,
    it asserts no timing)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return False


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB pieces (also through a mount)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Factory: tmpfs(name, options) mounts a real tmpfs (e.g. "size=4m" or "ro,size=1m") under tmp_path;
    every one is lazily unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    made: list[Path] = []

    def make(name: str, options: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
        made.append(path)
        return path

    yield make
    for path in made:
        subprocess.run(["umount", "-l", str(path)], check=False)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run the real `modelfs` command (as `python -m modelfs`, from this interpreter)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "modelfs", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def _exited(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while pid and alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """Factory: mounter(source, env=..., args=[...]) -> Mount. Teardown: lazy unmount, kill by pid."""
    mounts: list[Mount] = []
    counter = iter(range(1000))

    def make(source: str, *, env: dict[str, str] | None = None, args: list[str] | tuple[str, ...] = (),
             cache_dir: Path | None = None, path: Path | None = None) -> Mount:
        n = next(counter)
        path = path or tmp_path / f"mnt{n}"
        path.mkdir(exist_ok=True)
        cache_dir = cache_dir or tmp_path / f"cache{n}"
        # MODELFS_TEST_MOUNT_OPTIONS="mount.passthrough=off": the whole suite on the other mode.
        extra = [a for o in os.environ.get("MODELFS_TEST_MOUNT_OPTIONS", "").split() for a in ("-o", o)]
        r = cli("mount", source, str(path), "--cache-dir", str(cache_dir), *extra, *args, env=env)
        if r.returncode != 0:
            minor = mount_minor(str(path))
            if minor is not None:  # mounted, but never answered: abort our own connection, unmount
                abort_connection(minor)
                subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)
            log = cache_dir / "modelfs.log"
            raise AssertionError(f"mount failed: {r.stderr}\n{log.read_text() if log.exists() else ''}")
        pid = int(os.getxattr(path, "user.modelfs.pid"))
        mount = Mount(source, path, cache_dir, env or {}, pid, list(args), mount_minor(str(path)), factory=make)
        mounts.append(mount)
        return mount

    yield make
    for m in mounts:
        if is_mounted(str(m.path)):
            subprocess.run(["fusermount3", "-uz", str(m.path)], capture_output=True)
        if not _exited(m.pid, 10) and m.minor is not None:
            # Stuck (a thread in the kernel on this connection): abort our own connection, never anyone else's.
            abort_connection(m.minor)
            _exited(m.pid, 5)
        _kill(m.pid)


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, checkpoint: Checkpoint) -> tuple[str, dict[str, str]]:
    """(source, env) for the same checkpoint tree served from a local directory or from SeaweedFS S3."""
    if request.param == "local":
        return str(checkpoint.root), {}
    seaweed: SeaweedServer = request.getfixturevalue("seaweed")
    return request.getfixturevalue("s3_checkpoint"), seaweed.env()
