"""Manifests without a mount: tensor-boundary extents, content-defined chunking, format round trip,
and content-following layouts in FileVersion."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import xxhash

from modelfs.catalog.manifest import FileEntry, Manifest, ManifestError, file_extents, iter_files
from modelfs.fetch.fetcher import FileVersion
from modelfs.remote import ObjectInfo
from tests.test_prefetch import write_safetensors

KiB = 1024


def test_tensor_extents_survive_a_longer_header(tmp_path: Path) -> None:
    tensors = {"a": 100_000, "b": 300_000, "c": 5_000}
    base = write_safetensors(tmp_path / "base.safetensors", tensors)
    longer = tmp_path / "longer.safetensors"
    raw = bytearray(base)
    # Same tensor bytes, header padded: every data offset moves.
    n = int.from_bytes(base[:8], "little")
    import json

    header = json.loads(base[8:8 + n])
    header["__metadata__"]["pad"] = "y" * 999
    h = json.dumps(header).encode()
    raw = bytearray(len(h).to_bytes(8, "little") + h + base[8 + n:])
    longer.write_bytes(bytes(raw))
    a = file_extents(str(tmp_path / "base.safetensors"), max_extent=128 * KiB)
    b = file_extents(str(longer), max_extent=128 * KiB)
    assert a[0][0] == 0 and a[0][1] == 8 + n  # the header is its own extent
    assert [e[2] for e in a[1:]] == [e[2] for e in b[1:]]  # every tensor extent is shared
    assert a[0][2] != b[0][2]
    # "b" (300000 bytes) is split from its own start into 128 KiB pieces.
    assert [e[1] for e in a[1:]] == [100_000, 131072, 131072, 37856, 5_000]
    for off, length, digest in a:
        assert xxhash.xxh3_128_digest(base[off:off + length]) == digest


def test_other_files_use_content_defined_chunks_that_resync_after_an_insert(tmp_path: Path) -> None:
    data = os.urandom(6 << 20)
    (tmp_path / "a.bin").write_bytes(data)
    (tmp_path / "b.bin").write_bytes(data[:1000] + b"inserted" + data[1000:])
    a = file_extents(str(tmp_path / "a.bin"), max_extent=2 << 20)
    b = file_extents(str(tmp_path / "b.bin"), max_extent=2 << 20)
    assert sum(e[1] for e in a) == len(data) and all(e[1] <= 2 << 20 for e in a)
    shared = {e[2] for e in a} & {e[2] for e in b}
    assert len(shared) >= len(a) - 2  # only the chunk(s) around the insertion differ


def test_manifest_round_trip_and_validation(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "m.safetensors", {"x": 70_000})
    (tmp_path / ".modelfs").mkdir()
    (tmp_path / ".modelfs" / "manifest.json").write_text("{}")
    files = list(iter_files(str(tmp_path)))
    assert files == ["m.safetensors"]
    ext = file_extents(str(tmp_path / files[0]), 64 * KiB)
    man = Manifest({"m.safetensors": FileEntry(sum(e[1] for e in ext), '"etag"', ext)})
    assert Manifest.loads(man.dumps()) == man
    for bad in (b"not json", b'{"format": "other", "version": 1}',
                man.dumps().replace(b'"size":', b'"size":1', 1)):
        with pytest.raises(ManifestError):
            Manifest.loads(bad)


def test_file_version_with_a_layout_finds_extents_by_bisection() -> None:
    extents = [(0, 10, b"a" * 16), (10, 5, b"b" * 16), (15, 85, b"c" * 16)]
    ver = FileVersion.of("src", ObjectInfo("k", 100, '"e"', 0.0), 8, extents)
    assert ver.extent_at(0) == (0, 10) and ver.extent_at(14) == (10, 5) and ver.extent_at(99) == (15, 85)
    assert ver.extents() == [(0, 10), (10, 5), (15, 85)]
    assert ver.starts_in(12, 16) == [(10, 5), (15, 85)]
    assert ver.known[10] == (b"b" * 16, 5)
    fixed = FileVersion.of("src", ObjectInfo("k", 20, '"e"', 0.0), 8)
    assert fixed.extents() == [(0, 8), (8, 8), (16, 4)] and fixed.starts_in(9, 17) == [(8, 8), (16, 4)]
