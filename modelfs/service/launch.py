"""Starting the daemon: `modelfs mount` runs it in its own session and returns once it reports the mount
ready through a pipe (or says in one line why it could not mount); `--foreground` (systemd, the mount
helper's child) runs it in this process and writes that line."""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import time

from modelfs.cache.cachedir import CacheDir
from modelfs.config import Config
from modelfs.errors import ModelfsError
from modelfs.logs import setup_logging

log = logging.getLogger("modelfs")

#: How long `modelfs mount` waits for the daemon to report the mount ready.
READY_TIMEOUT = 120.0


def run_foreground(cfg: Config, ready_fd: int | None) -> int:
    from modelfs.service.mount import Daemon  # pyfuse3 is only needed where a mount runs

    setup_logging(cfg.log.level, cfg.log.file or None)

    def report(line: str) -> None:
        if ready_fd is not None:
            try:
                os.write(ready_fd, (line + "\n").encode())
            except OSError:
                pass

    def ready() -> None:
        log.info("ready")
        report("READY")

    try:
        Daemon(cfg).serve(ready)
    except ModelfsError as e:
        log.error("%s", e)
        report(f"ERROR {e}")
        if ready_fd is None:
            print(f"modelfs: error: {e}", file=sys.stderr)
        return 1
    return 0


def spawn_daemon(cfg: Config, argv: list[str]) -> int:
    """Start the daemon in its own session and return once it reports the mount ready."""
    cache_dir = CacheDir(cfg.cache.dir)
    cache_dir.create()
    log_path = os.path.abspath(cfg.log.file or cache_dir.log)
    try:
        log_file = open(log_path, "a")  # noqa: SIM115 - handed to the child
    except OSError as e:
        where = f"cache dir {cache_dir}" if not cfg.log.file else f"log file {log_path}"
        raise ModelfsError(f"{where} is not writable: {e.strerror}") from None
    r, w = os.pipe()
    # The child parses the same command line (and environment) again, in the foreground, and imports the same
    # modelfs (-P: its parent's working directory was not first on sys.path either).
    child_argv = [sys.executable, *(["-P"] if sys.flags.safe_path else []), "-m", "modelfs", *argv,
                  "--foreground", "--ready-fd", str(w), "--log-file", log_path]
    with log_file:
        child = subprocess.Popen(child_argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                 pass_fds=(w,), start_new_session=True)
    os.close(w)
    line = _read_line(r, READY_TIMEOUT)
    os.close(r)
    if line == "READY":
        print(f"modelfs: mounted {cfg.source} at {cfg.mountpoint} (pid {child.pid}, log {log_path})")
        return 0
    if line.startswith("ERROR "):
        child.wait(timeout=30)
        raise ModelfsError(line[6:])
    if child.poll() is None:
        child.terminate()
        raise ModelfsError(f"the mount did not answer within {READY_TIMEOUT:.0f}s; see {log_path}")
    raise ModelfsError(f"the daemon exited with status {child.returncode} before mounting; see {log_path}")


def _read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").split("\n", 1)[0].strip()
