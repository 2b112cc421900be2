"""`make bench-integrity`: what the cache's storage costs a warm load, and what the scrub costs.

For each cache filesystem (btrfs with data checksums, ext4; each a fresh loop device of its own, as a cache
disk would be): a cold load fills the cache (the daemon's own load, then it is stopped); then, REPS times, a
new daemon with the page cache dropped serves a warm load. Reported: the load time beside a load of the same
files from the same filesystem (the local disk the cache is on), the daemon's CPU per MiB (on btrfs a sealed
file is trusted without a read-back; on ext4 every extent is read back and hashed before passthrough), and
one scrub pass (`cache.scrub_rate` lifted so that it runs at disk speed): its CPU per GiB, and what a full
pass takes per TiB at the default pace. The checkpoint is served from a local directory (the store is not
what is measured). Root, loop devices and mkfs.btrfs needed. Writes bench/results/integrity.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _root  # noqa: F401  (the repository root on sys.path: tests.support)

from bench import BYPASS
from modelfs.config import load_config
from tests.support.checkpoints import make_demo_checkpoint
from tests.support.diskfault import loop_btrfs, loop_ext4

HERE = Path(__file__).resolve().parent
MiB, GiB = 1 << 20, 1 << 30


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def modelfs(*args: str) -> None:
    r = subprocess.run([sys.executable, "-P", "-m", "modelfs", *args], capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise RuntimeError(f"modelfs {args[0]}: {(r.stderr or r.stdout).strip()[-800:]}")


#: The loaders timed: safetensors' load_file (page cache, mmap), and two that read with O_DIRECT (the page
#: cache cannot help them: a warm load is the disk's speed, and whatever the daemon reads first comes on top).
LOADERS = {"load_file": ((), {}), **{b.name: ((b.flag,), b.env) for b in BYPASS.values()}}


def load(path: Path, loader: str = "load_file") -> float:
    """One timed load of every shard, in a fresh interpreter (bench/loader.py), page cache dropped first."""
    flags, env = LOADERS[loader]
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")
    r = subprocess.run([sys.executable, str(HERE / "loader.py"), str(path), *flags], input="go\n",
                       capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    if r.returncode:
        raise RuntimeError(f"loader: {r.stderr.strip()[-800:]}")
    return float(json.loads(r.stdout.strip().splitlines()[-1])["elapsed"])


def stats(mnt: Path) -> dict[str, int]:
    return json.loads(os.getxattr(mnt, "user.modelfs.stats"))


def measure(kind: str, disk: Path, src: Path, mnt: Path, reps: int) -> dict[str, float]:
    size = sum(p.stat().st_size for p in src.iterdir())
    local = disk / "local"
    shutil.copytree(src, local)
    cache = disk / "cache"
    base = ["--cache-dir", str(cache), "-o", "cache.min_free=0"]
    modelfs("mount", str(src), str(mnt), *base, "-o", "cache.scrub_rate=0")
    load(mnt)
    modelfs("umount", str(mnt))
    warm: dict[str, list[float]] = {name: [] for name in LOADERS}
    local_s: dict[str, list[float]] = {name: [] for name in LOADERS}
    cpu, verified, sealed = [], [], []
    for _ in range(reps):
        for loader in LOADERS:  # each warm load by a new daemon, beside the same loader on the local files
            local_s[loader].append(load(local, loader))
            modelfs("mount", str(src), str(mnt), *base, "-o", "cache.scrub_rate=0")
            pid = int(os.getxattr(mnt, "user.modelfs.pid"))
            before = cpu_seconds(pid)
            warm[loader].append(load(mnt, loader))
            if loader == "load_file":
                cpu.append((cpu_seconds(pid) - before) * 1000 / (size / MiB))
            st = stats(mnt)
            verified.append(st["extents_verified"])
            sealed.append(st["files_trusted_sealed"])
            modelfs("umount", str(mnt))
    modelfs("mount", str(src), str(mnt), *base, "-o", "cache.scrub_after=0", "-o", "cache.scrub_rate=64GiB")
    pid = int(os.getxattr(mnt, "user.modelfs.pid"))
    before, began = cpu_seconds(pid), time.monotonic()
    while stats(mnt)["scrub_bytes"] < size:
        time.sleep(0.05)
    scrubbed = stats(mnt)["scrub_bytes"]
    scrub_cpu = (cpu_seconds(pid) - before) / (scrubbed / GiB)
    scrub_rate = scrubbed / (time.monotonic() - began)
    modelfs("umount", str(mnt))
    return {**{f"warm {n}": statistics.median(v) for n, v in warm.items()},
            **{f"local {n}": statistics.median(v) for n, v in local_s.items()}, "cpu": statistics.median(cpu),
            "verified": max(verified), "sealed": min(sealed), "scrub_cpu": scrub_cpu, "scrub_rate": scrub_rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench-integrity: needs root (loop devices, FUSE mounts, dropping the page cache)")
    default_rate = int(load_config(None, {}).cache.scrub_rate)
    rows = []
    with tempfile.TemporaryDirectory(prefix="modelfs-integrity-") as tmp:
        work = Path(tmp)
        src, mnt = work / "src", work / "mnt"
        make_demo_checkpoint(src, total_bytes=int(args.size_gib * GiB))
        mnt.mkdir()
        size_img = int(args.size_gib * GiB * 3) + GiB  # the local copy, the cache, and room
        for kind, make in (("btrfs (data checksums)", loop_btrfs), ("ext4", loop_ext4)):
            with make(work, size_img) as fs:
                r = measure(kind, fs.mountpoint, src, mnt, args.reps)
            print(kind, json.dumps(r), flush=True)
            rows.append((kind, r))
    lines = [f"{args.size_gib:g} GiB checkpoint, medians of {args.reps}; warm: a new daemon, page cache dropped; "
             f"local: the same files on the same filesystem. Scrub: one pass at disk speed; a pass at the default "
             f"cache.scrub_rate ({default_rate / MiB:.0f} MiB/s) takes {2**40 / default_rate / 3600:.1f} h per TiB.",
             "", "| cache filesystem | " + " | ".join(f"warm {n} vs local" for n in LOADERS)
             + " | daemon CPU per MiB (warm load_file) | extents read back | files trusted by seal "
             "| scrub CPU per GiB | scrub at disk speed |",
             "| --- | " + " | ".join("---:" for _ in LOADERS) + " | ---: | ---: | ---: | ---: | ---: |"]
    for kind, r in rows:
        ratios = " | ".join(f"{r[f'warm {n}']:.2f} s vs {r[f'local {n}']:.2f} s = "
                            f"{r[f'warm {n}'] / r[f'local {n}']:.2f}x" for n in LOADERS)
        lines.append(f"| {kind} | {ratios} | {r['cpu']:.3f} ms | {r['verified']:.0f} | {r['sealed']:.0f} "
                     f"| {r['scrub_cpu']:.3f} s | {r['scrub_rate'] / MiB:.0f} MiB/s |")
    out = "\n".join(lines) + "\n"
    (HERE / "results" / "integrity.md").write_text(out)
    print(out)


if __name__ == "__main__":
    main()
