"""Interleaved A/B of modelfs settings: cold and warm loads of one checkpoint, configs taking turns.

Each round runs every config once, in turn (fresh cache for each config's cold load, then a remount for
its warm load), so a drift of the machine during the run hits every config alike. Prints each load with
the daemon's CPU per MiB and its counters, then medians. For deciding a default on measurement:

    python bench/ab.py --size-gib 1 --rounds 3 --config on: --config off:cache.preallocate=false   (root)

A config is NAME[@TREE]:SECTION.KEY=VALUE,... (nothing after the colon: the defaults). With @TREE the
daemon runs the `modelfs` package of that source tree (e.g. `git archive` of an older commit), so two
builds are compared in one interleaved run:

    python bench/ab.py --config old@/tmp/old-tree: --config new:   (root)

(The tree's package comes first on the daemon's sys.path: `python -P`, no working directory in front. A tree
whose `modelfs mount` starts its daemon without passing -P on runs the checkout's package in that daemon.)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import _root  # noqa: F401  (the repository root on sys.path: tests.support)
from peers import Modelfs, Store

from bench import BUCKET, PREFIX, Bench
from tests.support.checkpoints import make_demo_checkpoint
from tests.support.seaweed import SeaweedServer

COUNTERS = ("bytes_served", "pushed_bytes", "bytes_fetched", "extents_verified", "passthrough_opens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--config", action="append", required=True, metavar="NAME[@TREE]:OPTIONS")
    ap.add_argument("--phases", default="cold,warm", help="cold, warm or both (comma-separated)")
    ap.add_argument("--local", action="store_true",
                    help="each round also loads the source from local disk, page cache dropped (the warm floor)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modelfs-ab-"))
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        src = work / "src"
        make_demo_checkpoint(src, total_bytes=int(args.size_gib * 2**30 * 129 / 128))
        server = SeaweedServer(work / "weed").start()
        try:
            server.create_bucket(BUCKET)
            server.upload_dir(src, BUCKET, PREFIX)
            store = Store(server.endpoint_url, BUCKET, PREFIX, server.env())
            bench = Bench(work, store, src, argparse.Namespace(reps=1, timeout=600, modelfs_option=[]))
            mib = bench.size / 2**20
            mnt = work / "mnt"
            mnt.mkdir()
            for _ in range(args.rounds):
                if args.local:
                    out = bench.load(src, drop=True)
                    runs.setdefault(("local disk", "warm"), []).append((out.elapsed, 0.0))
                    print(f"{'local disk':12s} warm  {out.elapsed:6.2f} s", flush=True)
                for config in args.config:
                    name, _, opts = config.partition(":")
                    name, _, tree = name.partition("@")
                    runs_on = Store(store.endpoint_url, store.bucket, store.prefix,
                                    {**store.env, "PYTHONPATH": tree}) if tree else store
                    system = Modelfs(runs_on, work, [o for o in opts.split(",") if o])
                    cache = work / f"cache-{name}"
                    shutil.rmtree(cache, ignore_errors=True)
                    for phase in args.phases.split(","):
                        with system.mounted(mnt, cache) as pid:
                            out = bench.load(mnt, drop=True, daemon=pid)
                            st = system.settled_stats(mnt)
                        cpu = (out.daemon_cpu or 0.0) * 1000 / mib
                        runs.setdefault((name, phase), []).append((out.elapsed, cpu))
                        counters = " ".join(f"{k}={st.get(k, 0) / 2**20 if 'bytes' in k else st.get(k, 0):.0f}"
                                            for k in COUNTERS)
                        print(f"{name:12s} {phase:5s} {out.elapsed:6.2f} s  daemon {cpu:5.2f} ms/MiB  {counters}",
                              flush=True)
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("== medians (load seconds, daemon CPU ms per MiB)")
    for (name, phase), v in runs.items():
        print(f"{name:12s} {phase:5s} {statistics.median(x for x, _ in v):6.2f} s  "
              f"{statistics.median(y for _, y in v):5.2f} ms/MiB")


if __name__ == "__main__":
    main()
