"""`make bench-dedup`: how much of a set of checkpoint versions must be fetched and stored.

The variant set of the dedup tests (`tests.support.checkpoints.make_variant_set`: base, a fine-tune
changing 25 % of tensors, the base with a longer header, the base again) is chunked three ways, and
the unique bytes of each are compared with the logical bytes:
- fixed 8 MiB extents (what a mount without manifests stores),
- the extents `modelfs publish` writes into manifests (tensor boundaries; FastCDC for other files),
- the ideal: each distinct tensor (and header, and other file) once.
Writes bench/results/dedup.md.
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
from pathlib import Path

import _root  # noqa: F401  (the repository root on sys.path: tests.support)
import xxhash

from modelfs.catalog.manifest import file_extents, iter_files
from tests.support.checkpoints import make_variant_set

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
SET = ("base", "ft", "meta", "copy")


def fixed_chunks(path: Path, size: int) -> list[tuple[bytes, int]]:
    data = path.read_bytes()
    return [(xxhash.xxh3_128_digest(data[o:o + size]), len(data[o:o + size])) for o in range(0, len(data), size)]


def ideal_chunks(path: Path) -> list[tuple[bytes, int]]:
    """Each tensor as one unit, plus the header; other files whole."""
    data = path.read_bytes()
    if not path.name.endswith(".safetensors"):
        return [(xxhash.xxh3_128_digest(data), len(data))]
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n])
    out = [(xxhash.xxh3_128_digest(data[:8 + n]), 8 + n)]
    for k, v in meta.items():
        if k != "__metadata__":
            b, e = (8 + n + x for x in v["data_offsets"])
            out.append((xxhash.xxh3_128_digest(data[b:e]), e - b))
    return out


def unique(chunks: list[tuple[bytes, int]]) -> int:
    return sum(dict(chunks).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tensors", type=int, default=24)
    ap.add_argument("--scale-mib", type=int, default=4, help="tensor sizes are 0.5, 1, 3 or 9 x this")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelfs-dedup-") as tmp:
        root = Path(tmp)
        make_variant_set(root, tensors=args.tensors, scale=args.scale_mib * MiB)
        files = [root / d / f for d in SET for f in iter_files(str(root / d))]
        logical = sum(p.stat().st_size for p in files)
        ways = {
            "fixed 8 MiB extents": [c for p in files for c in fixed_chunks(p, 8 * MiB)],
            "modelfs manifest extents": [(d, n) for p in files for _, n, d in file_extents(str(p), 8 * MiB)],
            "ideal (each distinct tensor once)": [c for p in files for c in ideal_chunks(p)],
        }
        sizes = {name: unique(chunks) for name, chunks in ways.items()}
    lines = [f"Variant set {', '.join(SET)} ({args.tensors} tensors of 0.5-9 x {args.scale_mib} MiB each; ft changes "
             f"25 % of tensors, meta lengthens the header, copy is the base again): {logical / MiB:.0f} MiB logical.",
             "", "| chunking | unique MiB | dedup ratio (logical / unique) | vs ideal |",
             "| --- | ---: | ---: | ---: |"]
    ideal = sizes["ideal (each distinct tensor once)"]
    for name, u in sizes.items():
        lines.append(f"| {name} | {u / MiB:.1f} | {logical / u:.2f} | {u / ideal:.3f} |")
    out = "\n".join(lines) + "\n"
    (HERE / "results" / "dedup.md").write_text(out)
    print(out)


if __name__ == "__main__":
    main()
