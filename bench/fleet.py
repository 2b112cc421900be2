"""`make bench-fleet`: a fleet rolling one new checkpoint onto N nodes, with and without a shared tier.

N modelfs daemons on this machine (separate cache dirs and mountpoints: N nodes), one SeaweedFS holding the
origin bucket and the shared-tier bucket. The origin sits behind the fault proxy, which behaves like a
bucket far away: its response bodies share one link capped at --bandwidth-mbs (default 200 MB/s, all nodes
together) and every request waits --rtt-ms (default 20 ms) first; the bytes it serves are counted from its
request log. The tier is near: no cap, no delay; a bucket on the same SeaweedFS (--tier s3, the default),
or a directory all nodes share (--tier dir: what a fleet gets from a shared file system, here the local
disk, so tier writes cost little next to the origin's link). Each scenario starts from empty node caches and an empty
tier, drops the page cache, and releases one loader per node (`load_file` + copy of every tensor, in a
fresh process): all at once, or staggered (node k released k x --stagger seconds after the first).
Reported per scenario: origin bytes / checkpoint, the slowest and the median node's load, tier bytes read
and written, and the origin egress at --egress-usd-per-gb. Writes bench/results/<--name>.{md,json}.

    python bench/fleet.py [--size-gib 1] [--nodes 1,3,6] [--stagger 3] [--reps 1] [--tier s3|dir]   (root)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _root  # noqa: F401  (the repository root on sys.path: tests.support)
from peers import Modelfs, Store

from bench import BUCKET, PREFIX, RESULTS, drop_caches, loaders, say
from tests.support.checkpoints import make_demo_checkpoint
from tests.support.faultproxy import FaultProxy
from tests.support.seaweed import SeaweedServer

SHARED_BUCKET = "fleet-cache"


def cpu_times() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far, every core summed (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / hz, sum(fields) / hz


class CpuSampler:
    """The machine's CPU times every 50 ms, so the busy share can be read up to a moment known only later
    (the last load's end, before the first loader's verification and the loaders' exit)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), *cpu_times()))
            self._stop.wait(0.05)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, t0: float, t1: float) -> tuple[float, float]:
        """(busy share, busy CPU-seconds) from the last sample at or before t0 to the first at or after t1."""
        a = max((s for s in self.samples if s[0] <= t0), default=self.samples[0])
        b = min((s for s in self.samples if s[0] >= t1), default=self.samples[-1])
        return (b[1] - a[1]) / max(1e-9, b[2] - a[2]), b[1] - a[1]


def scenario(work: Path, store: Store, src: Path, size: int, nodes: int, shared: bool, stagger: float,
             proxy: FaultProxy, tag: str, timeout: float, extra: list[str], tier: str = "s3",
             logs: Path | None = None) -> dict[str, float]:
    """One rollout: `nodes` fresh daemons, one loader each; returns wall time and origin bytes / checkpoint."""
    opts: list[str] = []
    if shared and tier == "dir":
        (work / "tier" / tag).mkdir(parents=True)
        opts = [f"shared.url=file://{work / 'tier' / tag}"]
    elif shared:
        opts = [f"shared.url=s3://{SHARED_BUCKET}/{tag}", f"shared.endpoint_url={store.endpoint_url}"]
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
            sampler = stack.enter_context(CpuSampler())
            time.sleep(0.06)
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
        busy, busy_s = sampler.between(t0, t0 + wall)
    if logs is not None:  # each daemon's log, kept for reading after the run (the work dir goes)
        (logs / tag).mkdir(parents=True, exist_ok=True)
        for k in range(nodes):
            with contextlib.suppress(OSError):
                shutil.copy(work / f"cache{k}" / "modelfs.log", logs / tag / f"node{k}.log")
    keys = ("bytes_fetched", "shared_hits", "shared_misses", "shared_waits", "shared_errors", "shared_corrupt",
            "shared_bytes_read", "shared_bytes_written", "shared_writeback_dropped", "store_retries", "shared_polls",
            "hedged_gets", "read_timeouts", "store_errors", "shared_wait_expired")
    say("  per node: " + "; ".join(" ".join(f"{k.removeprefix('shared_')}={st.get(k, 0)}" for k in keys)
                                   for st in stats))
    return {"wall_s": wall, "origin_x": proxy.ranged_bytes() / size, "each_s": [o.elapsed for o in outs],  # type: ignore[dict-item]
            "origin_bytes": proxy.ranged_bytes(),
            # All the machine's CPU during the rollout (daemons, loaders, proxy, SeaweedFS): its busy share,
            # and the busy CPU-seconds over the cores, a floor for the rollout's wall time on this machine.
            "cpu_busy": busy, "cpu_floor_s": busy_s / (os.cpu_count() or 1),
            "tier_read": sum(st.get("shared_bytes_read", 0) for st in stats),
            "tier_written": sum(st.get("shared_bytes_written", 0) for st in stats),
            "nodes": [{k: st.get(k, 0) for k in keys} for st in stats]}  # type: ignore[dict-item]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--nodes", default="1,3,6", help="fleet sizes, comma-separated")
    ap.add_argument("--bandwidth-mbs", type=float, default=200.0, help="the origin's link, all nodes together")
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="the origin's round trip, added to every request")
    ap.add_argument("--egress-usd-per-gb", type=float, default=0.09,
                    help="origin egress price (AWS S3 data transfer out to the internet, first 10 TB/month)")
    ap.add_argument("--stagger", type=float, default=3.0, help="seconds between nodes in the staggered rollout")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="fleet", help="results file name, without .md / .json")
    ap.add_argument("--tier", choices=("s3", "dir"), default="s3",
                    help="the shared tier: a bucket on the same SeaweedFS, or a directory all nodes share")
    ap.add_argument("--modelfs-option", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a setting for every node (e.g. shared.deadline=10)")
    ap.add_argument("--only", default="", help="only the rollouts whose name contains this ('shared tier, at')")
    ap.add_argument("--logs", type=Path, help="keep each daemon's log under this directory")
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
                proxy.link(bandwidth=args.bandwidth_mbs * 1e6, rtt=args.rtt_ms / 1000)
                for rep in range(args.reps):
                    for nodes in (int(n) for n in args.nodes.split(",")):
                        for shared in (False, True):
                            for stagger in (0.0, args.stagger) if nodes > 1 else (0.0,):
                                name = f"{nodes} node{'s' if nodes > 1 else ''}, " \
                                       f"{'shared tier' if shared else 'origin only'}, " \
                                       f"{'at once' if not stagger else f'staggered {stagger:g} s'}"
                                if args.only not in name:
                                    continue
                                r = scenario(work, store, src, size, nodes, shared, stagger, proxy,
                                             f"r{rep}-{nodes}-{int(shared)}-{int(stagger * 10)}-{time.time_ns()}",
                                             args.timeout, args.modelfs_option, args.tier, args.logs)
                                results.setdefault(name, []).append(r)
                                say(f"{name} {rep + 1}/{args.reps}: slowest {r['wall_s']:.2f} s, loads "
                                    f"{', '.join(f'{t:.2f}' for t in r['each_s'])} s, origin {r['origin_x']:.2f}x, "
                                    f"CPU busy {r['cpu_busy']:.0%}, floor {r['cpu_floor_s']:.2f} s")
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"Nodes (daemons with their own caches) on one 2-core machine, {time.strftime('%Y-%m-%d')}, "
             f"{size / 2**30:.2f} GiB 4-shard checkpoint, medians of {args.reps}. Origin: {args.bandwidth_mbs:g} MB/s "
             f"shared by all nodes, {args.rtt_ms:g} ms round trip, bytes counted at the origin; tier: "
             f"{'same server' if args.tier == 's3' else 'a directory on the local disk'}, no cap. "
             f"Egress at ${args.egress_usd_per_gb:g}/GB. Slowest: from the first release to the last "
             "node's last tensor; median and first/later: each node's own load. CPU busy: the whole machine's "
             "(daemons, loaders, proxy, SeaweedFS) from the first release to the last load's end; CPU floor: "
             "those busy CPU-seconds over the cores, the least wall time this machine needs for that work.",
             "", "| rollout | slowest (s) | median node (s) | first / later nodes (s) | origin / ckpt | "
             "tier read / written (GiB) | origin egress ($) | CPU busy | CPU floor (s) |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, rs in results.items():
        each = [statistics.median(r["each_s"][k] for r in rs) for k in range(len(rs[0]["each_s"]))]
        lines.append(f"| {name} | {statistics.median(r['wall_s'] for r in rs):.2f} | {statistics.median(each):.2f} | "
                     f"{each[0]:.2f} / {f'{max(each[1:]):.2f}' if len(each) > 1 else '—'} | "
                     f"{statistics.median(r['origin_x'] for r in rs):.2f}x | "
                     f"{statistics.median(r['tier_read'] for r in rs) / 2**30:.2f} / "
                     f"{statistics.median(r['tier_written'] for r in rs) / 2**30:.2f} | "
                     f"{statistics.median(r['origin_bytes'] for r in rs) / 1e9 * args.egress_usd_per_gb:.3f} | "
                     f"{statistics.median(r['cpu_busy'] for r in rs):.0%} | "
                     f"{statistics.median(r['cpu_floor_s'] for r in rs):.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{args.name}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                     "results": results}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
