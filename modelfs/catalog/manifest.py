"""Manifests: per-file extent maps written by `modelfs publish`, so identical tensors are fetched once.

A manifest lives beside the files it describes, at `<prefix>/.modelfs/manifest.json` (hidden from the
mount), and lists for every file under `<prefix>` its size, the ETag of the object it was computed for,
and its extents: `[offset, length, xxh3-128 hex]` covering the file exactly, in order.

Format (version 1):

    {"format": "modelfs-manifest", "version": 1, "hash": "xxh3-128",
     "files": {"<path relative to prefix>": {"size": N, "etag": "\\"...\\"",
                                              "extents": [[0, 1234, "<32 hex>"], ...]}}}

Extent boundaries follow the content, so that equal content gets equal extents in every version:
- safetensors: the header (8-byte length + JSON) is one extent; each tensor starts a new extent and one
  longer than `max_extent` is split from the tensor's start. A longer `__metadata__` shifts every offset
  but no tensor's extents, so a re-upload with a new header shares all tensor blocks.
- any other file: content-defined chunking (FastCDC, average max_extent / 4), so an insertion moves only
  nearby boundaries.

The mount trusts an entry only while the object's current ETag equals the entry's; otherwise that file
is read with fixed extents, as without a manifest. Hashes are xxh3-128: not collision-resistant, so
blocks are shared only within one trust domain (see SECURITY.md).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import xxhash

from modelfs.catalog.version import HashedExtent
from modelfs.errors import ModelfsError

FORMAT = "modelfs-manifest"
VERSION = 1
DIR = ".modelfs"
NAME = "manifest.json"
#: Where a prefix's manifest is, relative to the prefix.
KEY = f"{DIR}/{NAME}"



class ManifestError(ModelfsError):
    """A manifest that cannot be parsed or does not describe its files exactly."""


@dataclass
class FileEntry:
    size: int
    etag: str
    extents: list[HashedExtent]

    def check(self, path: str) -> None:
        pos = 0
        for off, length, digest in self.extents:
            if off != pos or length <= 0 or len(digest) != 16:
                raise ManifestError(f"manifest entry {path}: extents do not tile the file at offset {pos}")
            pos += length
        if pos != self.size:
            raise ManifestError(f"manifest entry {path}: extents cover {pos} of {self.size} bytes")


@dataclass
class Manifest:
    files: dict[str, FileEntry] = field(default_factory=dict)

    def dumps(self) -> bytes:
        doc = {"format": FORMAT, "version": VERSION, "hash": "xxh3-128",
               "files": {p: {"size": e.size, "etag": e.etag,
                             "extents": [[o, n, d.hex()] for o, n, d in e.extents]}
                         for p, e in sorted(self.files.items())}}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def loads(cls, raw: bytes) -> Manifest:
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT or doc.get("version") != VERSION:
                raise ManifestError(f"not a {FORMAT} version {VERSION}")
            files = {}
            for path, e in doc["files"].items():
                entry = FileEntry(int(e["size"]), str(e["etag"]),
                                  [(int(o), int(n), bytes.fromhex(d)) for o, n, d in e["extents"]])
                entry.check(path)
                files[path] = entry
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ManifestError(f"malformed manifest: {type(e).__name__}: {e}") from None
        return cls(files)


def _safetensors_bounds(f: BinaryIO, size: int, max_extent: int) -> list[tuple[int, int]] | None:
    """(offset, length) of header and tensor pieces, or None if `f` is not a safetensors file."""
    read = f.read
    head = read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    if n <= 0 or 8 + n > size or n > 100 << 20:
        return None
    try:
        meta = json.loads(read(n))
        tensors = sorted((int(v["data_offsets"][0]), int(v["data_offsets"][1]))
                         for k, v in meta.items() if k != "__metadata__")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    base = 8 + n
    bounds = [(0, base)]
    pos = base
    for begin, end in tensors:
        begin, end = base + begin, base + end
        if begin < pos or end > size or end < begin:
            return None  # overlapping or out of range: not a layout we understand
        if begin > pos:
            bounds.append((pos, begin - pos))  # padding between tensors
        for start in range(begin, end, max_extent):
            bounds.append((start, min(max_extent, end - start)))
        pos = max(pos, end)
    if pos < size:
        bounds.append((pos, size - pos))
    return bounds


def file_extents(path: str, max_extent: int) -> list[HashedExtent]:
    """The content-following extents of a local file, hashed."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        bounds = _safetensors_bounds(f, size, max_extent) if path.endswith(".safetensors") else None
        if bounds is None:
            from pyfastcdc import FastCDC

            avg = max(64 << 10, max_extent // 4)
            bounds = [(c.offset, c.length) for c in FastCDC(avg_size=avg).cut_file(path)] if size else []
        out: list[HashedExtent] = []
        for off, length in bounds:
            f.seek(off)
            out.append((off, length, xxhash.xxh3_128_digest(f.read(length))))
    return out


def iter_files(root: str) -> Iterator[str]:
    """Relative POSIX paths of the regular files under `root`, sorted, skipping `.modelfs`."""
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != DIR)
        for name in sorted(files):
            yield os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
