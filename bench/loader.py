"""One timed checkpoint load in a fresh interpreter, driven by bench.py over stdin/stdout.

A fresh process per load keeps Python-side state (allocator, mmaps, imported modules) out of the
comparison, so "hot" measures the kernel page cache and nothing else. Protocol: the child imports
torch and safetensors first and prints ``ready``; the parent drops the page cache (or starts a
download) and writes one line to stdin; only then does the timed load start, so interpreter start-up
is never part of a timing. The child prints one JSON line with wall-clock start/end (comparable
across processes, for the 4-process phase) and, if asked, verifies against the source afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import safetensors.torch  # noqa: F401 - imported before "ready" so the import is not timed
import torch

from modelfs.testing.checkpoints import load_all_safetensors


def verify(got: dict[str, torch.Tensor], source: Path) -> int:
    """Names and every tensor torch.equal to the local source, so a broken peer cannot look fast."""
    want = load_all_safetensors(source)
    if got.keys() != want.keys():
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        raise SystemExit(f"loader: tensor names differ (missing {missing[:3]}, unexpected {extra[:3]})")
    bad = [k for k, t in want.items() if t.dtype != got[k].dtype or not torch.equal(t, got[k])]
    if bad:
        raise SystemExit(f"loader: {len(bad)} tensors differ from the source, e.g. {bad[:3]}")
    return len(want)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("path", type=Path, help="checkpoint directory (with model.safetensors.index.json)")
    ap.add_argument("--verify", type=Path, help="local source checkpoint to compare every tensor with")
    args = ap.parse_args()
    print("ready", flush=True)
    if not sys.stdin.readline():
        raise SystemExit("loader: parent went away before go")
    start, t0 = time.time(), time.perf_counter()
    state = load_all_safetensors(args.path)
    elapsed, end = time.perf_counter() - t0, time.time()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(json.dumps({"start": start, "end": end, "elapsed": elapsed, "tensors": len(state), "bytes": nbytes}),
          flush=True)
    if args.verify is not None:
        print(json.dumps({"verified": verify(state, args.verify)}), flush=True)


if __name__ == "__main__":
    main()
