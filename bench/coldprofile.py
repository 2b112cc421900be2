"""Where the daemon's CPU goes in a cold fetch: a per-step profile of the cold path.

A generated checkpoint on a SeaweedFS on loopback, a fresh mount with an empty cache, the page cache dropped,
then `modelfs prefetch` of the checkpoint directory (every extent fetched, hashed and written into its cache
file, no loader in the way) under `perf record -g` of the daemon. Each sample goes to the step its call chain
belongs to (the first rule that matches, kernel and user frames alike), and the daemon's CPU (utime + stime
over the fetch) is split by those shares:

    python bench/coldprofile.py --size-gib 2          (root; needs perf)

Prints the table; nothing is written to bench/results.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _root  # noqa: F401  (the repository root on sys.path: tests.support)

from tests.support.checkpoints import make_demo_checkpoint
from tests.support.seaweed import SeaweedServer

BUCKET, PREFIX = "profile-models", "ckpt/"
#: (step, substrings of frame names): a sample belongs to the first step one of whose names is in its chain.
STEPS: list[tuple[str, tuple[str, ...]]] = [
    ("write into the cache file (pwrite: the copy into new page-cache pages)",
     ("sys_pwrite64", "ksys_pwrite64", "ext4_buffered_write_iter", "generic_perform_write", "vfs_write")),
    ("receive the GET body (socket to buffer, TCP)",
     ("tcp_recvmsg", "sock_recvmsg", "sys_recvfrom", "__sys_recvfrom", "sock_read_iter", "tcp_v4_rcv",
      "ip_rcv", "net_rx_action", "__napi_poll")),
    ("send (requests, ACKs)", ("tcp_sendmsg", "sys_sendto", "__sys_sendto", "tcp_write_xmit")),
    ("hash (xxh3-128)", ("XXH3", "XXH_INLINE", "xxh3", "XXH128")),
    ("threads waking and switching, futexes, page faults",
     ("futex", "schedule", "__schedule", "try_to_wake_up", "asm_exc_page_fault", "exc_page_fault",
      "handle_mm_fault")),
    ("Python: botocore, trio, modelfs (the interpreter)", ("_PyEval", "PyObject", "_Py", " Py")),
]
OTHER = "other (kernel and libraries)"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def buckets(perf_data: Path) -> collections.Counter[str]:
    """Samples per step, from `perf script` of the recording."""
    out = subprocess.run(["perf", "script", "-i", str(perf_data), "-F", "ip,sym"], capture_output=True,
                         text=True, check=True).stdout
    counts: collections.Counter[str] = collections.Counter()
    for sample in out.split("\n\n"):
        frames = sample.strip()
        if not frames:
            continue
        for step, names in STEPS:
            if any(n in frames for n in names):
                counts[step] += 1
                break
        else:
            counts[OTHER] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0)
    args = ap.parse_args()
    if shutil.which("perf") is None:
        sys.exit("coldprofile: needs perf (apt-get install linux-perf)")
    work = Path(tempfile.mkdtemp(prefix="modelfs-coldprofile-"))
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir()
    server = SeaweedServer(work / "weed").start()
    try:
        src = work / "src"
        make_demo_checkpoint(src, total_bytes=int(args.size_gib * 2**30))
        size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        server.create_bucket(BUCKET)
        server.upload_dir(src, BUCKET, PREFIX)
        env = {**os.environ, **server.env()}
        cli = [sys.executable, "-m", "modelfs"]
        subprocess.run([*cli, "mount", f"s3://{BUCKET}/{PREFIX}", str(mnt), "--cache-dir", str(cache)], env=env,
                       check=True)
        try:
            pid = int(os.getxattr(mnt, "user.modelfs.pid"))
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3")
            data = work / "perf.data"
            perf = subprocess.Popen(["perf", "record", "-g", "-q", "-o", str(data), "-p", str(pid)])
            time.sleep(1)  # perf attached
            before, began = cpu_seconds(pid), time.monotonic()
            subprocess.run([*cli, "prefetch", "-q", str(mnt)], env=env, check=True, stdout=subprocess.DEVNULL)
            cpu, wall = cpu_seconds(pid) - before, time.monotonic() - began
            perf.send_signal(2)
            perf.wait(timeout=120)
        finally:
            subprocess.run([*cli, "umount", str(mnt)], env=env, check=False)
        counts = buckets(data)
        total = sum(counts.values())
        mib = size / 2**20
        print(f"cold fetch of {mib:.0f} MiB by `modelfs prefetch`: {wall:.2f} s, daemon {cpu * 1000 / mib:.3f} "
              f"CPU-ms per MiB ({total} samples)\n")
        print("| step | share | CPU-ms per MiB |\n| --- | ---: | ---: |")
        for step, n in counts.most_common():
            print(f"| {step} | {100 * n / total:.0f} % | {cpu * 1000 / mib * n / total:.3f} |")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
