"""`make bench`: load one checkpoint from S3 every way there is, side by side, in one run.

A SeaweedFS on loopback serves a generated 4-shard safetensors checkpoint. Each system loads every
tensor (`safetensors.torch.load_file` + copy into fresh tensors, as `load_state_dict` does) in a fresh
Python process; the page cache is dropped before every cold and warm repetition. Systems: local disk,
s5cmd download-then-load, rclone mount (vfs-cache-mode full), s3fs (use_cache), modelfs. Medians of
>= 3 repetitions go to bench/results/results.{json,md,png}; compare only numbers from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from modelfs.testing.checkpoints import make_demo_checkpoint
from modelfs.testing.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedServer

BUCKET = "bench-models"
PREFIX = "ckpt/"
RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent

#: Runs in a fresh interpreter: load every shard, copy each tensor, print seconds; optionally verify.
LOADER = r"""
import json, sys, time
from pathlib import Path
import torch
from safetensors.torch import load_file
d = Path(sys.argv[1])
shards = sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))
t0 = time.perf_counter()
state = {}
for s in shards:
    for k, v in load_file(d / s).items():
        state[k] = v.clone()
elapsed = time.perf_counter() - t0
if len(sys.argv) > 2:
    import xxhash
    want = json.loads(Path(sys.argv[2]).read_text())
    got = {k: xxhash.xxh3_64_hexdigest(v.contiguous().view(torch.uint8).numpy().tobytes()) for k, v in state.items()}
    assert got == want, "tensors differ from the source"
print(elapsed)
"""


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def load(path: Path, verify: Path | None = None, env: dict[str, str] | None = None) -> float:
    args = [sys.executable, "-c", LOADER, str(path)] + ([str(verify)] if verify else [])
    r = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"load of {path} failed: {r.stderr.strip()[-500:]}")
    return float(r.stdout.split()[-1])


def wait_mounted(path: Path, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mount process for {path} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not mount within {timeout}s")
        time.sleep(0.1)


def unmount(path: Path, proc: subprocess.Popen[bytes] | None = None) -> None:
    subprocess.run(["fusermount3", "-u", str(path)], capture_output=True)
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)
    if proc is not None:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class Result:
    system: str
    cold: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)
    hot: list[float] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)

    def median(self, phase: str) -> float | None:
        xs = getattr(self, phase)
        return statistics.median(xs) if xs else None


class Bench:
    def __init__(self, work: Path, server: SeaweedServer, src: Path, hashes: Path, reps: int) -> None:
        self.work = work
        self.server = server
        self.src = src
        self.hashes = hashes
        self.reps = reps
        self.size = sum(p.stat().st_size for p in src.iterdir())
        self.env = server.env()

    def say(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def local(self) -> Result:
        r = Result("local disk")
        for i in range(self.reps):
            drop_caches()
            r.cold.append(load(self.src, self.hashes if i == 0 else None))
        load(self.src)
        r.hot = [load(self.src) for _ in range(self.reps)]
        self.say(f"local: dropped {r.cold}, hot {r.hot}")
        return r

    def s5cmd(self) -> Result:
        r = Result("s5cmd download + load")
        for i in range(self.reps):
            dest = self.work / "s5cmd"
            shutil.rmtree(dest, ignore_errors=True)
            drop_caches()
            t0 = time.perf_counter()
            subprocess.run([str(BIN / "s5cmd"), "--endpoint-url", self.server.endpoint_url, "cp",
                            f"s3://{BUCKET}/{PREFIX}*", f"{dest}/"], check=True, capture_output=True,
                           env={**os.environ, **self.env})
            t_dl = time.perf_counter() - t0
            r.cold.append(t_dl + load(dest, self.hashes if i == 0 else None))
            r.extra.setdefault("download_s", []).append(t_dl)  # type: ignore[union-attr]
            shutil.rmtree(dest, ignore_errors=True)
        self.say(f"s5cmd: {r.cold}")
        return r

    def fuse_system(self, name: str, mount: Callable[[Path, Path], contextlib.AbstractContextManager[object]],
                    after_cold: Callable[[Path], None] | None = None) -> Result:
        """cold: fresh cache + mount; warm: same cache, new mount, page cache dropped; hot: again."""
        r = Result(name)
        mnt = self.work / f"mnt-{name.split()[0]}"
        mnt.mkdir(exist_ok=True)
        for i in range(self.reps):
            cache = self.work / f"cache-{name.split()[0]}-{i}"
            shutil.rmtree(cache, ignore_errors=True)
            with mount(mnt, cache):
                drop_caches()
                r.cold.append(load(mnt, self.hashes if i == 0 else None))
                if after_cold:
                    after_cold(mnt)
        for i in range(self.reps):
            with mount(mnt, self.work / f"cache-{name.split()[0]}-{i}"):
                drop_caches()
                r.warm.append(load(mnt))
                r.hot.append(load(mnt))
        for i in range(self.reps):
            shutil.rmtree(self.work / f"cache-{name.split()[0]}-{i}", ignore_errors=True)
        self.say(f"{name}: cold {r.cold}, warm {r.warm}, hot {r.hot}")
        return r

    @contextlib.contextmanager
    def rclone(self, mnt: Path, cache: Path) -> Iterator[None]:
        env = {**os.environ, "RCLONE_CONFIG_BENCH_TYPE": "s3", "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
               "RCLONE_CONFIG_BENCH_ENDPOINT": self.server.endpoint_url,
               "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": ACCESS_KEY, "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": SECRET_KEY,
               "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true"}
        proc = subprocess.Popen([str(BIN / "rclone"), "mount", f"bench:{BUCKET}/{PREFIX.rstrip('/')}", str(mnt),
                                 "--vfs-cache-mode", "full", "--cache-dir", str(cache), "--read-only"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            wait_mounted(mnt, proc)
            yield
        finally:
            unmount(mnt, proc)

    @contextlib.contextmanager
    def s3fs(self, mnt: Path, cache: Path) -> Iterator[None]:
        passwd = self.work / "s3fs.passwd"
        passwd.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
        passwd.chmod(0o600)
        cache.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(["s3fs", f"{BUCKET}:/{PREFIX.rstrip('/')}", str(mnt), "-f", "-o",
                                 f"url={self.server.endpoint_url},use_path_request_style,passwd_file={passwd},"
                                 f"use_cache={cache},ro"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            wait_mounted(mnt, proc)
            yield
        finally:
            unmount(mnt, proc)

    @contextlib.contextmanager
    def modelfs(self, mnt: Path, cache: Path) -> Iterator[None]:
        r = subprocess.run([sys.executable, "-m", "modelfs", "mount", f"s3://{BUCKET}/{PREFIX}", str(mnt),
                            "--cache-dir", str(cache)], capture_output=True, text=True,
                           env={**os.environ, **self.env})
        if r.returncode != 0:
            raise RuntimeError(f"modelfs mount failed: {r.stderr}")
        try:
            yield
        finally:
            subprocess.run([sys.executable, "-m", "modelfs", "umount", str(mnt)], capture_output=True)
            if os.path.ismount(mnt):
                unmount(mnt)

    def modelfs_system(self) -> Result:
        peaks: list[int] = []
        fetched: list[int] = []

        def after_cold(mnt: Path) -> None:
            pid = int(os.getxattr(mnt, "user.modelfs.pid"))
            with open(f"/proc/{pid}/status") as f:
                peaks.append(next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")))
            fetched.append(json.loads(os.getxattr(mnt, "user.modelfs.stats"))["bytes_fetched"])

        r = self.fuse_system("modelfs", self.modelfs, after_cold)
        r.extra.update(peak_rss_bytes=peaks, bytes_fetched=fetched)
        # Four processes loading the same shards at once through one cold mount.
        mnt, cache = self.work / "mnt-modelfs", self.work / "cache-modelfs-4p"
        shutil.rmtree(cache, ignore_errors=True)
        with self.modelfs(mnt, cache):
            drop_caches()
            t0 = time.perf_counter()
            procs = [subprocess.Popen([sys.executable, "-c", LOADER, str(mnt)], stdout=subprocess.DEVNULL)
                     for _ in range(4)]
            codes = [p.wait(timeout=900) for p in procs]
            wall = time.perf_counter() - t0
            stats = json.loads(os.getxattr(mnt, "user.modelfs.stats"))
        shutil.rmtree(cache, ignore_errors=True)
        r.extra.update(four_process_wall_s=wall, four_process_exit_codes=codes,
                       four_process_bytes_fetched=stats["bytes_fetched"])
        self.say(f"modelfs: peak RSS {[p >> 20 for p in peaks]} MiB, fetched {fetched}, 4 processes {wall:.2f}s "
                 f"fetched {stats['bytes_fetched']}")
        return r


def versions() -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    return {"s5cmd": first_line([str(BIN / "s5cmd"), "version"]), "rclone": first_line([str(BIN / "rclone"),
            "version"]), "s3fs": first_line(["s3fs", "--version"]), "kernel": platform.release(),
            "python": platform.python_version()}


def fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def report(results: list[Result], size: int, reps: int) -> str:
    by = {r.system: r for r in results}
    lines = [f"Checkpoint: {size / 2**30:.2f} GiB, 4 safetensors shards; load = load_file + copy of every tensor, "
             f"fresh process; medians of {reps} runs, seconds (lower is better).", "",
             "| system | cold | warm | hot |", "| --- | ---: | ---: | ---: |"]
    for r in results:
        cold = r.median("cold")
        label = "page cache dropped" if r.system == "local disk" else ""
        lines.append(f"| {r.system} | {fmt(cold)} {label} | {fmt(r.median('warm'))} | {fmt(r.median('hot'))} |")
    m = by.get("modelfs")
    if m is None:
        return "\n".join(lines)
    lines += ["", "| target | measured | target | met |", "| --- | ---: | ---: | :---: |"]

    def row(name: str, value: float | None, target: float, unit: str = "x") -> None:
        ok = value is not None and value <= target
        lines.append(f"| {name} | {fmt(value)}{unit} | <= {target}{unit} | {'yes' if ok else 'NO'} |")

    mc, mw, mh = m.median("cold"), m.median("warm"), m.median("hot")
    if "s5cmd download + load" in by and mc:
        row("cold modelfs / s5cmd-then-load", mc / by["s5cmd download + load"].median("cold"), 0.6)  # type: ignore[operator]
    peers = [by[n].median("cold") for n in ("rclone mount", "s3fs") if n in by and by[n].cold]
    if peers and mc:
        row("cold modelfs / best FUSE peer cold", mc / min(p for p in peers if p), 0.5)
    if "local disk" in by and mw:
        row("warm modelfs / local disk, page cache dropped", mw / by["local disk"].median("cold"), 1.2)  # type: ignore[operator]
    if "local disk" in by and mh:
        row("hot modelfs / local disk hot", mh / by["local disk"].median("hot"), 1.2)  # type: ignore[operator]
    peaks = m.extra.get("peak_rss_bytes") or []
    if peaks:
        row("modelfs daemon peak RSS, cold load (MiB)", max(peaks) / 2**20, 400, " MiB")  # type: ignore[arg-type]
    fetched = m.extra.get("bytes_fetched") or []
    if fetched:
        row("bytes fetched / checkpoint size, cold", max(fetched) / size, 1.02)  # type: ignore[arg-type]
    if "four_process_bytes_fetched" in m.extra:
        row("bytes fetched / checkpoint size, 4 processes at once",
            m.extra["four_process_bytes_fetched"] / size, 1.02)  # type: ignore[operator]
        wall = m.extra["four_process_wall_s"]
        lines.append(f"\n4 processes loading at once through one cold mount: {wall:.2f} s wall.")
    return "\n".join(lines)


def chart(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.system for r in results]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.27
    for k, phase in enumerate(("cold", "warm", "hot")):
        vals = [r.median(phase) or 0 for r in results]
        bars = ax.bar([i + (k - 1) * width for i in range(len(names))], vals, width, label=phase)
        ax.bar_label(bars, labels=[f"{v:.1f}" if v else "" for v in vals], fontsize=7)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("seconds to load every tensor (median)")
    ax.set_title("Loading a checkpoint from S3 (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="local,s5cmd,rclone,s3fs,modelfs", help="comma-separated subset")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root (FUSE mounts and dropping the page cache)")
    only = set(args.only.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="modelfs-bench-", dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        src = work / "src"
        print(f"generating a {args.size_gib} GiB 4-shard checkpoint", flush=True)
        tensors = make_demo_checkpoint(src, total_bytes=int(args.size_gib * 2**30))
        import torch
        import xxhash

        hashes = work / "hashes.json"
        hashes.write_text(json.dumps({k: xxhash.xxh3_64_hexdigest(v.contiguous().view(torch.uint8).numpy().tobytes())
                                      for k, v in tensors.items()}))
        del tensors
        server = SeaweedServer(work / "weed").start()
        try:
            server.create_bucket(BUCKET)
            server.upload_dir(src, BUCKET, PREFIX)
            b = Bench(work, server, src, hashes, args.reps)
            results: list[Result] = []
            if "local" in only:
                results.append(b.local())
            if "s5cmd" in only:
                results.append(b.s5cmd())
            if "rclone" in only:
                results.append(b.fuse_system("rclone mount", b.rclone))
            if "s3fs" in only:
                results.append(b.fuse_system("s3fs", b.s3fs))
            if "modelfs" in only:
                results.append(b.modelfs_system())
        finally:
            server.stop()
    table = report(results, b.size, args.reps)
    facts = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
             "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
             "checkpoint_bytes": b.size, "reps": args.reps, "versions": versions()}
    (args.out / "results.json").write_text(json.dumps(
        {"machine": facts, "results": [r.__dict__ for r in results]}, indent=2, default=str))
    (args.out / "results.md").write_text(table + "\n")
    chart(results, args.out / "results.png")
    print(table)


if __name__ == "__main__":
    main()
