"""One timed checkpoint load in a fresh interpreter, driven by bench.py over stdin/stdout.

A fresh process per load keeps Python-side state (allocator, mmaps, imported modules) out of the
comparison, so "hot" measures the kernel page cache and nothing else. Protocol: the child imports
torch and safetensors first and prints ``ready``; the parent drops the page cache (or starts a
download) and writes one line to stdin; only then does the timed load start, so interpreter start-up
is never part of a timing. The child prints one JSON line with wall-clock start/end (comparable
across processes, for the 4-process phase) and, if asked, verifies against the source afterwards.

Besides safetensors' own `load_file`, two loaders that bypass the page cache read the files directly:
Run:ai Model Streamer on file paths (its default reader, io_uring with O_DIRECT) and fastsafetensors
(nogds: O_DIRECT preads on a thread pool, into host memory). Both are left at their defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _root  # noqa: F401  (the repository root on sys.path: tests.support)
import safetensors.torch  # noqa: F401 - imported before "ready" so the import is not timed
import torch

from tests.support.checkpoints import load_all_safetensors


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


def shard_paths(ckpt_dir: Path) -> list[Path]:
    """The shards the index names, in order: what the file-path loaders are handed."""
    index = json.loads((ckpt_dir / "model.safetensors.index.json").read_text())
    return [ckpt_dir / s for s in sorted(set(index["weight_map"].values()))]


def stream_with_runai(paths: list[str]) -> dict[str, torch.Tensor]:
    """Run:ai Model Streamer's SafetensorsStreamer on S3 URLs (concurrent ranged GETs) or on file paths (its
    default file reader), each tensor cloned out of its reused buffer."""
    from runai_model_streamer import SafetensorsStreamer

    out: dict[str, torch.Tensor] = {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(paths)
        for name, tensor in streamer.get_tensors():
            out[name] = tensor.clone()
    return out


def load_with_fastsafetensors(paths: list[str]) -> dict[str, torch.Tensor]:
    """fastsafetensors on the CPU without GPUDirect (nogds): each shard read whole into one host buffer by
    parallel large preads (O_DIRECT where its filesystem policy allows), then each tensor cloned out."""
    from fastsafetensors import SafeTensorsFileLoader

    out: dict[str, torch.Tensor] = {}
    loader = SafeTensorsFileLoader(None, "cpu", nogds=True)
    try:
        loader.add_filenames({0: paths})
        buffers = loader.copy_files_to_device()
        try:
            for name in loader.get_keys():
                out[name] = buffers.get_tensor(name).clone()
        finally:
            buffers.close()
    finally:
        loader.close()
    return out


def fastsafetensors_reader(paths: list[str]) -> str:
    """How fastsafetensors opened these files, by the policy its nogds copier applies (after the timing; a
    refusal at read time shows as a warning on stderr, which bench.py looks for)."""
    from fastsafetensors.common import is_odirect_enabled

    modes = {"O_DIRECT" if is_odirect_enabled(p, buffered_ram_fs=True) else "buffered" for p in paths}
    return "nogds, " + "/".join(sorted(modes))


def load_in_key_order(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """As vLLM and SGLang load: `safe_open` each shard of the index and `get_tensor` in key-name order
    (layers.10 before layers.2), so the reads jump around the files; each tensor copied out."""
    from safetensors import safe_open

    index = json.loads((ckpt_dir / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    handles = {s: safe_open(str(ckpt_dir / s), framework="pt") for s in sorted(set(index["weight_map"].values()))}
    for key in sorted(index["weight_map"]):
        out[key] = handles[index["weight_map"][key]].get_tensor(key).clone()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("path", help="checkpoint directory (with model.safetensors.index.json), or with --runai an "
                                 "s3://BUCKET/PREFIX/ URL")
    ap.add_argument("--verify", type=Path, help="local source checkpoint to compare every tensor with")
    ap.add_argument("--runai", metavar="SHARDS", help="stream these comma-separated shards with Run:ai Model Streamer")
    ap.add_argument("--runai-files", action="store_true",
                    help="stream the directory's shards, as file paths, with Run:ai Model Streamer")
    ap.add_argument("--fastsafetensors", action="store_true", help="load the directory's shards with fastsafetensors")
    ap.add_argument("--key-order", action="store_true", help="safe_open + get_tensor in key-name order (vLLM-style)")
    args = ap.parse_args()
    if args.runai or args.runai_files:
        import runai_model_streamer  # noqa: F401 - imported before "ready" so the import is not timed
    if args.fastsafetensors:
        import fastsafetensors  # noqa: F401 - likewise
    print("ready", flush=True)
    if not sys.stdin.readline():
        raise SystemExit("loader: parent went away before go")
    start, t0 = time.time(), time.perf_counter()
    # The index is read inside the timing, as load_file's loop reads it.
    files = [str(p) for p in shard_paths(Path(args.path))] if args.runai_files or args.fastsafetensors else []
    if args.runai:
        state = stream_with_runai([args.path.rstrip("/") + "/" + s for s in args.runai.split(",")])
    elif args.runai_files:
        state = stream_with_runai(files)
    elif args.fastsafetensors:
        state = load_with_fastsafetensors(files)
    elif args.key_order:
        state = load_in_key_order(Path(args.path))
    else:
        state = load_all_safetensors(Path(args.path))
    elapsed, end = time.perf_counter() - t0, time.time()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    done: dict[str, object] = {"start": start, "end": end, "elapsed": elapsed, "tensors": len(state), "bytes": nbytes}
    if args.fastsafetensors:
        done["reader"] = fastsafetensors_reader(files)
    print(json.dumps(done), flush=True)
    if args.verify is not None:
        print(json.dumps({"verified": verify(state, args.verify)}), flush=True)


if __name__ == "__main__":
    main()
