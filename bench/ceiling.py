"""The read ceiling: a sequential `cat` of the checkpoint through each way of serving it, with the CPU the
serving process spent per MiB.

Rows: local disk (page cache dropped); the floor for serving bytes from Python (`floorfs.py`, a minimal
pyfuse3 filesystem, in pread and mmap modes, backing pages dropped or cached); modelfs cold (empty cache,
from S3), warm (cache files on local disk, new daemon, page cache dropped: served by passthrough), and warm
with passthrough off (every READ through the daemon, which reads the cache file: the path of a file not yet
complete, comparable with the floor). Daemon CPU is utime + stime of
the serving process from /proc/PID/stat around the `cat`, divided by the bytes read. Part of `make bench`
(`bench.py` calls `measure`); alone:

    python bench/ceiling.py [--size-gib 1] [--reps 3]      (root)

`--baseline-tree DIR` adds modelfs cold and warm rows served by another checkout of modelfs (e.g. a
`git worktree` of the commit before a change), interleaved with this one's, for a before/after in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _root  # noqa: F401  (the repository root on sys.path: tests.support)
from peers import Modelfs, Store, force_unmount, wait_serving

HERE = Path(__file__).resolve().parent
FLOORFS = HERE / "floorfs.py"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_split(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def cat(files: list[Path]) -> float:
    """Seconds for `cat FILES > /dev/null` (the kernel's readahead decides the READ sizes)."""
    t = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True, timeout=900)
    return time.perf_counter() - t


@dataclass
class Row:
    """One way of serving: seconds and serving-process CPU seconds per repetition."""

    name: str
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    has_daemon: bool = True

    def to_json(self, nbytes: int) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "seconds": self.seconds, "cpu_seconds": self.cpu}
        if self.seconds:
            out["median_s"] = statistics.median(self.seconds)
        if self.cpu:
            out["median_cpu_ms_per_mib"] = statistics.median(self.cpu) * 1000 / (nbytes / 2**20)
        return out


@contextlib.contextmanager
def floor_mounted(src: Path, mnt: Path, mode: str, log: Path) -> Iterator[int]:
    with open(log, "ab") as logf:
        proc = subprocess.Popen([sys.executable, str(FLOORFS), str(src), str(mnt), mode], stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=logf, start_new_session=True)
    try:
        wait_serving(mnt, proc, log)
        time.sleep(0.3)  # read_ahead_kb is raised just after the mount answers
        yield proc.pid
    finally:
        force_unmount(mnt)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def timed(row: Row, pid: int | None, files: list[Path], prepare: Callable[[], None]) -> None:
    prepare()
    c0 = cpu_seconds(pid) if pid else 0.0
    row.seconds.append(cat(files))
    if pid:
        row.cpu.append(cpu_seconds(pid) - c0)


class ModelfsTree(Modelfs):
    """modelfs from another checkout (its package first on PYTHONPATH), for a before/after in one run."""

    def __init__(self, store: Store, work: Path, options: list[str], tree: Path) -> None:
        super().__init__(store, work, options)
        self.tree = tree

    def cli(self, *args: str, timeout: float = 180) -> str:
        env = {**os.environ, **self.store.env, "PYTHONPATH": str(self.tree)}
        r = subprocess.run([sys.executable, "-P", "-m", "modelfs", *args], capture_output=True, text=True, env=env,
                           timeout=timeout, cwd=self.tree)
        if r.returncode != 0:
            raise RuntimeError(f"modelfs {args[0]} failed: {(r.stderr or r.stdout).strip()[-1500:]}")
        return r.stdout


def measure(src: Path, work: Path, modelfs: Modelfs, reps: int, say: Callable[[str], None] = print,
            baseline: Modelfs | None = None) -> dict[str, Any]:
    """Every row, `reps` times, interleaved by repetition so drift on a shared machine hits all rows alike."""
    names = sorted(p.name for p in src.iterdir() if p.is_file())
    nbytes = sum((src / n).stat().st_size for n in names)
    rows = {k: Row(n) for k, n in [
        ("local", "local disk, page cache dropped"),
        ("floor_pread", "floor (floorfs pread), backing pages dropped"),
        ("floor_mmap_dropped", "floor (floorfs mmap), backing pages dropped"),
        ("floor_mmap_cached", "floor (floorfs mmap), backing pages cached"),
        ("modelfs_cold", "modelfs cold (empty cache, S3)"),
        ("modelfs_warm", "modelfs warm (cache files on disk, new daemon, page cache dropped)"),
        ("modelfs_warm_reads", "modelfs warm, passthrough off (every READ through the daemon)"),
    ]}
    reads = Modelfs(modelfs.store, modelfs.work, [*modelfs.options, "mount.passthrough=off"])
    daemons = [("modelfs_cold", "modelfs_warm", modelfs)]
    if baseline is not None:
        rows["base_cold"] = Row("baseline tree: modelfs cold (empty cache, S3)")
        rows["base_warm"] = Row("baseline tree: modelfs warm (cache on disk, new daemon, page cache dropped)")
        daemons.append(("base_cold", "base_warm", baseline))
    rows["local"].has_daemon = False
    mnt, cache = work / "mnt-ceiling", work / "cache-ceiling"
    mnt.mkdir(exist_ok=True)
    log = work / "floorfs.log"
    for i in range(reps):
        timed(rows["local"], None, [src / n for n in names], drop_caches)
        def cached() -> None:
            drop_caches()
            cat([src / n for n in names])

        for mode, key, prepare in (("pread", "floor_pread", drop_caches), ("mmap", "floor_mmap_dropped", drop_caches),
                                   ("mmap", "floor_mmap_cached", cached)):
            with floor_mounted(src, mnt, mode, log) as pid:
                timed(rows[key], pid, [mnt / n for n in names], prepare)
        for cold, warm, daemon in daemons if i % 2 == 0 else daemons[::-1]:
            shutil.rmtree(cache, ignore_errors=True)
            with daemon.mounted(mnt, cache) as pid:
                timed(rows[cold], pid, [mnt / n for n in names], drop_caches)
            with daemon.mounted(mnt, cache) as pid:
                timed(rows[warm], pid, [mnt / n for n in names], drop_caches)
            if daemon is modelfs:
                with reads.mounted(mnt, cache) as pid:
                    timed(rows["modelfs_warm_reads"], pid, [mnt / n for n in names], drop_caches)
            shutil.rmtree(cache, ignore_errors=True)
        say(f"read ceiling {i + 1}/{reps}: " + ", ".join(
            f"{k} {r.seconds[-1]:.2f} s" + (f" / {r.cpu[-1]:.2f} cpu-s" if r.cpu else "") for k, r in rows.items()))
    return {"bytes": nbytes, "reps": reps, "rows": {k: r.to_json(nbytes) for k, r in rows.items()}}


def markdown(doc: dict[str, Any]) -> str:
    """The read-ceiling table: seconds, GB/s, serving CPU per MiB and its ratio to the pread floor."""
    nbytes = doc["bytes"]
    rows = doc["rows"]
    floor = rows["floor_pread"].get("median_cpu_ms_per_mib")
    out = [f"Sequential `cat` of the checkpoint ({nbytes / 2**30:.2f} GiB), median of {doc['reps']}; CPU = the "
           "serving process's utime + stime (the kernel's share of the copies included).", "",
           "| served by | seconds | GB/s | serving CPU ms per MiB | x floor (pread, dropped) |",
           "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows.values():
        if not r["seconds"]:
            continue
        s = r["median_s"]
        ms = r.get("median_cpu_ms_per_mib")
        ratio = f"{ms / floor:.2f}x" if ms is not None and floor else "—"
        out.append(f"| {r['name']} | {s:.2f} | {nbytes / s / 1e9:.2f} | {f'{ms:.3f}' if ms is not None else '—'} "
                   f"| {ratio} |")
    return "\n".join(out) + "\n"


def main() -> None:
    from tests.support.checkpoints import make_demo_checkpoint
    from tests.support.seaweed import SeaweedServer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modelfs-option", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--baseline-tree", type=Path, help="another modelfs checkout to measure beside this one")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("ceiling: needs root (FUSE mounts and dropping the page cache)")
    work = Path(tempfile.mkdtemp(prefix="modelfs-ceiling-"))
    try:
        src = work / "src"
        make_demo_checkpoint(src, total_bytes=int(args.size_gib * 2**30 * 129 / 128))
        server = SeaweedServer(work / "weed").start()
        try:
            server.create_bucket("ceiling-models")
            server.upload_dir(src, "ceiling-models", "ckpt/")
            store = Store(server.endpoint_url, "ceiling-models", "ckpt/", server.env())
            base = ModelfsTree(store, work, args.modelfs_option, args.baseline_tree.resolve()) \
                if args.baseline_tree else None
            doc = measure(src, work, Modelfs(store, work, args.modelfs_option), args.reps, baseline=base)
        finally:
            server.stop()
        print(markdown(doc), end="")
    finally:
        for p in work.glob("mnt-*"):
            force_unmount(p)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
