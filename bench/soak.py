"""`make soak`: an hour of load, faults, eviction and restarts through one modelfs mount, every byte checked.

What runs (all on this machine):
- SeaweedFS on loopback holding three checkpoints under one prefix: `base/` (published with a manifest),
  `ft/` (a fine-tune of base: a quarter of its tensors new, also published with a manifest) and `plain/`
  (another model, uploaded as plain objects). Each has safetensors shards and a `torch.save` file. Their
  distinct bytes are about twice `cache.max_size`, so eviction never stops.
- The daemon reaches the store through the fault proxy, which answers about 10 % of GETs with a fault:
  503 SlowDown, a reset mid-body, a truncated body, or a stall past the read timeout.
- Four loader processes (soak_worker.py) loop, each picking a checkpoint and a loader at random:
  `load_file` per shard, `safe_open` in key-name order, `torch.load(mmap=True)`, random `pread`s.
  Every tensor or byte is compared with the source.
- The cache dir is on an ext4 of its own (a sparse image on a loop device, mounted strictatime so a cache
  file's atime says when it was last read), so bytes can be changed under the filesystem, as a bad disk
  does. The cache is one sparse file per file version, `<cache>/files/<vid hex>` (modelfs/cache.py).
- On a schedule: a one-minute network cut (proxy blackholed) every 15 minutes; SIGTERM and a restart of
  the daemon every 20 minutes, and while it is down, three cache files damaged, each among the quarter the
  index says were used last: a byte of a present extent flipped in place (through the filesystem: mtime
  and ctime move), a file truncated to half, and a byte of a present extent changed on the loop device
  under the filesystem (no timestamp moves) with the file's pages dropped. Bytes are
  damaged only in extents whose content no other extent has (shared content may rightly be served from
  another copy the daemon trusts, and the damaged one then never read), and in no file a loader still has
  mapped or open (see below). The next daemon must catch each at first use: the soak reads each damaged
  extent through its mount at once (loaders may get there first) and requires the right bytes, a log
  line of the daemon dropping the damage, and its `corrupt_extents` counting it (damage the daemon punched
  out in eviction before anything read it, which the cache file then shows, is reported apart: there was
  no first use). Runs shorter than an hour scale the schedule down so every fault still happens.
- Why damage only between daemons (a weaker fault model than this soak had, which the cache design
  requires): a daemon hashes bytes when they arrive and the first time it reads them back from disk, and
  from then on serves that cache file as it is: through its READs, or by the kernel through FUSE
  passthrough once the file is complete. A change to a cache file under a daemon that has already checked
  that extent is not caught by that daemon (the next one catches it), so the soak no longer damages the
  cache under a running daemon, nor files a loader still has mapped or open across a restart (a
  passthrough mapping outlives its daemon). Kernel-verified storage (fs-verity, btrfs data checksums) is
  the planned remedy for damage under a running daemon. 0 wrong bytes served stays a bound.
- Watched every 10 s: the daemon's RSS, open fds, threads (and what each fd and thread is: readlink of
  /proc/PID/fd/N, thread names), LMDB file size, cache bytes on disk (the real allocation, st_blocks x 512,
  of the sparse files under `files/`) against the quota, the GET buffers the daemon made (`get_buffer_bytes`),
  requests waiting in the kernel (fusectl), its Prometheus metrics (how long demand READs waited:
  `modelfs_read_wait_seconds`); every second: each thread of the daemon and of the loaders in D state,
  and for how long, told apart by whether the stretch fell in a cut or a restart (or GRACE after one).
  The bound applies to one uninterruptible sleep (no timeslice run between samples: schedstat); runs
  of consecutive samples in D, which join waits for one read after another, are reported beside it.
- Leaks: RSS, fds and threads of the first and the last 10 minutes (after 5 of warm-up; a sixth and a
  third of a shorter run) must match within 10 %, each with its demand-sized pool set aside and held to
  that pool's cap instead: GET buffers (fetch.memory_budget), extents held in memory when the cache has
  no room (cache.map_budget), connections to the store
  (s3.max_pool_connections), trio's worker threads (the daemon's CapacityLimiters). A restart's daemon
  that meets a busier minute than the first one fills more of each pool, which is no leak.

Writes bench/results/soak.{md,json,png}: the table of loads, failures and resource drift, and a chart
of RSS, cache bytes and loads per minute. Exit status 1 if a criterion failed.

    python bench/soak.py [--minutes 60]        (root; SOAK_MINUTES= through make)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _root  # noqa: F401  (the repository root on sys.path: tests.support)
from peers import Modelfs, Store, alive, force_unmount, is_mounted

from bench import RESULTS, raise_exit, say
from modelfs.config import Config, load_config
from modelfs.service.mount import mount_minor
from tests.support.checkpoints import make_fine_tune, make_safetensors_checkpoint, make_torch_checkpoint
from tests.support.diskfault import LoopFs, corrupt_under_fs, loop_ext4, truncate_in_place
from tests.support.faultproxy import Fault, FaultProxy, Rule
from tests.support.seaweed import SeaweedServer

HERE = Path(__file__).resolve().parent
WORKER = HERE / "soak_worker.py"
BUCKET = "soak"
PREFIX = "models/"
MiB = 1 << 20
GiB = 1 << 30
CKPTS = ("base", "ft", "plain")
KINDS = ("load_file", "safe_open", "torch_mmap", "pread")

#: Daemon settings for the soak: the quota that keeps eviction going, and a read timeout the stalls exceed.
QUOTA = 384 * MiB
READ_TIMEOUT = 10.0
FETCH_DEADLINE = 30.0
#: A unit of a load (one shard, tensor or pread) silent longer than this counts as hung (the issue's bound).
HANG = FETCH_DEADLINE + 10
#: After this much silence a hung worker is killed so the soak goes on (the hang is already counted).
GIVE_UP = 240.0
#: Failures this long after a cut or a restart ends are still attributed to it (the probe interval, and
#: a load that started during the window and failed on its next read).
GRACE = 15.0
#: The cache's own disk on top of the quota: cache.min_free's default (1 GiB) and room for the index, the
#: log and temp files (a sparse image: only what is written takes space).
DISK_SLACK = 2 * GiB
#: A D-state stretch longer than this outside a cut or a restart window fails the run (the issue's bound).
D_BOUND = 5.0


# -- the checkpoints ------------------------------------------------------------------------------


def make_sources(src: Path, scale: float) -> int:
    """base (with manifest), ft (its fine-tune), plain (another model): shards plus a torch file each.
    Returns the distinct bytes of the three: what a content-addressed cache holds to serve them all."""
    make_safetensors_checkpoint(src / "base", total_bytes=int(320 * MiB * scale), shards=5, seed=0)
    make_torch_checkpoint(src / "base" / "model.pt", total_bytes=int(40 * MiB * scale), seed=1)
    changed = make_fine_tune(src / "base", src / "ft", every=4, seed=7)
    make_torch_checkpoint(src / "ft" / "model.pt", total_bytes=int(40 * MiB * scale), seed=2)
    make_safetensors_checkpoint(src / "plain", total_bytes=int(256 * MiB * scale), shards=4, seed=3)
    make_torch_checkpoint(src / "plain" / "model.pt", total_bytes=int(40 * MiB * scale), seed=4)
    files = [p for ckpt in ("base", "plain") for p in (src / ckpt).iterdir()]
    return sum(p.stat().st_size for p in files) + changed + (src / "ft" / "model.pt").stat().st_size


def references(src: Path) -> dict[str, Any]:
    """Per checkpoint: shard names, the torch file, sizes, and an xxh3-64 of every tensor's bytes."""
    import torch
    from safetensors.torch import load_file
    from soak_worker import digest

    refs: dict[str, Any] = {}
    for ckpt in CKPTS:
        d = src / ckpt
        shards = sorted(p.name for p in d.glob("*.safetensors"))
        tensors = {s: {k: digest(t) for k, t in load_file(str(d / s)).items()} for s in shards}
        tensors["model.pt"] = {k: digest(t) for k, t in torch.load(str(d / "model.pt"), weights_only=True).items()}
        refs[ckpt] = {"shards": shards, "torch": "model.pt", "tensors": tensors,
                      "sizes": {f: (d / f).stat().st_size for f in [*shards, "model.pt"]}}
    return refs


# -- the daemon -----------------------------------------------------------------------------------


class Daemon:
    """The modelfs mount under test, started through its CLI as an operator would, restartable."""

    def __init__(self, modelfs: Modelfs, mnt: Path, cache: Path) -> None:
        self.modelfs = modelfs
        self.mnt = mnt
        self.cache = cache
        self.pid = 0
        self.minor: int | None = None

    def start(self, attempts: int = 5) -> None:
        for attempt in range(attempts):
            try:
                self.modelfs.cli(*self.modelfs.mount_args(self.mnt, self.cache), timeout=180)
                self.pid = int(os.getxattr(self.mnt, "user.modelfs.pid"))
                self.minor = mount_minor(os.path.realpath(self.mnt))
                return
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                say(f"mount attempt {attempt + 1} failed: {str(e)[-300:]}")
                force_unmount(self.mnt)
                time.sleep(5)
        raise RuntimeError("the daemon could not be mounted again")

    def terminate(self, timeout: float = 60) -> float:
        """SIGTERM, as systemd stops the unit; seconds until the process was gone (SIGKILL after timeout)."""
        t0 = time.monotonic()
        pid, self.pid = self.pid, 0
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        while alive(pid) and time.monotonic() - t0 < timeout:
            time.sleep(0.05)
        took = time.monotonic() - t0
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        force_unmount(self.mnt)
        return took

    def stats(self) -> dict[str, int] | None:
        """The daemon's counters, or None if it does not answer within 10 s (a getxattr on the mount)."""
        box: list[dict[str, int]] = []

        def get() -> None:
            with contextlib.suppress(OSError, ValueError):
                box.append(json.loads(os.getxattr(self.mnt, "user.modelfs.stats")))

        t = threading.Thread(target=get, daemon=True)
        t.start()
        t.join(10)
        return box[0] if box else None


# -- loaders --------------------------------------------------------------------------------------


@dataclass
class Load:
    slot: int
    ckpt: str
    kind: str
    start: float
    end: float = 0.0
    bytes: int = 0
    mismatches: int = 0
    mismatch_examples: list[str] = field(default_factory=list)
    error: str | None = None
    longest_unit: float = 0.0
    hung: bool = False
    cold: bool = False  # the checkpoint's pages were dropped from the page cache first


class Slot(threading.Thread):
    """One loader process in a loop; a new process whenever one dies (SIGBUS) or is killed for hanging."""

    def __init__(self, n: int, mnt: Path, src: Path, refs: Path, stop: threading.Event, loads: list[Load],
                 lock: threading.Lock, on_hang: Any) -> None:
        super().__init__(name=f"slot{n}", daemon=True)
        self.n, self.mnt, self.src, self.refs = n, mnt, src, refs
        self.stop, self.loads, self.lock, self.on_hang = stop, loads, lock, on_hang
        self.rnd = random.Random(1000 + n)
        self.proc: subprocess.Popen[bytes] | None = None
        self.buf = b""

    def pids(self) -> list[int]:
        p = self.proc
        return [p.pid] if p is not None and p.poll() is None else []

    def spawn(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "--mount", str(self.mnt), "--source", str(self.src), "--refs",
             str(self.refs)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(self.mnt.parent / f"worker{self.n}.log", "ab"), start_new_session=True)  # noqa: SIM115
        self.buf = b""
        line = self.readline(300)
        if line is None or "ready" not in line:
            raise RuntimeError(f"soak worker {self.n} did not start")

    def readline(self, timeout: float) -> dict[str, Any] | None:
        """The worker's next JSON line; None on EOF (it died) or after ``timeout`` seconds of silence."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return {"silent": True}
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.proc is None or self.proc.poll() is not None:
                self.spawn()
            load = Load(self.n, self.rnd.choice(CKPTS), self.rnd.choice(KINDS), time.time(),
                        cold=self.rnd.random() < 0.5)
            assert self.proc is not None and self.proc.stdin is not None
            try:
                self.proc.stdin.write(json.dumps({"ckpt": load.ckpt, "kind": load.kind, "drop": load.cold,
                                                  "seed": self.rnd.randrange(1 << 30)}).encode() + b"\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                continue
            self.follow(load)
            load.end = time.time()
            with self.lock:
                self.loads.append(load)
            if load.error:
                time.sleep(1)  # a loader that failed tries again, as a serving framework's retry would
        self.kill()

    def follow(self, load: Load) -> None:
        """Read the worker's beats until its done line; time each unit, and flag and end a hang."""
        last = time.monotonic()
        silent_since: float | None = None
        while True:
            msg = self.readline(HANG if silent_since is None else 5)
            now = time.monotonic()
            if msg is None:  # the worker died: a read error inside a mapping is SIGBUS
                assert self.proc is not None
                code = self.proc.wait()
                load.error = f"worker ended by {signal.Signals(-code).name}" if code < 0 else f"worker exit {code}"
                return
            if msg.get("silent"):
                if silent_since is None:
                    silent_since = last
                    load.hung = True
                    self.on_hang(load, self.pids())
                if now - silent_since > GIVE_UP:
                    load.error = f"killed after {now - silent_since:.0f} s without progress"
                    self.kill()
                    return
                continue
            load.longest_unit = max(load.longest_unit, now - last)
            last, silent_since = now, None
            if msg.get("done"):
                load.bytes = msg["bytes"]
                load.mismatches = msg["n_mismatches"]
                load.mismatch_examples = msg["mismatches"]
                load.error = msg["error"]
                return


# -- watching -------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    out = {"rss": 0, "fds": 0, "threads": 0}
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss"] = int(line.split()[1]) * 1024
                elif line.startswith("Threads:"):
                    out["threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def threads_in_d(pid: int) -> dict[int, int]:
    """Threads of `pid` in D state now, each with its count of timeslices run so far (the third field of
    /proc/.../schedstat): a thread seen in D twice with the same count never ran in between, so it slept
    uninterruptibly all along; a changed count means it woke, ran, and is waiting again (another read)."""
    found: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "D":
                    continue
            runs = -1
            with contextlib.suppress(OSError, ValueError, IndexError), \
                    open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                runs = int(f.read().split()[2])
            found[int(tid)] = runs
    return found


def wchan(tid: int) -> str:
    """Where a thread sleeps in the kernel (its wait channel and kernel stack, when readable)."""
    out = ""
    with contextlib.suppress(OSError):
        out = Path(f"/proc/{tid}/wchan").read_text()
    with contextlib.suppress(OSError):
        out += " | " + " < ".join(line.split()[-1] for line in Path(f"/proc/{tid}/stack").read_text().splitlines()[:6])
    return out


def cache_bytes(cache: Path) -> int:
    """Bytes the cache's files take on disk: their real allocation (st_blocks x 512) under `files/`, not
    their sizes (each is a sparse file of its version's size, holes where extents are absent). Allocation
    is in whole filesystem blocks: an extent that does not begin or end on a block boundary shares a block
    with its neighbour, or leaves part of one allocated after it is punched out, and ext4's extent-tree
    blocks count too. A walk is not atomic: an extent punched out of a file the walk has passed and one
    written into a file it reaches next are both counted. So two walks back to back, and the smaller sum:
    a real excess shows in both."""

    def walk() -> int:
        total = 0
        with contextlib.suppress(OSError), os.scandir(cache / "files") as it:
            for e in it:
                with contextlib.suppress(OSError):
                    total += e.stat(follow_symlinks=False).st_blocks * 512
        return total

    return min(walk(), walk())


def cpu_pressure() -> float:
    """The share of the last 10 s in which some runnable task waited for a CPU (PSI "some avg10", %); -1
    where the kernel has no PSI. With other work on the machine, it tells CPU contention from a slow mount."""
    try:
        return float(Path("/proc/pressure/cpu").read_text().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return -1.0


def fusectl_waiting(minor: int | None) -> int:
    if minor is None:
        return -1
    try:
        return int(Path(f"/sys/fs/fuse/connections/{minor}/waiting").read_text())
    except (OSError, ValueError):
        return -1


# -- what the daemon's threads and fds are ----------------------------------------------------------

#: x86-64 syscall numbers a waiting thread of the daemon is seen in (/proc/TID/syscall), for its label.
SYSCALLS = {0: "read", 7: "poll", 17: "pread64", 23: "select", 35: "nanosleep", 45: "recvfrom", 202: "futex",
            230: "clock_nanosleep", 232: "epoll_wait", 270: "pselect6", 271: "ppoll", 281: "epoll_pwait",
            295: "preadv", 327: "preadv2", 441: "epoll_pwait2"}


def tcp_sockets(pid: int) -> dict[str, tuple[int, int, str]]:
    """socket inode -> (local port, remote port, state) of the TCP sockets in `pid`'s network namespace."""
    out: dict[str, tuple[int, int, str]] = {}
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{name}") as f:
            next(f, None)
            for line in f:
                p = line.split()
                if len(p) > 9:
                    out[p[9]] = (int(p[1].rsplit(":", 1)[1], 16), int(p[2].rsplit(":", 1)[1], 16),
                                 "LISTEN" if p[3] == "0A" else "ESTABLISHED" if p[3] == "01" else f"st{p[3]}")
    return out


def fd_kinds(pid: int, cache: Path, store_port: int, metrics_port: int) -> dict[str, int]:
    """Open fds of `pid` by what each is (readlink of /proc/PID/fd/N): cache files, the index, /dev/fuse,
    TCP connections to the store (the fault proxy), the metrics listener, epoll and pipes (trio), ..."""
    kinds: dict[str, int] = {}
    tcp: dict[str, tuple[int, int, str]] | None = None
    files, index = str(cache / "files") + "/", str(cache / "index") + "/"
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(files):  # one unlinked while the daemon holds it open shows " (deleted)"
                kind = "cache file, deleted" if target.endswith(" (deleted)") else "cache file"
            elif target.startswith(index):
                kind = "index " + os.path.basename(target)
            elif target.startswith(str(cache) + "/"):
                kind = os.path.basename(target)
            elif target.startswith("socket:["):
                if tcp is None:
                    tcp = tcp_sockets(pid)
                local, remote, state = tcp.get(target[8:-1], (0, 0, ""))
                kind = ("TCP to the store" if remote == store_port else "TCP metrics listener"
                        if state == "LISTEN" and local == metrics_port else "TCP metrics scrape"
                        if local == metrics_port else f"TCP {state}" if state else "socket (not TCP)")
            elif target.startswith(("anon_inode:", "pipe:")):
                kind = target.split("[", 1)[0].rstrip(":") if target.startswith("pipe:") else target
            else:
                kind = target
            kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


def thread_kinds(pid: int) -> dict[str, int]:
    """Threads of `pid` by name (/proc/PID/task/TID/comm): trio names an idle worker thread "Trio thread N"
    and a busy one after the function it runs ("_fetch_blocking from ...", cut to 15 characters); Python
    3.11 gives the OS no name for its other threads (S3 request threads, the metrics server's), so those
    show the process's name and are told apart by the system call they are in."""
    kinds: dict[str, int] = {}
    main = ""
    with contextlib.suppress(OSError):
        main = Path(f"/proc/{pid}/comm").read_text().strip()
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            except OSError:
                continue
            if tid == str(pid):
                kind = "main (trio, pyfuse3)"
            elif comm.startswith("Trio thread"):
                kind = "trio worker, idle (in its cache)"
            elif comm == main:
                call = ""
                with contextlib.suppress(OSError, ValueError, IndexError):
                    first = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()[0]
                    call = first if not first.lstrip("-").isdigit() else SYSCALLS.get(int(first), f"syscall {first}")
                kind = f"unnamed, in {call or '?'}"
            else:  # trio names a busy worker after what it runs (cut to 15 characters)
                kind = f"trio worker in {comm}"
            kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


# -- damage to the cache while no daemon runs ------------------------------------------------------

#: The index's keys and values (modelfs/catalog/index.py): offset in a key, (hash, length) in an extents value.
_OFF = struct.Struct(">Q")
_EXT = struct.Struct(">16sI")


@dataclass
class CacheFile:
    """One version's cache file as the index (read while no daemon runs) describes it."""

    vid: bytes
    path: Path
    key: str
    size: int
    extents: dict[int, tuple[bytes, int]]  # present extents: start -> (hash, length)
    unique: list[int]  # starts of present extents whose content no other extent of any version has
    last_used: float  # the index's: a new daemon evicts the files used least recently first


def cache_files(cache: Path) -> list[CacheFile]:
    """The version files that hold present extents, read from the LMDB index directly: read-only and without
    the lock, which is safe only while no daemon (its one writer) runs."""
    import lmdb

    env = lmdb.open(str(cache / "index"), readonly=True, lock=False, max_dbs=8)
    try:
        versions, extents, present = (env.open_db(n, create=False) for n in (b"versions", b"extents", b"present"))
        found: dict[bytes, dict[int, tuple[bytes, int]]] = {}
        copies: dict[bytes, int] = {}  # content hash -> extents (of every version, present or not) with it
        with env.begin() as txn:
            recs = {bytes(k): json.loads(v) for k, v in txn.cursor(db=versions)}
            for _, v in txn.cursor(db=extents):
                h = _EXT.unpack(v)[0]
                copies[h] = copies.get(h, 0) + 1
            ext = txn.cursor(db=extents)
            for k, _ in txn.cursor(db=present):
                v = ext.get(k)
                if v is not None:
                    found.setdefault(bytes(k[:16]), {})[_OFF.unpack(k[16:])[0]] = _EXT.unpack(v)
    finally:
        env.close()
    out = []
    for vid, exts in found.items():
        path, rec = cache / "files" / vid.hex(), recs.get(vid)
        with contextlib.suppress(OSError, KeyError, ValueError, TypeError):
            if rec is not None and path.stat().st_size == int(rec["size"]):
                out.append(CacheFile(vid, path, str(rec["key"]), int(rec["size"]), exts,
                                     sorted(s for s, (h, _) in exts.items() if copies.get(h, 0) == 1),
                                     float(rec.get("last_used", 0))))
    return out


def allocation(cache: Path) -> dict[str, int]:
    """Where the cache files' allocated bytes go (st_blocks x 512), read while no daemon runs: the present
    extents' own bytes (what `cache.max_size` counts), the rest of the blocks they cover (an extent that does
    not begin and end on a block boundary takes whole blocks), allocated data outside every present extent's
    blocks (what punching an extent out leaves: ext4 frees only the whole blocks inside the range, and zeroes
    the partial ones at its ends, which stay allocated until the file is deleted), and the remainder (the
    filesystem's extent-tree blocks)."""
    bs = os.statvfs(cache / "files").f_frsize
    try:
        present = {f.path.name: f for f in cache_files(cache)}
    except Exception:  # no index: nothing is present
        present = {}
    out = dict.fromkeys(("files", "allocated", "present", "rounding", "outside", "metadata"), 0)
    with os.scandir(cache / "files") as it:
        names = [e.name for e in it]
    for name in names:
        path = cache / "files" / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            data: list[tuple[int, int]] = []  # allocated ranges (SEEK_DATA / SEEK_HOLE), block-aligned
            pos = 0
            while pos < st.st_size:
                try:
                    a = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: no data past pos
                    break
                b = os.lseek(fd, a, os.SEEK_HOLE)
                data.append((a - a % bs, -(-b // bs) * bs))
                pos = b
        finally:
            os.close(fd)
        covered: list[tuple[int, int]] = []  # blocks the present extents touch, merged
        f = present.get(name)
        for start, (_, length) in sorted(f.extents.items()) if f else []:
            a, b = start - start % bs, -(-(start + length) // bs) * bs
            if covered and a <= covered[-1][1]:
                covered[-1] = (covered[-1][0], max(covered[-1][1], b))
            else:
                covered.append((a, b))
            out["present"] += length
        in_data = sum(b - a for a, b in data)
        both = sum(max(0, min(b, d) - max(a, c)) for a, b in covered for c, d in data)
        out["files"] += 1
        out["allocated"] += st.st_blocks * 512
        out["rounding"] += both
        out["outside"] += in_data - both
        out["metadata"] += st.st_blocks * 512 - in_data
    out["rounding"] -= out["present"]
    return out


def files_in_use(files: list[CacheFile], pids: list[int], src: Path) -> set[bytes]:
    """Versions whose cache file one of `pids` (the loaders) has mapped or open now. A passthrough open or
    mapping outlives the daemon that made it: the kernel reads the cache file itself, no READ reaches a
    daemon, so a loader mid-load across a restart still reads the file its old daemon checked. Damage
    there is damage under a reader that was handed checked bytes, which the design does not promise to
    catch (see the module's docstring), so such files are not damaged. Matched by the cache file's inode,
    by its path, or by the path the loader opened in the mount (shown for passthrough mappings; after the
    old mount's lazy unmount, maybe without the mountpoint: matched by its tail)."""
    by_ino = {}
    for f in files:
        with contextlib.suppress(OSError):
            st = f.path.stat()
            by_ino[(st.st_dev, st.st_ino)] = f.vid
    by_path = {str(f.path): f.vid for f in files}
    tails: dict[str, set[bytes]] = {}
    for f in files:
        tails.setdefault("/" + f.key, set()).add(f.vid)  # keys are relative to the mount root
    used: set[bytes] = set()

    def note(path: str) -> None:
        path = path.removesuffix(" (deleted)")
        if path in by_path:
            used.add(by_path[path])
        elif not path.startswith(str(src) + "/"):
            for tail, vids in tails.items():
                if path.endswith(tail):
                    used.update(vids)

    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as fh:
            for line in fh:
                parts = line.split(maxsplit=5)
                if len(parts) < 6 or parts[4] == "0":
                    continue
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                vid = by_ino.get((os.makedev(major, minor), int(parts[4])))
                if vid is not None:
                    used.add(vid)
                note(parts[5].strip())
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    note(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return used


@dataclass
class Damage:
    """One fault put into a cache file while no daemon ran, and what the next daemon did about it."""

    kind: str  # flip, truncate, corrupt (CACHE_FAULTS)
    at: float  # wall clock
    vid: str
    key: str
    start: int  # the damaged extent (truncate: one beyond the cut), probed through the mount once mounted
    length: int
    expected: int  # extents the next daemon should drop for it (truncate: every present extent of the file)
    detail: str
    offset: int = -1  # the damaged byte (flip, corrupt) and its value now
    bad: int = -1
    probe: str = ""  # what reading the extent through the next daemon's mount gave: "right bytes", ...
    log_line: str = ""  # the next daemon's log line that says it dropped the damage
    evicted: str = ""  # not dropped: what the cache file holds at the damaged byte after the probe, if not it
    in_use: int = 0  # cache files a loader had mapped or open then (not damaged)

    @property
    def caught(self) -> bool:
        return bool(self.log_line) and self.probe == "right bytes"

    @property
    def handled(self) -> bool:
        """Caught, or evicted before any daemon read it (no first use to catch it at), right bytes served."""
        return self.caught or (bool(self.evicted) and self.probe == "right bytes")


def candidates(files: list[CacheFile], taken: set[bytes], rnd: random.Random) -> list[CacheFile]:
    """Files to damage, best first: a random order over the quarter the index says were used last, then
    the rest. A new daemon evicts extents of the files used least recently first (by the index's record,
    which passthrough reads do not move, unlike atime): damage there may be punched out before any read."""
    pool = sorted((f for f in files if f.vid not in taken), key=lambda f: f.last_used, reverse=True)
    head = pool[:max(4, len(pool) // 4)]
    rnd.shuffle(head)
    return head + pool[len(head):]


def unique_extent(f: CacheFile, rnd: random.Random) -> tuple[int, int]:
    """(start, length) of a present extent whose content no other extent has. Damage goes there only: the
    daemon may serve bytes of shared content from any copy it trusts (another version's file, or memory
    when the cache had no room), and then rightly never reads the damaged copy, so its first use would not
    be forced by reading it through the mount."""
    if not f.unique:
        raise ValueError(f"{f.key}: every present extent's content is also elsewhere")
    start = rnd.choice(f.unique)
    return start, f.extents[start][1]


def flip_in_place(f: CacheFile, rnd: random.Random) -> Damage:
    """One byte of a present extent inverted through the filesystem (open, pwrite: mtime and ctime move),
    as a stray tool or a bad disk that the filesystem sees would leave it."""
    start, length = unique_extent(f, rnd)
    off = start + rnd.randrange(length)
    fd = os.open(f.path, os.O_RDWR)
    try:
        old = os.pread(fd, 1, off)[0]
        os.pwrite(fd, bytes([old ^ 0xFF]), off)
    finally:
        os.close(fd)
    return Damage("flip", time.time(), f.vid.hex(), f.key, start, length, 1,
                  f"{f.key}: byte {off} (extent {start}+{length}) {old:#04x} -> {old ^ 0xFF:#04x} in place",
                  off, old ^ 0xFF)


def truncate_file(f: CacheFile, rnd: random.Random) -> Damage:
    """The cache file cut to half its size through the filesystem, as a crash or a stray tool leaves one.
    The next daemon drops the whole file at start (its size is not its version's) and counts each of its
    present extents."""
    cut = f.size // 2
    start, (_, length) = rnd.choice(sorted((s, e) for s, e in f.extents.items() if s + e[1] > cut))
    truncate_in_place(f.path, cut)
    return Damage("truncate", time.time(), f.vid.hex(), f.key, start, length, len(f.extents),
                  f"{f.key}: {f.size} -> {cut} bytes ({len(f.extents)} present extents)")


def corrupt_file(disk: LoopFs, f: CacheFile, rnd: random.Random) -> Damage:
    """One byte of a present extent changed on the loop device, under the filesystem (no timestamp moves),
    and the file's pages dropped, so the next read of it comes from the disk: a disk gone bad."""
    start, length = unique_extent(f, rnd)
    off = start + rnd.randrange(length)
    old, new = corrupt_under_fs(disk, f.path, off)
    return Damage("corrupt", time.time(), f.vid.hex(), f.key, start, length, 1,
                  f"{f.key}: byte {off} (extent {start}+{length}) {old:#04x} -> {new:#04x} under the filesystem, "
                  f"pages dropped", off, new)


def after_probe(d: Damage, cache: Path) -> str:
    """For damage the daemon did not drop: what its cache file holds at the damaged byte now. A hole, or
    other bytes, mean the extent was evicted (punched out, maybe fetched again) before its first use: no
    daemon read the damage. The damaged byte still there, with right bytes served, is a miss."""
    if d.offset < 0:
        return ""
    try:
        fd = os.open(cache / "files" / d.vid, os.O_RDONLY | os.O_NOATIME)
    except OSError:
        return "evicted before its first use (the file is gone)"
    try:
        try:
            if os.lseek(fd, d.offset, os.SEEK_DATA) > d.offset:
                return "evicted before its first use (a hole there now)"
        except OSError:  # ENXIO: no data from there on
            return "evicted before its first use (a hole there now)"
        now = os.pread(fd, 1, d.offset)
    finally:
        os.close(fd)
    return "" if now and now[0] == d.bad else "evicted before its first use (other bytes there now)"


def probe(mnt: Path, src: Path, key: str, start: int, length: int, timeout: float = 120.0) -> str:
    """Read [start, start+length) of `key` through the mount and compare it with the source: "right bytes",
    "WRONG BYTES ...", the error, or no answer within `timeout` (read in a thread: a read that hangs in
    FUSE cannot be interrupted)."""
    rel = key  # relative to the mount root (the index keeps keys without the source prefix)
    box: list[str] = []

    def run() -> None:
        try:
            with open(src / rel, "rb") as s:
                want = os.pread(s.fileno(), length, start)
            fd = os.open(mnt / rel, os.O_RDONLY)
            try:
                got = b""
                while len(got) < len(want):
                    more = os.pread(fd, len(want) - len(got), start + len(got))
                    if not more:
                        break
                    got += more
            finally:
                os.close(fd)
            if got == want:
                box.append("right bytes")
            else:
                differ = sum(a != b for a, b in zip(got, want, strict=False)) + abs(len(want) - len(got))
                box.append(f"WRONG BYTES ({differ} of {len(want)} differ)")
        except OSError as e:
            box.append(f"error: {e}")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return box[0] if box else f"no answer in {timeout:.0f} s"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_read_waits(url: str) -> dict[str, Any] | None:
    """The daemon's READ-wait histogram (`modelfs_read_wait_seconds`: cumulative bucket counts by `le`,
    sum, count) and its max gauge; None if the daemon does not answer or exports no such histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return None
    out: dict[str, Any] = {"buckets": {}, "sum": 0.0, "count": None, "max": None}
    for fam in text_string_to_metric_families(text):
        if fam.name == "modelfs_read_wait_seconds":
            for smp in fam.samples:
                if smp.name.endswith("_bucket"):
                    out["buckets"][smp.labels["le"]] = smp.value
                elif smp.name.endswith("_sum"):
                    out["sum"] = smp.value
                elif smp.name.endswith("_count"):
                    out["count"] = smp.value
        elif fam.name == "modelfs_read_wait_max_seconds" and fam.samples:
            out["max"] = fam.samples[0].value
    if not out["buckets"]:
        return None
    if out["count"] is None:
        out["count"] = max(out["buckets"].values())
    return out


def histogram_quantile(q: float, buckets: dict[str, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative bucket counts: linear interpolation inside the bucket
    where rank q x count falls (from 0 for the first); the highest finite bound if it falls in +Inf."""
    bs = sorted((float(le), c) for le, c in buckets.items())
    if not bs or bs[-1][1] <= 0:
        return None
    rank = q * bs[-1][1]
    lo, below = 0.0, 0.0
    for le, c in bs:
        if c >= rank:
            if math.isinf(le):
                return lo
            return le if c == below else lo + (le - lo) * (rank - below) / (c - below)
        lo, below = le, c
    return lo


def d_split(stretches: list[tuple[str, float, float]], events: list[Event]) -> dict[str, dict[str, float]]:
    """Per who (daemon, loader): the longest D state outside every cut or restart window (from its start to
    GRACE after its end; the longest piece of a stretch left outside them) and the longest stretch that
    overlapped one, and how many of each were over D_BOUND."""
    wins = sorted((ev.start, ev.end + GRACE) for ev in events if ev.kind in ("cut", "restart"))
    out = {who: {"outside": 0.0, "inside": 0.0, "over_outside": 0, "over_inside": 0} for who in ("daemon", "loader")}
    for who, a, b in stretches:
        hits = [(max(a, lo), min(b, hi)) for lo, hi in wins if lo < b and hi > a]
        pieces, cur = [], a
        for lo, hi in hits:
            if lo > cur:
                pieces.append(lo - cur)
            cur = max(cur, hi)
        if b > cur:
            pieces.append(b - cur)
        outside = max(pieces, default=0.0)
        o = out[who]
        o["outside"] = max(o["outside"], outside)
        if outside > D_BOUND:
            o["over_outside"] += 1
        if hits:
            o["inside"] = max(o["inside"], b - a)
            if b - a > D_BOUND and outside <= D_BOUND:
                o["over_inside"] += 1
    return out


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Event:
    kind: str  # cut, restart, flip, truncate, corrupt (cache damage, while a restart's daemon is down), hang
    start: float
    end: float = 0.0
    detail: str = ""


#: Damage to cache files, put in while no daemon runs (one of each at every restart): a byte flipped in
#: place through the filesystem, the file truncated, a byte changed on the device under the filesystem.
CACHE_FAULTS = ("flip", "truncate", "corrupt")


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path, disk: LoopFs, metrics_url: str, store_port: int) -> None:
        self.args = args
        self.work = work
        self.disk = disk
        self.cache = disk.mountpoint / "cache"
        self.metrics_url = metrics_url
        self.store_port = store_port  # the fault proxy's: the daemon's connections to the store
        self.metrics_port = int(metrics_url.rsplit(":", 1)[1].split("/", 1)[0])
        self.minutes = args.minutes
        self.quota = int(QUOTA * args.scale)
        scale = min(1.0, self.minutes / 60)
        # An hour: cuts at 7.5, 22.5, 37.5, 52.5 min; restarts at 15, 35, 55 (none lands in a cut), and while
        # each restart's daemon is down, one cache file of each CACHE_FAULTS kind damaged.
        self.every = {"cut": 15 * 60 * scale, "restart": 20 * 60 * scale}
        self.offset = {"cut": 7.5 * 60 * scale, "restart": 15 * 60 * scale}
        self.cut_for = 60 * scale if scale < 1 else 60.0
        self.planned = {k: self.planned_count(k) for k in self.every}
        self.planned.update(dict.fromkeys(CACHE_FAULTS, self.planned["restart"]))
        self.damage: list[Damage] = []
        # Per restart: the cache damage put in, what the next daemon counted (corrupt_extents once every
        # probe was answered), and the checker thread (probes run beside the schedule).
        self.damage_rounds: list[dict[str, Any]] = []
        self.checkers: list[threading.Thread] = []
        self.allocation: dict[str, int] = {}  # allocation(), once the last daemon is gone
        self.samples: list[dict[str, Any]] = []
        self.events: list[Event] = []
        self.loads: list[Load] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.d_since: dict[tuple[str, int], tuple[float, float]] = {}  # first seen: monotonic, wall clock
        # Continuous D: one uninterruptible sleep, no timeslice run between samples (first and last seen,
        # wall clock, and the thread's timeslice count).
        self.c_open: dict[tuple[str, int], tuple[float, float, int]] = {}
        self.c_all: list[tuple[str, float, float]] = []
        self.d_longest: dict[str, float] = {"daemon": 0.0, "loader": 0.0}
        self.d_all: list[tuple[str, float, float]] = []  # every D stretch: who, from, to (wall clock)
        self.rnd = random.Random(42)
        self.totals = dict.fromkeys(("corrupt_extents", "files_corrupt", "bytes_fetched", "bytes_served",
                                     "pushed_bytes", "gets", "hedged_gets", "store_errors", "read_timeouts",
                                     "offline_misses", "evictions"), 0)
        self.d_stretches: list[dict[str, Any]] = []  # every D state over 5 s: who, how long, where
        self.wchan: dict[tuple[str, int], str] = {}
        self.t0 = time.time()
        # READ waits of every daemon (restarts included): bucket counts summed, the max of the maxima.
        self.read_wait: dict[str, Any] = {"buckets": {}, "sum": 0.0, "count": 0.0, "max": None, "daemons": 0}
        self.last_scrape: dict[str, Any] | None = None
        self.dwatch: threading.Thread | None = None

    def planned_count(self, kind: str) -> int:
        """How many `kind` faults the schedule holds (what `due` will fire over the whole run)."""
        n = 0
        while self.offset[kind] + n * self.every[kind] < self.schedule_end(kind):
            n += 1
        return n

    def schedule_end(self, kind: str) -> float:
        return self.minutes * 60 - (self.cut_for if kind == "cut" else 30)

    def add_read_waits(self) -> None:
        """Fold the retiring daemon's READ-wait histogram (its last scrape) into the run's."""
        sc = scrape_read_waits(self.metrics_url) or self.last_scrape
        self.last_scrape = None
        if sc is None:
            return
        rw = self.read_wait
        for le, c in sc["buckets"].items():
            rw["buckets"][le] = rw["buckets"].get(le, 0.0) + c
        rw["sum"] += sc["sum"]
        rw["count"] += sc["count"]
        if sc["max"] is not None:
            rw["max"] = max(rw["max"] or 0.0, sc["max"])
        rw["daemons"] += 1

    def retire(self) -> float:
        """SIGTERM the daemon, keeping its counters (damaged extents caught, bytes fetched and served), once
        its damage checks are done."""
        for t in self.checkers:
            t.join(timeout=300)
        st = self.daemon.stats() or {}
        for k in self.totals:
            self.totals[k] += st.get(k, 0)
        self.add_read_waits()
        return self.daemon.terminate()

    def on_hang(self, load: Load, pids: list[int]) -> None:
        say(f"HANG: slot {load.slot} {load.kind} {load.ckpt}: no progress for {HANG:.0f} s; daemon task tree "
            f"to its log (SIGUSR1)")
        with self.lock:
            self.events.append(Event("hang", time.time(), detail=f"slot {load.slot} {load.kind} {load.ckpt}"))
        with contextlib.suppress(ProcessLookupError):
            if self.daemon.pid:
                os.kill(self.daemon.pid, signal.SIGUSR1)

    def watch_d_state(self, slots: list[Slot]) -> None:
        """Every second: each thread of the daemon and the loaders in D state, and its longest stretch. Every
        stretch is kept with its wall-clock span, so the report can tell those in a cut or a restart apart."""
        while not self.stop.wait(1.0):
            now, wall = time.monotonic(), time.time()
            seen: set[tuple[str, int]] = set()
            pids = [("daemon", self.daemon.pid)] if self.daemon.pid else []
            pids += [("loader", p) for s in slots for p in s.pids()]
            for who, pid in pids:
                for tid, runs in threads_in_d(pid).items():
                    seen.add((who, tid))
                    self.d_since.setdefault((who, tid), (now, wall))
                    key = (who, tid)
                    was = self.c_open.get(key)
                    if was is not None and (was[2] != runs or runs < 0):
                        self.c_all.append((who, was[0], was[1]))  # it ran in between: a new sleep
                        was = None
                    self.c_open[key] = (was[0] if was else wall, wall, runs)
            for key in [k for k in self.c_open if k not in seen]:
                first, last, _ = self.c_open.pop(key)
                self.c_all.append((key[0], first, last))
            for key in list(self.d_since):
                took = now - self.d_since[key][0]
                if key not in seen:
                    self.d_ended(key, took)
                else:
                    self.d_longest[key[0]] = max(self.d_longest[key[0]], took)
                    if took > 3.0 and key not in self.wchan:
                        self.wchan[key] = wchan(key[1])
        for key, (first, last, _) in self.c_open.items():
            self.c_all.append((key[0], first, last))
        now = time.monotonic()
        for key in list(self.d_since):  # still in D when the run ended
            self.d_ended(key, now - self.d_since[key][0])

    def d_ended(self, key: tuple[str, int], took: float) -> None:
        since = self.d_since.pop(key)[1]
        self.d_all.append((key[0], since, since + took))
        if took > D_BOUND:
            self.d_stretches.append({"who": key[0], "tid": key[1], "seconds": took, "started": since - self.t0,
                                     "ended": since + took - self.t0, "wchan": self.wchan.pop(key, "")})
        else:
            self.wchan.pop(key, None)

    def sample(self, t0: float) -> None:
        st = self.daemon.stats() if self.daemon.pid else None
        ps = proc_status(self.daemon.pid) if self.daemon.pid else {"rss": 0, "fds": 0, "threads": 0}
        lmdb = self.cache / "index" / "data.mdb"
        with self.lock:
            done = sum(1 for ld in self.loads if not ld.error)
        s: dict[str, Any] = {"t": time.time() - t0, "pid": self.daemon.pid, **ps,
             "lmdb": lmdb.stat().st_size if lmdb.exists() else 0,
             "cache_disk": cache_bytes(self.cache),
             "cache_stats": (st or {}).get("bytes_in_cache", -1),
             "get_buffers": (st or {}).get("get_buffer_bytes", 0),
             "memory_extents": (st or {}).get("memory_extent_bytes", 0),
             "waiting": fusectl_waiting(self.daemon.minor) if self.daemon.pid else -1,
             "d_daemon": self.d_longest["daemon"], "d_loader": self.d_longest["loader"],
             "loads_ok": done, "stats_answered": st is not None,
             "corrupt_extents": (st or {}).get("corrupt_extents", 0),
             "files_corrupt": (st or {}).get("files_corrupt", 0), "evictions": (st or {}).get("evictions", 0),
             "loadavg": os.getloadavg()[0], "cpu_pressure": cpu_pressure(),
             "thread_kinds": thread_kinds(self.daemon.pid) if self.daemon.pid else {},
             "fd_kinds": fd_kinds(self.daemon.pid, self.cache, self.store_port, self.metrics_port)
             if self.daemon.pid else {}}
        self.samples.append(s)
        if self.daemon.pid:  # after the threads and fds are counted: a scrape runs in a thread of its own
            self.last_scrape = scrape_read_waits(self.metrics_url) or self.last_scrape
        if len(self.samples) % 6 == 0:
            say(f"t={s['t'] / 60:5.1f} min  rss {s['rss'] / MiB:.0f} MiB  fds {s['fds']}  threads {s['threads']}  "
                f"cache {s['cache_disk'] / MiB:.0f}/{self.quota / MiB:.0f} MiB  lmdb {s['lmdb'] / MiB:.1f} MiB  "
                f"waiting {s['waiting']}  loads ok {done}  D max {max(self.d_longest.values()):.1f} s")

    def due(self, kind: str, elapsed: float, done: dict[str, int]) -> bool:
        """True when the next `kind` fault is due (the n-th at offset + n x period, before the end)."""
        at = self.offset[kind] + done[kind] * self.every[kind]
        if elapsed >= at and at < self.schedule_end(kind):
            done[kind] += 1
            return True
        return False

    def log_size(self) -> int:
        with contextlib.suppress(OSError):
            return (self.cache / "modelfs.log").stat().st_size
        return 0

    def damage_cache(self, src: Path, slots: list[Slot]) -> list[Damage]:
        """While no daemon runs: one cache file of each CACHE_FAULTS kind damaged (a different file each),
        none that a loader still has mapped or open (`files_in_use`), among those used last (`candidates`)."""
        try:
            files = cache_files(self.cache)
        except Exception as e:  # no index yet, or one the daemon left half-written: nothing to damage
            say(f"cannot read the cache index to damage a file: {e}")
            files = []
        used = files_in_use(files, [p for s in slots for p in s.pids()], src)
        taken = set(used)
        out: list[Damage] = []
        for kind in CACHE_FAULTS:
            t = time.time()
            got: Damage | None = None
            why = "no file"
            fit = [f for f in files if any(s + e[1] > f.size // 2 for s, e in f.extents.items())] \
                if kind == "truncate" else [f for f in files if f.unique]
            for f in candidates(fit, taken, self.rnd):
                try:
                    got = (flip_in_place(f, self.rnd) if kind == "flip" else truncate_file(f, self.rnd)
                           if kind == "truncate" else corrupt_file(self.disk, f, self.rnd))
                except (OSError, ValueError, RuntimeError) as e:  # corrupt: the byte has no plain block, ...
                    why = f"{f.key}: {e}"
                    say(f"could not damage cache file {f.path.name} ({kind}): {e}")
                    continue
                taken.add(f.vid)
                break
            if got is None:
                self.events.append(Event(kind, t, time.time(), f"no file ({why})"))
                say(f"no cache file to damage ({kind}): {why}")
                continue
            got.in_use = len(used)
            say(f"damaged a cache file while no daemon runs ({kind}): {got.detail}")
            self.events.append(Event(kind, t, time.time(), got.detail))
            out.append(got)
        self.damage.extend(out)
        return out

    def check_damage(self, damage: list[Damage], log_from: int, mnt: Path, src: Path) -> None:
        """The next daemon's first use of each damaged extent, forced now (loaders may get there first): read
        through the mount, compared with the source. Then its log must name each damage as dropped, and its
        corrupt_extents count them."""
        for d in damage:
            d.probe = probe(mnt, src, d.key, d.start, d.length)
        st = self.daemon.stats() or {}
        text = ""
        with contextlib.suppress(OSError), open(self.cache / "modelfs.log", "rb") as f:
            f.seek(log_from)
            text = f.read().decode(errors="replace")
        for d in damage:
            needle = (f"cache file {d.vid} is " if d.kind == "truncate" else
                      f"cache file of version {d.vid}: extent at {d.start} is ")
            d.log_line = next((ln.strip() for ln in text.splitlines() if needle in ln), "")
            if not d.log_line:
                d.evicted = after_probe(d, self.cache)
            say(f"{d.kind} {d.key}@{d.start}: {d.probe}; " + (
                f"dropped by the next daemon ({d.log_line[-160:]})" if d.log_line else
                d.evicted or "NOT dropped by the next daemon, and the damaged byte is still in its cache file"))
        self.damage_rounds.append({"daemon": self.daemon.pid,
                                   "expected": sum(d.expected for d in damage if d.log_line),
                                   "counted": st.get("corrupt_extents", -1),
                                   "files_corrupt": st.get("files_corrupt", -1), "damage": [d.vid for d in damage]})

    def run(self, modelfs: Modelfs, src: Path, refs: Path, proxy: FaultProxy, rules: dict[str, Rule]) -> None:
        mnt = self.work / "mnt"
        mnt.mkdir()
        self.daemon = Daemon(modelfs, mnt, self.cache)
        self.daemon.start()
        slots = [Slot(n, mnt, src, refs, self.stop, self.loads, self.lock, self.on_hang)
                 for n in range(self.args.loaders)]
        t0 = self.t0 = time.time()
        for s in slots:
            s.start()
        self.dwatch = threading.Thread(target=self.watch_d_state, args=(slots,), daemon=True)
        self.dwatch.start()
        done = dict.fromkeys(self.every, 0)
        next_sample = 0.0
        try:
            while (elapsed := time.time() - t0) < self.minutes * 60:
                if elapsed >= next_sample:
                    self.sample(t0)
                    next_sample += 10
                if self.due("cut", elapsed, done):
                    ev = Event("cut", time.time())
                    say(f"network cut for {self.cut_for:.0f} s (proxy blackholed)")
                    proxy.blackhole(True)
                    while time.time() < ev.start + self.cut_for:
                        time.sleep(1)
                        if time.time() - t0 >= next_sample:
                            self.sample(t0)
                            next_sample += 10
                    proxy.blackhole(False)
                    ev.end = time.time()
                    self.events.append(ev)
                if self.due("restart", elapsed, done):
                    ev = Event("restart", time.time())
                    took = self.retire()
                    damage = self.damage_cache(src, slots)
                    log_from = self.log_size()
                    self.daemon.start()
                    ev.end = time.time()
                    ev.detail = (f"exit {took:.1f} s after SIGTERM, {len(damage)} cache files damaged, serving "
                                 f"again {ev.end - ev.start:.1f} s after it")
                    say(f"restart: {ev.detail}")
                    self.events.append(ev)
                    t = threading.Thread(target=self.check_damage, args=(damage, log_from, mnt, src), daemon=True)
                    self.checkers.append(t)
                    t.start()
                time.sleep(0.5)
        finally:
            self.stop.set()
            for t in self.checkers:
                t.join(timeout=300)
            for s in slots:
                s.join(timeout=GIVE_UP + 30)
                s.kill()
            self.faults = {name: r.fired for name, r in rules.items()}
            self.gets = proxy.requests_matching("GET")
            if self.daemon.pid:
                self.retire()
            force_unmount(mnt)
            try:
                self.allocation = allocation(self.cache)
            except OSError as e:
                say(f"cannot measure the cache's allocation: {e}")
            self.dwatch.join(timeout=10)
        self.t0 = t0


# -- report ---------------------------------------------------------------------------------------


def in_window(load: Load, events: list[Event]) -> bool:
    """Whether a load overlapped a cut or a restart (plus GRACE after it)."""
    return any(ev.kind in ("cut", "restart") and load.start <= ev.end + GRACE and load.end >= ev.start
               for ev in events)


def report(soak: Soak, args: argparse.Namespace, quota: int, distinct: int) -> tuple[list[str], bool]:
    loads, events, samples, tot = soak.loads, soak.events, soak.samples, soak.totals
    ok = [ld for ld in loads if not ld.error]
    cold = sum(1 for ld in ok if ld.cold)
    failed = [ld for ld in loads if ld.error]
    failed_in = [ld for ld in failed if in_window(ld, events)]
    failed_out = [ld for ld in failed if not in_window(ld, events)]
    hung = [ld for ld in loads if ld.hung]
    damage = soak.damage
    wrong_probes = [d for d in damage if d.probe.startswith("WRONG")]
    mismatches = sum(ld.mismatches for ld in loads) + len(wrong_probes)
    verified = sum(ld.bytes for ld in loads) + sum(d.length for d in damage if d.probe == "right bytes")
    warm = min(5 * 60, args.minutes * 60 / 6)
    span = min(10 * 60, (args.minutes * 60 - warm) / 2)
    first = [s for s in samples if warm <= s["t"] < warm + span and s["pid"]]
    last = [s for s in samples if s["t"] >= args.minutes * 60 - span and s["pid"]]

    def drift(key: str) -> tuple[float, float, float]:
        a = max((s[key] for s in first), default=0)
        b = max((s[key] for s in last), default=0)
        return a, b, (b / a if a else float("inf"))

    # Pools grow on demand up to a cap and are no leak when a daemon that meets a busier minute (or a
    # restart's new daemon that meets one) holds more: connections to the store (s3.max_pool_connections),
    # GET buffers (made on first use, kept: fetch.memory_budget), extents held in memory when the cache has no
    # room (cache.map_budget) and trio's worker threads (one per blocking call in flight, each under a
    # CapacityLimiter; idle ones leave trio's cache after 10 s). So fds, RSS and
    # threads are compared with their pool set aside, and each pool is held to its cap instead.
    cfg = load_config(None, dict(o.split("=", 1) for o in args.modelfs_option or []))
    pool_cap = cfg.s3.max_pool_connections
    buffers_cap = cfg.get_buffers * int(cfg.cache.extent_size)
    workers_cap = worker_cap(cfg)
    for s in samples:
        s["store_conns"] = s.get("fd_kinds", {}).get("TCP to the store", 0)
        s["fds_unpooled"] = s["fds"] - s["store_conns"]
        s["rss_unpooled"] = s["rss"] - s.get("get_buffers", 0) - s.get("memory_extents", 0)
        kinds = s.get("thread_kinds", {})
        s["workers"] = sum(v for k, v in kinds.items() if k.startswith("trio worker"))
        s["threads_unpooled"] = sum(kinds.values()) - s["workers"]
    rss, fds, thr, lmdb = drift("rss_unpooled"), drift("fds_unpooled"), drift("threads_unpooled"), drift("lmdb")
    conns = max((s["store_conns"] for s in samples), default=0)
    bufs = max((s.get("get_buffers", 0) for s in samples), default=0)
    held = max((s.get("memory_extents", 0) for s in samples), default=0)
    workers = max((s["workers"] for s in samples), default=0)
    cache_max = max((s["cache_disk"] for s in samples), default=0)
    stats_max = max((s["cache_stats"] for s in samples), default=0)
    at_max = next((s for s in samples if s["cache_disk"] == cache_max), None)
    dsplit = d_split(soak.d_all, events)
    d_out = {who: dsplit[who]["outside"] for who in dsplit}
    d_in = {who: dsplit[who]["inside"] for who in dsplit}
    csplit = d_split(soak.c_all, events)
    c_out = {who: csplit[who]["outside"] for who in csplit}
    c_in = {who: csplit[who]["inside"] for who in csplit}
    restarts = [e for e in events if e.kind == "restart"]
    cuts = [e for e in events if e.kind == "cut"]
    injected = {k: sum(1 for d in damage if d.kind == k) for k in CACHE_FAULTS}
    caught = {k: sum(1 for d in damage if d.kind == k and d.caught) for k in CACHE_FAULTS}
    evicted = sum(1 for d in damage if d.evicted and not d.caught)
    expected = sum(d.expected for d in damage)
    undercounted = [r for r in soak.damage_rounds if r["counted"] < r["expected"]]
    rw = soak.read_wait
    if rw["daemons"] and rw["count"]:
        p50, p99 = (histogram_quantile(q, rw["buckets"]) for q in (0.50, 0.99))
        wait_row = (f"{fmt_s(p50)} / {fmt_s(p99)} / {fmt_s(rw['max'])} over {rw['count']:.0f} READs "
                    f"({rw['daemons']} daemons)")
    else:
        wait_row = "n/a (no daemon exported modelfs_read_wait_seconds)"
    longest_unit = max((ld.longest_unit for ld in loads), default=0)
    checks = {
        "mismatches": mismatches == 0,
        "hung loads": not hung,
        "failures outside a cut or restart": not failed_out,
        "RSS flat": rss[2] <= 1.10,
        "GET buffers within fetch.memory_budget": bufs <= buffers_cap,
        "extents in memory within cache.map_budget": held <= int(cfg.cache.map_budget),
        "fds flat": fds[2] <= 1.10,
        "store connections within the pool": conns <= pool_cap,
        "threads flat": thr[2] <= 1.10,
        "worker threads within their limiters": workers <= workers_cap,
        "cache within quota": cache_max <= quota,
        "no D state over 5 s outside a cut or restart": max(c_out.values()) <= D_BOUND,
        "cache faults as planned": all(injected[k] >= soak.planned[k] for k in CACHE_FAULTS),
        "cache damage caught by the next daemon": all(d.handled for d in damage) and not undercounted
        and len(soak.damage_rounds) == len(restarts),
    }
    by_kind = {k: sum(1 for ld in ok if ld.kind == k) for k in KINDS}
    gets = soak.gets
    faulted = sum(soak.faults.values())
    lines = [
        f"{args.minutes:g} minutes on one 2-core machine ({time.strftime('%Y-%m-%d')}), {args.loaders} loader "
        f"processes; working set {distinct / MiB:.0f} MiB of distinct bytes, cache quota {quota / MiB:.0f} MiB "
        f"({distinct / quota:.1f}x).",
        f"Faults: {faulted} of {gets} GETs ({100 * faulted / max(1, gets):.1f} %: "
        + ", ".join(f"{k} {v}" for k, v in soak.faults.items()) + f"); {len(cuts)} network cuts of "
        f"{soak.cut_for:.0f} s; {len(restarts)} SIGTERM + restarts, and while each restart's daemon was down, "
        f"cache files damaged: {injected['flip']} with a byte flipped in place, {injected['truncate']} truncated "
        f"to half, {injected['corrupt']} with a byte changed on the device under the filesystem (pages dropped).",
        "",
        "Cache damage is put in only between daemons now, a weaker fault model than before, which the cache "
        "design requires: a daemon hashes bytes when they arrive and the first time it reads them back from "
        "disk, then serves that cache file as it is (through its READs, or by the kernel through FUSE "
        "passthrough once the file is complete), so a change to a cache file under a daemon that has already "
        "checked it is not caught by that daemon. The next daemon checks before it serves, so damage made "
        "while none runs must be caught at first use, dropped, refetched and counted; the soak reads each "
        "damaged extent through the next daemon's mount to make that first use happen, and requires the right "
        "bytes, the daemon's log line and its corrupt_extents count for each, unless the daemon evicted it before "
        "anything read it (only extents whose content no other "
        "extent has are damaged: shared content may rightly be served from another trusted copy). Damage under "
        "a running daemon "
        "is not tested any more; kernel-verified storage (fs-verity, btrfs data checksums) is the planned "
        "remedy for it. Files a loader still had mapped or open across the restart (a passthrough mapping "
        "outlives its daemon) are not damaged, for the same reason.",
        "",
        "| measure | result | bound | met |",
        "| --- | ---: | --- | --- |",
        f"| loads completed, every byte checked | {len(ok)} (" + ", ".join(f"{k} {v}" for k, v in by_kind.items())
        + f"; {cold} after dropping the checkpoint's pages from the page cache) | | |",
        f"| bytes verified | {verified / 2**30:.1f} GiB | | |",
        f"| mismatches | {mismatches} | 0 | {'yes' if checks['mismatches'] else 'NO'} |",
        f"| cache files damaged while no daemon ran: flipped in place / truncated / changed under the "
        f"filesystem | {injected['flip']} / {injected['truncate']} / {injected['corrupt']} | >= "
        f"{soak.planned['flip']} / {soak.planned['truncate']} / {soak.planned['corrupt']} | "
        f"{'yes' if checks['cache faults as planned'] else 'NO'} |",
        f"| of them caught by the next daemon at first use (dropped per its log, right bytes read through the "
        f"mount), same order | {caught['flip']} / {caught['truncate']} / {caught['corrupt']} ({evicted} evicted "
        f"before any read: not counted as caught, nor as missed); its corrupt_extents "
        f"{', '.join(str(r['counted']) for r in soak.damage_rounds) or '-'} against "
        f"{', '.join(str(r['expected']) for r in soak.damage_rounds) or '-'} damaged extents caught per restart | "
        f"all that were read, each counted | {'yes' if checks['cache damage caught by the next daemon'] else 'NO'} |",
        f"| loads failed during a cut or a restart | {len(failed_in)} | allowed, counted | |",
        f"| loads failed outside one | {len(failed_out)} | 0 | "
        f"{'yes' if checks['failures outside a cut or restart'] else 'NO'} |",
        f"| loads hung past fetch.deadline + 10 s ({HANG:.0f} s without progress) | {len(hung)} (longest unit "
        f"{longest_unit:.1f} s) | 0 | {'yes' if checks['hung loads'] else 'NO'} |",
        f"| daemon RSS but its GET buffers and the extents it holds in memory, max of first / last 10 min | "
        f"{rss[0] / MiB:.0f} / {rss[1] / MiB:.0f} "
        f"MiB ({rss[2]:.2f}x; RSS in all, max {max((s['rss'] for s in samples), default=0) / MiB:.0f} MiB) "
        f"| <= 1.10x | {'yes' if checks['RSS flat'] else 'NO'} |",
        f"| GET buffers made (get_buffer_bytes), max of any sample | {bufs / MiB:.0f} MiB | <= "
        f"{buffers_cap / MiB:.0f} MiB (fetch.memory_budget in whole extents) | "
        f"{'yes' if checks['GET buffers within fetch.memory_budget'] else 'NO'} |",
        f"| extents held in memory, the cache having no room (memory_extent_bytes), max of any sample | "
        f"{held / MiB:.0f} MiB | <= {int(cfg.cache.map_budget) / MiB:.0f} MiB (cache.map_budget) | "
        f"{'yes' if checks['extents in memory within cache.map_budget'] else 'NO'} |",
        f"| open fds but the pooled connections to the store, same | {fds[0]:.0f} / {fds[1]:.0f} ({fds[2]:.2f}x) | "
        f"<= 1.10x | {'yes' if checks['fds flat'] else 'NO'} |",
        f"| connections to the store, max of any sample | {conns} | <= s3.max_pool_connections ({pool_cap}) | "
        f"{'yes' if checks['store connections within the pool'] else 'NO'} |",
        f"| threads but trio's worker threads, same | {thr[0]:.0f} / {thr[1]:.0f} ({thr[2]:.2f}x) | <= 1.10x | "
        f"{'yes' if checks['threads flat'] else 'NO'} |",
        f"| trio worker threads (busy or idle in trio's cache), max of any sample | {workers} | <= {workers_cap} "
        f"(the daemon's CapacityLimiters and trio's default one) | "
        f"{'yes' if checks['worker threads within their limiters'] else 'NO'} |",
        f"| LMDB file, same | {lmdb[0] / MiB:.1f} / {lmdb[1] / MiB:.1f} MiB | | |",
        f"| cache bytes on disk (allocated: st_blocks x 512 of files/), max (the daemon's count then: "
        f"{(at_max or {}).get('cache_stats', 0) / MiB:.1f} MiB; its max: {stats_max / MiB:.1f} MiB) | "
        f"{cache_max / MiB:.1f} MiB | <= quota {quota / MiB:.0f} MiB | "
        f"{'yes' if checks['cache within quota'] else 'NO'} |",
        f"| longest D state outside a cut or a restart (from its start to {GRACE:.0f} s after it): one "
        f"uninterruptible sleep, the thread ran no timeslice between samples, daemon / loaders | "
        f"{c_out['daemon']:.0f} / {c_out['loader']:.0f} s (sampled every 1 s; over {D_BOUND:.0f} s: "
        f"{csplit['daemon']['over_outside']} / {csplit['loader']['over_outside']}) | <= {D_BOUND:.0f} s | "
        f"{'yes' if checks['no D state over 5 s outside a cut or restart'] else 'NO'} |",
        f"| the same inside a cut or a restart, daemon / loaders | {c_in['daemon']:.0f} / {c_in['loader']:.0f} s "
        f"(over {D_BOUND:.0f} s: {csplit['daemon']['over_inside']} / {csplit['loader']['over_inside']}) | "
        f"allowed, reported | |",
        f"| seen in D at consecutive samples (waits for one read after another count as one), outside / inside "
        f"a cut or a restart, daemon / loaders | {d_out['daemon']:.0f} / {d_out['loader']:.0f} s, "
        f"{d_in['daemon']:.0f} / {d_in['loader']:.0f} s (over {D_BOUND:.0f} s outside: "
        f"{dsplit['daemon']['over_outside']} / {dsplit['loader']['over_outside']}) | reported | |",
        f"| demand READ wait p50 / p99 / max (modelfs_read_wait_seconds) | {wait_row} | | |",
        f"| requests waiting in the kernel, max | {max((s['waiting'] for s in samples), default=0)} | | |",
        f"| CPU contention: load average (1 min) median / max; PSI cpu some avg10 median / max | "
        f"{median([s['loadavg'] for s in samples]):.1f} / {max((s['loadavg'] for s in samples), default=0):.1f}; "
        f"{median([s['cpu_pressure'] for s in samples]):.0f} / "
        f"{max((s['cpu_pressure'] for s in samples), default=0):.0f} % | reported | |",
        f"| damaged extents dropped and refetched (corrupt_extents, all daemons; files found damaged at a "
        f"passthrough check: files_corrupt) | {tot['corrupt_extents']} of {expected} damaged ({tot['files_corrupt']}"
        f" files) | | |",
        f"| bytes fetched from the store / bytes the daemon answered READs with or pushed to the page cache | "
        f"{tot['bytes_fetched'] / 2**30:.1f} / {(tot['bytes_served'] + tot['pushed_bytes']) / 2**30:.1f} GiB | | |",
        f"| GETs, hedged GETs, store errors, reads refused offline | {tot['gets']}, {tot['hedged_gets']}, "
        f"{tot['store_errors']}, {tot['offline_misses']} | | |",
        "",
        "Restarts: " + ("; ".join(e.detail for e in restarts) or "none") + ".",
        "",
        "Cache damage: " + ("; ".join(f"{d.kind} {d.detail}: {d.probe}, "
                                      + ("dropped" if d.log_line else d.evicted or "NOT dropped") for d in damage)
                            or "none") + ".",
        "",
        "Daemon threads and fds by kind, at the peak of the first / last window: "
        + composition(first, "threads") + " / " + composition(last, "threads") + "; "
        + composition(first, "fds") + " / " + composition(last, "fds") + ".",
        "",
        "Per daemon (pid, life: threads min..max, last; fds min..max, last): " + per_daemon(samples) + ".",
        "",
        allocation_line(soak.allocation, samples),
    ]
    return lines, all(checks.values())


def allocation_line(al: dict[str, int], samples: list[dict[str, Any]]) -> str:
    over = [s["cache_disk"] - s["cache_stats"] for s in samples if s["pid"] and s["cache_stats"] >= 0]
    line = (f"Cache bytes on disk (allocated) minus the daemon's count (present extents) at the same sample: "
            f"max {max(over, default=0) / MiB:.2f} MiB, median {sorted(over)[len(over) // 2] / MiB if over else 0:.2f} "
            f"MiB.")
    if al:
        line += (f" At the end, no daemon running: {al['allocated'] / MiB:.2f} MiB allocated in {al['files']} files "
                 f"for {al['present'] / MiB:.2f} MiB of present extents: {al['rounding'] / MiB:.2f} MiB of the blocks "
                 f"they cover beyond their bytes, {al['outside'] / MiB:.2f} MiB of data outside every present "
                 f"extent's blocks (left by punches), {al['metadata'] / MiB:.2f} MiB of filesystem metadata.")
    return line


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if xs else 0.0


def worker_cap(cfg: Config) -> int:
    """The most worker threads the daemon's limiters let run at once (core, extents, fetch and the small
    limiters of modelfs/*.py; trio's default limiter, 40, takes every other blocking call): a daemon above it
    has threads no limiter accounts for."""
    io = cfg.fetch.io_threads
    # fetch: 2 per GET buffer; extents: 2 x (READ + prefetch disk tokens); core's own io/meta calls; shared,
    # passthrough, scrub, push and core's one-at-a-time limiters; trio's default.
    return 2 * cfg.get_buffers + 2 * (io + io) + io + 4 + 4 + 1 + 1 + 2 + 1 + 40


def composition(window: list[dict[str, Any]], key: str) -> str:
    """What the threads (or fds) were at the window's sample with the most of them."""
    if not window:
        return "n/a"
    s = max(window, key=lambda s: s[key])
    kinds = s["thread_kinds" if key == "threads" else "fd_kinds"]
    return f"{s[key]} at {s['t']:.0f} s (" + ", ".join(f"{v} {k}" for k, v in kinds.items()) + ")"


def per_daemon(samples: list[dict[str, Any]]) -> str:
    """Each daemon's threads and fds over its own life (samples from 20 s after its start: not its start-up)."""
    lives: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        if s["pid"]:
            lives.setdefault(s["pid"], []).append(s)
    out = []
    for pid, ss in lives.items():
        begin = ss[0]["t"]
        settled = [s for s in ss if s["t"] >= begin + 20] or ss
        out.append(f"{pid}, {begin:.0f}-{ss[-1]['t']:.0f} s: threads {min(s['threads'] for s in settled)}.."
                   f"{max(s['threads'] for s in settled)}, {settled[-1]['threads']}; fds "
                   f"{min(s['fds'] for s in settled)}..{max(s['fds'] for s in settled)}, {settled[-1]['fds']}")
    return "; ".join(out) or "none"


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def chart(soak: Soak, path: Path, quota: int, minutes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in soak.samples]
    fig, axes = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True)
    axes[0].plot(t, [s["rss"] / MiB for s in soak.samples], color="tab:blue")
    axes[0].set_ylabel("daemon RSS (MiB)")
    axes[0].set_ylim(bottom=0)
    axes[1].plot(t, [s["cache_disk"] / MiB for s in soak.samples], color="tab:green", label="cache bytes on disk")
    axes[1].axhline(quota / MiB, color="tab:red", linestyle="--", label="quota (cache.max_size)")
    axes[1].set_ylabel("cache (MiB)")
    axes[1].set_ylim(bottom=0)
    axes[1].legend(loc="lower right", fontsize=8)
    per_min = [0] * (int(minutes) + 1)
    for ld in soak.loads:
        if not ld.error:
            per_min[min(int((ld.end - soak.t0) / 60), len(per_min) - 1)] += 1
    axes[2].bar([m + 0.5 for m in range(len(per_min))], per_min, width=0.9, color="tab:gray")
    axes[2].set_ylabel("loads completed / min")
    axes[2].set_xlabel("minutes")
    for ax in axes:
        for ev in soak.events:
            a, b = (ev.start - soak.t0) / 60, (ev.end - soak.t0) / 60
            if ev.kind == "cut":
                ax.axvspan(a, b, color="tab:orange", alpha=0.25, lw=0)
            elif ev.kind == "restart":
                ax.axvline(a, color="tab:purple", lw=1.2)
            elif ev.kind == "flip":
                ax.axvline(a, color="tab:red", lw=0.8, linestyle=":")
            elif ev.kind == "truncate":
                ax.axvline(a, color="tab:brown", lw=0.8, linestyle="--")
            elif ev.kind == "corrupt":
                ax.axvline(a, color="black", lw=0.8, linestyle="-.")
    axes[0].set_title("modelfs soak: network cuts (orange), restarts (purple); cache files damaged while no daemon "
                      "ran: flipped (red dotted), truncated (brown dashed), changed under the fs (black)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES") or 60))
    ap.add_argument("--loaders", type=int, default=4)
    ap.add_argument("--scale", type=float, default=1.0, help="checkpoint and quota size factor")
    ap.add_argument("--fault-rate", type=float, default=0.10, help="share of GETs answered with a fault")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir (sources, cache, logs)")
    ap.add_argument("--modelfs-option", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    for sig in (signal.SIGTERM, signal.SIGHUP):  # unwind through every finally: mounts and servers cleaned up
        signal.signal(sig, raise_exit)
    work = Path(tempfile.mkdtemp(prefix="modelfs-soak-"))
    quota = int(QUOTA * args.scale)
    server: SeaweedServer | None = None
    try:
        src = work / "src"
        say("generating three checkpoints (base with a manifest, its fine-tune, one without a manifest)")
        distinct = make_sources(src, args.scale)
        refs = references(src)
        (work / "refs.json").write_text(json.dumps(refs))
        server = SeaweedServer(work / "weed").start()
        server.create_bucket(BUCKET)
        env = server.env()
        for ckpt in ("base", "ft"):
            r = subprocess.run([sys.executable, "-m", "modelfs", "publish", "-q", str(src / ckpt),
                                f"s3://{BUCKET}/{PREFIX}{ckpt}/"], env={**os.environ, **env},
                               capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"modelfs publish failed: {r.stderr.strip()[-500:]}")
        server.upload_dir(src / "plain", BUCKET, f"{PREFIX}plain/")
        # The cache dir on an ext4 of its own, so cache files can be damaged under the filesystem (strictatime:
        # the files' atimes say which were read last).
        with loop_ext4(work, quota + DISK_SLACK, mountpoint=work / "cachedisk", options="strictatime") as disk, \
                FaultProxy(server.endpoint_url, seed=3) as proxy:
            each = args.fault_rate / 4
            # Each rule sees the GETs the ones before it spared: these shares make about `fault_rate` in all.
            rules = {name: proxy.add_rule(fault, method="GET", probability=min(1.0, each / (1 - n * each)))
                     for n, (name, fault) in enumerate((
                         ("503", Fault.slow_down()), ("reset", Fault.reset(after_bytes=256 << 10)),
                         ("truncated", Fault.truncate(fraction=0.5)), ("stalled", Fault.stall(READ_TIMEOUT + 5))))}
            store = Store(proxy.endpoint_url, BUCKET, PREFIX, {**env, "AWS_ENDPOINT_URL": proxy.endpoint_url})
            metrics = f"127.0.0.1:{free_port()}"
            opts = [f"cache.max_size={quota}", f"s3.read_timeout={READ_TIMEOUT:g}",
                    f"fetch.deadline={FETCH_DEADLINE:g}", f"metrics.address={metrics}", *args.modelfs_option]
            soak = Soak(args, work, disk, f"http://{metrics}/metrics", proxy.port)
            say(f"soak: {args.minutes:g} min, {args.loaders} loaders, {distinct / MiB:.0f} MiB distinct over "
                f"a {quota / MiB:.0f} MiB quota, {100 * args.fault_rate:.0f} % of GETs faulted; work dir {work}")
            soak.run(Modelfs(store, work, opts), src, work / "refs.json", proxy, rules)
            with contextlib.suppress(OSError):  # out of the cache disk before it goes
                shutil.copy(soak.cache / "modelfs.log", work / "modelfs.log")
        log = (work / "modelfs.log").read_text(errors="replace") if (work / "modelfs.log").exists() else ""
        lines, passed = report(soak, args, quota, distinct)
        args.out.mkdir(parents=True, exist_ok=True)
        chart(soak, args.out / "soak.png", quota, args.minutes)
        (args.out / "soak.md").write_text("\n".join(lines) + "\n")
        (args.out / "soak.json").write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "samples": soak.samples,
            "events": [asdict(e) for e in soak.events], "loads": [asdict(ld) for ld in soak.loads],
            "faults": soak.faults, "totals": soak.totals, "d_stretches": soak.d_stretches,
            "d_split": d_split(soak.d_all, soak.events), "d_split_continuous": d_split(soak.c_all, soak.events),
            "planned": soak.planned, "read_wait": soak.read_wait,
            "damage": [{**asdict(d), "caught": d.caught, "handled": d.handled} for d in soak.damage],
            "damage_rounds": soak.damage_rounds,
            "allocation": soak.allocation,
            "d_continuous_over_2s": [d for d in soak.c_all if d[2] - d[1] > 2.0],
            "d_all_over_2s": [d for d in soak.d_all if d[2] - d[1] > 2.0]}, indent=0))
        print("\n".join(lines))
        tracebacks = log.count("Traceback")
        if tracebacks:
            say(f"the daemon log has {tracebacks} tracebacks: {work}/modelfs.log")
        if not passed and log:
            shutil.copy(work / "modelfs.log", args.out / "soak-daemon.log")
        return 0 if passed else 1
    finally:
        if server is not None:
            server.stop()
        if is_mounted(work / "mnt"):
            force_unmount(work / "mnt")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
