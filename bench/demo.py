"""`make demo`: a local S3 server, a generated checkpoint, mounted by modelfs and loaded cold, warm and hot,
beside the same load from local disk (page cache dropped, then hot) on the same machine in the same run.

Prints load times, `modelfs stats`, and what the ratio to local disk means; leaves nothing mounted or running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import _root  # noqa: F401  (the repository root on sys.path: tests.support)
import torch

from tests.support.checkpoints import load_all_safetensors, make_demo_checkpoint
from tests.support.seaweed import SeaweedServer

BUCKET = "demo-models"
PREFIX = "llama-demo/"


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def modelfs(*args: str, env: dict[str, str]) -> str:
    r = subprocess.run([sys.executable, "-m", "modelfs", *args], capture_output=True, text=True,
                       env={**os.environ, **env})
    if r.returncode != 0:
        sys.exit(f"demo: modelfs {args[0]} failed: {r.stderr.strip()}")
    return r.stdout


@contextlib.contextmanager
def mounted(source: str, mnt: Path, cache: Path, env: dict[str, str]) -> Iterator[None]:
    print(f"$ modelfs mount {source} {mnt} --cache-dir {cache}")
    print("  " + modelfs("mount", source, str(mnt), "--cache-dir", str(cache), env=env).strip())
    try:
        yield
    finally:
        modelfs("umount", str(mnt), env=env)


def timed_load(path: Path, reference: dict[str, torch.Tensor]) -> float:
    t0 = time.perf_counter()
    tensors = load_all_safetensors(path)
    elapsed = time.perf_counter() - t0
    assert tensors.keys() == reference.keys(), "tensor names differ"
    bad = [k for k, t in reference.items() if not torch.equal(tensors[k], t)]
    assert not bad, f"tensors differ: {bad[:3]}"
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=1024, help="checkpoint size (4 safetensors shards)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelfs-demo-") as tmp:
        work = Path(tmp)
        print(f"== generating a {args.size_mib} MiB, 4-shard safetensors checkpoint (mixed dtypes)")
        reference = make_demo_checkpoint(work / "src", total_bytes=args.size_mib << 20)
        size = sum(p.stat().st_size for p in (work / "src").iterdir())
        print("== starting SeaweedFS (S3) on loopback")
        server = SeaweedServer(work / "weed").start()
        try:
            server.create_bucket(BUCKET)
            server.upload_dir(work / "src", BUCKET, PREFIX)
            print(f"   uploaded {size / 2**20:.0f} MiB to s3://{BUCKET}/{PREFIX} at {server.endpoint_url}")
            env = server.env()
            source, mnt, cache = f"s3://{BUCKET}/{PREFIX}", work / "mnt", work / "cache"
            mnt.mkdir()
            rows: list[tuple[str, float, dict[str, int]]] = []

            def stats() -> dict[str, int]:
                return json.loads(modelfs("stats", "--json", str(mnt), env=env))

            with mounted(source, mnt, cache, env):
                dropped = drop_page_cache()
                rows.append(("cold (empty cache, from S3)", timed_load(mnt, reference), stats()))
                # Prefetch ends; every file is then whole in its cache file, which is what the kernel serves
                # from the next open on (FUSE passthrough): the cache holds each byte once.
                until = time.monotonic() + 300
                while time.monotonic() < until and (stats()["prefetch_queue"] or stats()["fetches_in_flight"]):
                    time.sleep(0.5)
                st = stats()
                print(f"   cache: {st['files_complete']} of {st['files_in_cache']} files complete, "
                      f"{st['bytes_in_cache'] / 2**20:.0f} MiB in all, {dir_mib(cache):.0f} MiB on disk (du)")
            with mounted(source, mnt, cache, env):  # a new daemon: counters start at zero
                drop_page_cache()
                rows.append(("warm (cache on disk, page cache dropped)", timed_load(mnt, reference), stats()))
                before = rows[-1][2]
                t, after = timed_load(mnt, reference), stats()
                rows.append(("hot (page cache)", t, {k: after[k] - before[k] for k in after}))
                print("$ modelfs stats " + str(mnt))
                print("  " + modelfs("stats", str(mnt), env=env).strip().replace("\n", "\n  "))
        finally:
            server.stop()
        drop_page_cache()
        local_cold = timed_load(work / "src", reference)
        local_hot = timed_load(work / "src", reference)
        print(f"\n== load_file + copy of every tensor, {size / 2**20:.0f} MiB, all tensors torch.equal to the source"
              + ("" if dropped else " (page cache NOT dropped: needs root)"))
        print(f"{'load':42} {'seconds':>8} {'GB/s':>6} {'GETs':>6} {'fetched MiB':>12} {'passthrough':>11} "
              f"{'x local':>8}")
        local = {"cold": local_cold, "warm": local_cold, "hot": local_hot}
        for name, t, st in rows:
            ratio = t / local[name.split()[0]]
            print(f"{name:42} {t:8.2f} {size / t / 1e9:6.2f} {st['gets']:6d} {st['bytes_fetched'] / 2**20:12.1f} "
                  f"{st['passthrough_opens']:11d} {ratio:7.2f}x")
        for name, t in (("local disk, page cache dropped", local_cold), ("local disk, hot (page cache)", local_hot)):
            print(f"{name:42} {t:8.2f} {size / t / 1e9:6.2f} {'—':>6} {'—':>12} {'—':>11} {'1.00x':>8}")
        print("\nx local: the modelfs load's time over the same load from this machine's disk (cold and warm beside\n"
              "local disk with its page cache dropped, hot beside local disk hot). Cold also downloads every byte\n"
              "from S3; warm and hot near 1.0x mean the mount costs little over a local copy once the bytes are here.\n"
              "passthrough: opens the kernel served from the file's cache file (FUSE passthrough), with no READ\n"
              "reaching the daemon.")

def dir_mib(path: Path) -> float:
    """MiB allocated on disk under `path` (what `du` says)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file()) / 2**20


if __name__ == "__main__":
    main()
