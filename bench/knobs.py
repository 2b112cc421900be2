"""`make bench-knobs`: measure the kernel and daemon knobs one at a time, keep what helps.

Each setting is one `bench/bench.py --only modelfs` run (cold, warm, hot medians) with a single
`-o` override against the defaults: the mount's bdi `read_ahead_kb`, FUSE `max_background`, the pyfuse3
task count, and the local I/O threads. Writes bench/results/knobs.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS: list[tuple[str, str | None]] = [
    ("defaults (read_ahead_kb=4096, max_background=kernel 12, fuse_tasks=64, io_threads=8)", None),
    ("read_ahead_kb=128 (kernel default)", "mount.read_ahead_kb=128"),
    ("read_ahead_kb=1024", "mount.read_ahead_kb=1024"),
    ("read_ahead_kb=16384", "mount.read_ahead_kb=16384"),
    ("max_background=64", "mount.max_background=64"),
    ("fuse_tasks=16", "mount.fuse_tasks=16"),
    ("io_threads=3", "fetch.io_threads=3"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for label, option in SETTINGS:
        with tempfile.TemporaryDirectory(prefix="modelfs-knobs-") as out:
            cmd = [sys.executable, str(HERE / "bench.py"), "--only", "modelfs", "--no-four", "--no-ceiling",
                   "--size-gib", str(args.size_gib), "--reps", str(args.reps), "--out", out]
            if option:
                cmd += ["--modelfs-option", option]
            print(f"== {label}", flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            phases = json.loads((Path(out) / "results.json").read_text())["systems"]["modelfs"]["phases"]
            rows.append({"setting": label, "option": option,
                         **{p: phases[p]["median"] for p in ("cold", "warm", "hot") if p in phases}})
            print("   " + ", ".join(f"{p} {rows[-1][p]:.2f}s" for p in ("cold", "warm", "hot") if p in rows[-1]),
                  flush=True)
    base = rows[0]
    lines = [f"modelfs load of a {args.size_gib:g} GiB 4-shard checkpoint, medians of {args.reps}, seconds "
             "(ratio to defaults); one setting changed at a time.", "",
             "| setting | cold | warm | hot |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        cells = [f"{r[p]:.2f} ({r[p] / base[p]:.2f})" if p in r and p in base else "—" for p in ("cold", "warm", "hot")]
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    (HERE / "results" / "knobs.json").write_text(json.dumps(rows, indent=2))
    (HERE / "results" / "knobs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
