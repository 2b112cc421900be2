"""Mount lifecycle: check the mountpoint, wire the layers, serve FUSE on trio, tune the kernel, unmount.

`serve()` is the daemon (it runs in the foreground of its process); the CLI starts it in a child
process and returns once `serve()` reports that the mount answers.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable

import pyfuse3
import trio

from modelfs import faults
from modelfs.cache import FileCache
from modelfs.cache.cachedir import CacheDir
from modelfs.catalog.index import ChunkIndex
from modelfs.config import Config
from modelfs.core import assemble
from modelfs.errors import ConfigError, ModelfsError, StoreUnreachable
from modelfs.fuse import xattrs
from modelfs.fuse.fs import Operations
from modelfs.health import check_within
from modelfs.passthrough import kernel as passthrough_kernel
from modelfs.reads.push import PushFn
from modelfs.remote import open_store
from modelfs.service.admin import pinned_hashes
from modelfs.service.metrics import Metrics
from modelfs.service.notify import notify, status_line
from modelfs.shared import SharedTier
from modelfs.stats import Stats

log = logging.getLogger(__name__)

#: Seconds the daemon lets in-flight requests finish after SIGTERM before cancelling them.
SHUTDOWN_GRACE = 5.0
#: Seconds after SIGTERM that page-cache pushes already in the kernel get to finish, requests still answered.
PUSH_DRAIN = 3.0
#: Seconds after SIGTERM after which the daemon aborts its own FUSE connection (fusectl) if it is still
#: not done: the last resort, so that no thread of it or of a reader stays in D state.
ABORT_AFTER = 12.0
#: Seconds between STATUS updates to systemd.
STATUS_INTERVAL = 5.0


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def is_mounted(path: str) -> bool:
    """Whether `path` is a mount point (live or stale), from /proc/self/mountinfo."""
    path = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(_unescape(line.split()[4]) == path for line in f)
    except OSError:
        return os.path.ismount(path)


def is_stale(path: str) -> bool:
    """A FUSE mount whose daemon is gone answers ENOTCONN (statfs: the kernel never answers it from
    its attribute cache, unlike stat)."""
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def fusermount(path: str, lazy: bool) -> None:
    """Unmount with fusermount3 (works for root and for the user who mounted)."""
    r = subprocess.run(["fusermount3", "-uz" if lazy else "-u", path], capture_output=True, text=True)
    if r.returncode != 0:
        msg = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"fusermount3 exited {r.returncode}"
        if "busy" in msg.lower():
            raise ModelfsError(f"{path} is busy: close the files open on it, or use --lazy")
        raise ModelfsError(f"cannot unmount {path}: {msg}")


def mount_minor(path: str) -> int | None:
    """The device minor of the mount at `path` (a resolved path) from /proc/self/mountinfo: for a FUSE
    mount, its connection number under fusectl. Touches nothing under `path`: the mount may be dead, or
    not served yet by this very process."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if _unescape(fields[4]) == path:
                    return int(fields[2].split(":")[1])
    except (OSError, IndexError, ValueError):
        pass
    return None


def abort_connection(minor: int) -> bool:
    """Abort FUSE connection `minor` through fusectl (mounted first if need be): every request pending
    on it fails and every thread waiting in it wakes up. True if the abort was written."""
    if not ensure_fusectl():
        return False
    try:
        with open(os.path.join(FUSECTL, str(minor), "abort"), "w") as f:
            f.write("1")
    except OSError:
        return False
    return True


def prepare_mountpoint(path: str) -> str:
    """Check the mountpoint and clear a stale mount left by a crashed daemon; return its real path."""
    real = os.path.realpath(path)
    if is_mounted(real):
        if not is_stale(real):
            raise ConfigError(f"mountpoint {path} is already mounted")
        log.warning("clearing stale mount at %s left by a daemon that is gone", real)
        minor = mount_minor(real)
        # A thread of the dead daemon stuck in the kernel would hold the old connection open: abort it.
        if minor is not None and abort_connection(minor):
            log.info("aborted the stale mount's FUSE connection %d", minor)
        fusermount(real, lazy=True)
    if not os.path.exists(real):
        raise ConfigError(f"mountpoint {path} does not exist")
    if not os.path.isdir(real):
        raise ConfigError(f"mountpoint {path} is not a directory")
    try:
        if os.listdir(real):
            raise ConfigError(f"mountpoint {path} is not empty")
    except PermissionError:
        raise ConfigError(f"mountpoint {path} is not accessible") from None
    return real


def fuse_options(cfg: Config) -> set[str]:
    opts = {"ro", "nodev", "nosuid", "noatime", "default_permissions", "fsname=modelfs", "subtype=modelfs"}
    if cfg.mount.allow_other:
        opts.add("allow_other")
    return opts


FUSECTL = "/sys/fs/fuse/connections"


def fusectl_mounted() -> bool:
    """Whether the FUSE control filesystem is mounted (the per-connection knobs exist only then)."""
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[2:3] == ["fusectl"] for line in f)
    except OSError:
        return False


def ensure_fusectl() -> bool:
    """Mount fusectl at /sys/fs/fuse/connections if it is not (root only); True if it is mounted now."""
    if fusectl_mounted():
        return True
    if os.geteuid() != 0 or not os.path.isdir(FUSECTL):
        return False
    r = subprocess.run(["mount", "-t", "fusectl", "none", FUSECTL], capture_output=True, text=True)
    if r.returncode != 0:
        log.info("cannot mount fusectl at %s (%s): FUSE queue depth stays the kernel's", FUSECTL,
                 r.stderr.strip() or f"mount exited {r.returncode}")
        return False
    log.info("mounted fusectl at %s", FUSECTL)
    return True


def connection_dir(mountpoint: str) -> str:
    """This mount's FUSE connection under fusectl: its number is the minor of the mount's device."""
    return os.path.join(FUSECTL, str(os.minor(os.stat(mountpoint).st_dev)))


def tune_kernel(mountpoint: str, cfg: Config) -> None:
    """Raise the mount's readahead (bdi) and, if asked, the FUSE background queue (fusectl; mounted here
    when absent, as root), logging every value set and every one that could not be."""
    dev = os.stat(mountpoint).st_dev
    major, minor = os.major(dev), os.minor(dev)
    knobs = []
    if cfg.mount.read_ahead_kb > 0:
        knobs.append((f"/sys/class/bdi/{major}:{minor}/read_ahead_kb", cfg.mount.read_ahead_kb))
    if cfg.mount.max_background > 0:
        if ensure_fusectl():
            conn = connection_dir(mountpoint)
            # The kernel marks the connection congested at 3/4 of max_background (as INIT would set it).
            knobs += [(f"{conn}/max_background", cfg.mount.max_background),
                      (f"{conn}/congestion_threshold", max(1, cfg.mount.max_background * 3 // 4))]
        else:
            log.info("fusectl is not mounted and cannot be: mount.max_background=%d not applied",
                     cfg.mount.max_background)
    for path, value in knobs:
        try:
            with open(path, "w") as f:
                f.write(str(value))
            with open(path) as f:
                log.info("set %s = %s", path, f.read().strip())
        except OSError as e:
            log.info("cannot set %s (%s): kernel default kept", path, e.strerror)


class Daemon:
    """One mount: store, index, cache and core, served over FUSE until unmounted or signalled."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._resources: list[Callable[[], None]] = []
        self._minor: int | None = None
        self._watchdog: threading.Timer | None = None

    def serve(self, on_ready: Callable[[], None] = lambda: None) -> None:
        """Mount and serve until unmounted or SIGTERM/SIGINT; raises ModelfsError before mounting."""
        cfg = self.cfg
        if not cfg.source:
            raise ConfigError("no source given (s3://BUCKET/PREFIX or a directory)")
        if not cfg.mountpoint:
            raise ConfigError("no mountpoint given")
        cache_dir = CacheDir(cfg.cache.dir)
        # Everything that can be checked is checked before anything in the cache dir is touched.
        store = open_store(cfg.source, cfg.s3)
        self._resources.append(store.close)
        try:
            mountpoint = prepare_mountpoint(cfg.mountpoint)
            unreachable: StoreUnreachable | None = None
            try:
                check_within(store.check, cfg.fetch.deadline, store.describe())
            except StoreUnreachable as e:
                unreachable = e
                if not cache_dir.has_index():
                    raise StoreUnreachable(f"{e}, and the cache holds nothing of it to serve offline") from None
            lock_fd = cache_dir.lock()
            self._resources.append(lambda: os.close(lock_fd))
            index = ChunkIndex(cache_dir.index, int(cfg.cache.index_map_size))
            self._resources.append(index.close)
            if unreachable is not None and index.load_listing(store.identity, "") is None:
                raise StoreUnreachable(f"{unreachable}, and the cache holds no listing of it to serve offline")
            stats = Stats()
            cache = FileCache(cache_dir.path, index, store.domain, store.identity, max_size=int(cfg.cache.max_size),
                              min_free=int(cfg.cache.min_free), stats=stats, preallocate=cfg.cache.preallocate,
                              trust_restarts=cfg.cache.trust_restarts)
            self._resources.append(cache.close)
            cache.keep(pinned_hashes(cache_dir.path, index))  # `modelfs cache pin`: never evicted
            metrics = Metrics() if cfg.metrics.address else None
            push: PushFn = pyfuse3.notify_store  # type: ignore[assignment]  # pyfuse3's stub says bytes; any buffer
            self.core = assemble(cfg, store, index, cache, stats, push=push,
                                 observe=metrics.fetch_seconds.observe if metrics else None,
                                 kernel=passthrough_kernel.live(cfg),
                                 faults=faults.from_environment())  # test-only: MODELFS_TEST_FAULTS
            if self.core.shared is not None:
                self._resources.append(self.core.shared.close)
            if unreachable is not None:
                self.core.health.mark_unreachable(unreachable, confirmed=True)  # the mount's check
            if metrics is not None:
                metrics.collect_from(self.core.counters, lambda: self.core.health.offline, self.core.read_wait)
                metrics.serve(cfg.metrics.address)
            pyfuse3.init(Operations(self.core), mountpoint, fuse_options(cfg))
        except BaseException:
            self._close()
            raise
        log.info("mounted %s at %s (cache %s)", store.describe(), mountpoint, cache_dir)
        self._minor = mount_minor(mountpoint)
        try:
            trio.run(self._main, mountpoint, on_ready)
        finally:
            try:
                pyfuse3.close(unmount=True)
            finally:
                if self._watchdog is not None:
                    self._watchdog.cancel()
                self._close()
            log.info("unmounted %s", mountpoint)

    def _close(self) -> None:
        while self._resources:
            try:
                self._resources.pop()()
            except Exception:
                log.exception("error while closing")

    async def _main(self, mountpoint: str, on_ready: Callable[[], None]) -> None:
        async with self.core.serving() as nursery:
            self.core.supervisor.spawn(self._watch_signals, nursery.cancel_scope, name="signal handling", restart=True)
            nursery.start_soon(self._announce, mountpoint, on_ready)  # a failure here fails the mount
            await pyfuse3.main(min_tasks=4, max_tasks=self.cfg.mount.fuse_tasks)
            if self.core.shared is not None:
                await self._hand_on(self.core.shared)
            nursery.cancel_scope.cancel()

    async def _hand_on(self, shared: SharedTier) -> None:
        """Unmounted: the write-backs to the shared tier still queued are written first (shared.flush_on_exit
        seconds at most), so other nodes find what this one fetched instead of fetching it from the origin."""
        queued, began = shared.pending, time.monotonic()
        if not queued:
            return
        notify(f"STATUS=stopping: writing {queued} extents back to the shared tier")
        left = await shared.flush(self.cfg.shared.flush_on_exit)
        log.info("unmounted: %d write-backs to the shared tier handed on in %.1f s%s", queued - left,
                 time.monotonic() - began, f", {left} dropped (shared.flush_on_exit)" if left else "")

    async def _announce(self, mountpoint: str, on_ready: Callable[[], None]) -> None:
        """Report ready only once the mount answers a stat of its root, from outside the trio thread."""
        def probe() -> None:
            if os.stat(mountpoint).st_ino != pyfuse3.ROOT_INODE:
                raise ModelfsError(f"{mountpoint} does not show the modelfs root after mounting")
            tune_kernel(mountpoint, self.cfg)

        await trio.to_thread.run_sync(probe, abandon_on_cancel=True)
        if self.cfg.mount.passthrough == "on" and not pyfuse3.passthrough_enabled():
            raise ModelfsError("mount.passthrough = on, but the kernel did not offer FUSE passthrough "
                               "(Linux 6.9+ with CONFIG_FUSE_PASSTHROUGH)")
        on_ready()
        # systemd (Type=notify): ready only now that the mount answers; then a STATUS line every few seconds.
        if notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS={self._status()}"):
            while True:
                await trio.sleep(STATUS_INTERVAL)
                notify(f"STATUS={self._status()}")

    def _arm_watchdog(self) -> None:
        """The last resort, in a plain thread (trio may be the one stuck): if the daemon is still not done
        ABORT_AFTER seconds from now (plus the time write-backs to a shared tier may take), abort its own FUSE
        connection, which wakes every thread waiting in the kernel on it, so that trio.run returns and nothing
        stays in D state."""
        if self._watchdog is not None or self._minor is None:
            return
        minor = self._minor
        after = ABORT_AFTER + (self.cfg.shared.flush_on_exit if self.core.shared is not None else 0.0)

        def abort() -> None:
            log.error("still not stopped %g s after the signal: aborting FUSE connection %d", after, minor)
            if not abort_connection(minor):
                log.error("could not abort FUSE connection %d (fusectl)", minor)

        self._watchdog = threading.Timer(after, abort)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _status(self) -> str:
        return status_line(self.core.counters(), self.core.health.offline)

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    log.warning("task dump (SIGUSR1):\n%s", task_tree())
                    continue
                if scope.deadline != float("inf"):
                    log.warning("second %s: stopping now", signal.Signals(signum).name)
                    scope.cancel()
                    return
                log.info("%s: unmounting", signal.Signals(signum).name)
                notify("STOPPING=1\nSTATUS=stopping: unmounting")
                self._arm_watchdog()
                pusher = self.core.prefetcher.pusher
                if pusher is not None:  # no push may be in the kernel once requests stop being answered
                    gate = pusher.gate
                    gate.close()
                    if not await gate.drained(PUSH_DRAIN):
                        log.warning("page-cache pushes still in the kernel %g s after %s", PUSH_DRAIN,
                                    signal.Signals(signum).name)
                pyfuse3.terminate()
                hand_on = self.cfg.shared.flush_on_exit if self.core.shared is not None else 0.0
                scope.deadline = trio.current_time() + SHUTDOWN_GRACE + hand_on


def task_tree() -> str:
    """Every trio task and where it waits: `kill -USR1 <daemon pid>` logs it, to diagnose a hang."""
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        where: list[str] = []
        coro: object = task.coro
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                where.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        lines.append(f"{'  ' * depth}{task.name} @ {' > '.join(where)}")
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    root = trio.lowlevel.current_root_task()
    if root is not None:
        walk(root, 0)
    return "\n".join(lines)


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped by its parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def unmount(mountpoint: str, lazy: bool = False, timeout: float = 30.0) -> None:
    """Unmount and wait for the daemon to exit; a stale mount is cleared lazily."""
    real = os.path.realpath(mountpoint)
    if not is_mounted(real):
        raise ModelfsError(f"{mountpoint} is not mounted")
    pid = 0
    try:
        pid = int(os.getxattr(real, xattrs.PID))
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            lazy = True
    except ValueError:
        pass
    fusermount(real, lazy)
    deadline = time.monotonic() + timeout
    while pid and time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.05)
    if pid:
        raise ModelfsError(f"unmounted {mountpoint}, but daemon pid {pid} is still running after {timeout:.0f}s")
