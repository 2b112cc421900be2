"""`make bench-fleet`: a fleet rolling one new checkpoint onto several nodes, with and without a shared tier.

Three modelfs daemons on this machine (separate cache dirs and mountpoints: three nodes), one SeaweedFS
holding the origin bucket and the shared-tier bucket, the origin behind the fault proxy so the bytes it
serves are counted from its request log. Each scenario starts from empty node caches and an empty shared
tier, drops the page cache, and releases one loader per node (`load_file` + copy of every tensor, in a
fresh process): all at once, or staggered (node k released k x --stagger seconds after the first).
Reported: the wall time of the slowest load (from the first release to the last tensor) and the origin
bytes over the checkpoint size. Writes bench/results/fleet.{md,json}.

    python bench/fleet.py [--size-gib 1] [--nodes 3] [--stagger 3] [--reps 1]     (root)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from peers import Modelfs, Store

from bench import BUCKET, PREFIX, RESULTS, drop_caches, loaders, say
from modelfs.testing.checkpoints import make_demo_checkpoint
from modelfs.testing.faultproxy import FaultProxy
from modelfs.testing.seaweed import SeaweedServer

SHARED_BUCKET = "fleet-cache"


def scenario(work: Path, store: Store, src: Path, size: int, nodes: int, shared: bool, stagger: float,
             proxy: FaultProxy, tag: str, timeout: float, extra: list[str]) -> dict[str, float]:
    """One rollout: `nodes` fresh daemons, one loader each; returns wall time and origin bytes / checkpoint."""
    opts = [f"shared.url=s3://{SHARED_BUCKET}/{tag}", f"shared.endpoint_url={store.endpoint_url}"] if shared else []
    opts += extra
    origin = Store(proxy.endpoint_url, store.bucket, store.prefix,
                   {**store.env, "AWS_ENDPOINT_URL": proxy.endpoint_url})
    with contextlib.ExitStack() as stack:
        mnts = []
        for k in range(nodes):
            mnt, cache = work / f"mnt{k}", work / f"cache{k}"
            shutil.rmtree(cache, ignore_errors=True)
            mnt.mkdir(exist_ok=True)
            stack.enter_context(Modelfs(origin, work, opts).mounted(mnt, cache))
            mnts.append(mnt)
        proxy.clear_log()
        with loaders(list(mnts), [src] + [None] * (nodes - 1), timeout) as procs:
            drop_caches()
            t0 = time.time()
            for k, lp in enumerate(procs):
                while time.time() < t0 + k * stagger:
                    time.sleep(0.01)
                lp.go()
            outs = [lp.result() for lp in procs]
            stats = [Modelfs(origin, work, opts).settled_stats(m) for m in mnts]
        if outs[0].verified is None:
            raise RuntimeError("the first node's load was not verified")
        wall = max(o.end for o in outs) - t0
    keys = ("bytes_fetched", "shared_hits", "shared_misses", "shared_waits", "shared_errors", "shared_corrupt",
            "shared_bytes_written", "shared_writeback_dropped")
    say("  per node: " + "; ".join(" ".join(f"{k.removeprefix('shared_')}={st.get(k, 0)}" for k in keys)
                                   for st in stats))
    return {"wall_s": wall, "origin_x": proxy.ranged_bytes() / size, "each_s": [o.elapsed for o in outs],  # type: ignore[dict-item]
            "nodes": [{k: st.get(k, 0) for k in keys} for st in stats]}  # type: ignore[dict-item]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--stagger", type=float, default=3.0, help="seconds between nodes in the staggered rollout")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--modelfs-option", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a setting for every node (e.g. shared.deadline=10)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modelfs-fleet-"))
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        src = work / "src"
        say(f"generating a {args.size_gib:g} GiB 4-shard safetensors checkpoint")
        make_demo_checkpoint(src, total_bytes=int(args.size_gib * 2**30 * 129 / 128))
        size = sum(p.stat().st_size for p in src.iterdir())
        server = SeaweedServer(work / "weed").start()
        try:
            server.create_bucket(BUCKET)
            server.create_bucket(SHARED_BUCKET)
            server.upload_dir(src, BUCKET, PREFIX)
            store = Store(server.endpoint_url, BUCKET, PREFIX, server.env())
            with FaultProxy(server.endpoint_url) as proxy:
                for rep in range(args.reps):
                    for shared in (False, True):
                        for stagger in (0.0, args.stagger):
                            name = f"{'shared tier' if shared else 'origin only'}, " \
                                   f"{'at once' if not stagger else f'staggered {stagger:g} s'}"
                            r = scenario(work, store, src, size, args.nodes, shared, stagger, proxy,
                                         f"r{rep}-{int(shared)}-{int(stagger * 10)}-{time.time_ns()}", args.timeout,
                                         args.modelfs_option)
                            results.setdefault(name, []).append(r)
                            say(f"{name} {rep + 1}/{args.reps}: slowest load done {r['wall_s']:.2f} s after the first "
                                f"release, origin {r['origin_x']:.2f}x the checkpoint")
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"{args.nodes} nodes (daemons with their own caches) on one {time.strftime('%Y-%m-%d')} 2-core machine, "
             f"{size / 2**30:.2f} GiB 4-shard checkpoint, medians of {args.reps}; origin bytes counted at the origin.",
             "", "| rollout | slowest load done (s) | origin bytes / checkpoint |", "| --- | ---: | ---: |"]
    for name, rs in results.items():
        lines.append(f"| {name} | {statistics.median(r['wall_s'] for r in rs):.2f} | "
                     f"{statistics.median(r['origin_x'] for r in rs):.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.md").write_text("\n".join(lines) + "\n")
    (args.out / "fleet.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                     "results": results}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
