"""The chunk index: which content hash each extent of each immutable file version holds, and which of
those bytes the cache holds, in the version's own file (LMDB).

Schema (one LMDB environment per process, in `<cache>/index/`; the daemon is its only writer):

    meta      b"schema"                         -> b"2"
    versions  vid (16 B)                        -> JSON {source, domain, key, etag, size, last_used, loads,
                                                   seal}: seal, the identity of the version's cache file when
                                                   it was sealed (`integrity`: its invariants)
    extents   vid (16 B) + offset (8 B, BE)     -> hash (16 B, xxh3-128) + length (4 B, BE)
    present   vid (16 B) + offset (8 B, BE)     -> b"": the extent's bytes are in the version's file
                                                   (`cache.FileCache`, `<cache>/files/<vid hex>`)
    listings  source identity + NUL + prefix    -> JSON {dirs: [name], objects: [[name, size, etag, mtime]]}
              ... + NUL + "manifest"            -> the prefix's manifest as published (bytes)

`vid` is xxh3-128 of (source identity, key, ETag, size): one immutable version. A new ETag is a new
vid, so entries never need invalidation: they describe bytes that can no longer change. Schema 1 (blocks
in content-addressed files) is upgraded in place: its extents and listings stay true, nothing is present.

Invariants, and what a crash at each step of storing an extent leaves behind:

1. A present entry is committed only AFTER the extent's bytes were written into the version's file (in
   the page cache), and deleted BEFORE its range is punched out of the file (eviction). Crash after the
   write, before the commit: bytes in the file that no entry names; the extent is fetched and written
   again. Crash after the delete, before the punch: bytes nobody names; punched or overwritten later.
   A complete file is evicted whole instead (never punched: a passthrough mapping of it may outlive the
   daemon): the file is unlinked first, its entries deleted right after. Crash between: entries naming a
   file that is gone, dropped at the next start before anything reads them (`FileCache._scan`).
2. An extents entry is a statement about content, not about presence: it stays true after eviction,
   because the version's bytes cannot change. Dedup finds content by hash through it, joined with present.
3. Files are not fsync'ed and the environment runs with sync=False (a commit is durable against a process
   crash, not an OS crash). Hence a present extent is trusted only once this process wrote it or read it
   back and hashed it (`cache.FileCache`), and an environment that fails to open or has a foreign schema
   is moved aside and rebuilt empty: only cache warmth is lost, never correctness.
4. A listings entry is the last listing of one directory that the store answered, written after the
   store answered and before the kernel is told. It is used only while the store is unreachable
   (offline mode), to keep serving the tree the cache holds; a crash mid-write leaves the previous
   listing (one transaction). Files it names that were not cached read as EIO offline.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import threading
import time
from collections.abc import Iterable

import lmdb
import xxhash

from modelfs.remote import Listing, ObjectInfo

log = logging.getLogger(__name__)

SCHEMA = b"2"
#: Schemas this one upgrades in place (their tables mean the same; what they lacked starts empty).
UPGRADES = (b"1",)
_EXT = struct.Struct(">16sI")
_OFF = struct.Struct(">Q")


def version_id(identity: str, info: ObjectInfo) -> bytes:
    """The 16-byte id of one immutable version of one object of one source."""
    return xxhash.xxh3_128_digest(f"{identity}\0{info.key}\0{info.etag}\0{info.size}".encode("utf-8",
                                                                                            "surrogatepass"))


#: (offset, hash, length) of one extent of a version, as stored.
Entry = tuple[int, bytes, int]


class ChunkIndex:
    """Thread-safe: LMDB serializes writers; readers run concurrently from any thread."""

    def __init__(self, path: str, map_size: int) -> None:
        self.path = path
        self._touched: set[bytes] = set()
        self._lock = threading.Lock()
        self.write_errors = 0
        try:
            self._open(map_size)
        except (lmdb.Error, ValueError, json.JSONDecodeError) as e:
            aside = f"{path}.corrupt-{int(time.time())}"
            log.warning("index at %s is unreadable (%s); moving it to %s and rebuilding (cache warmth only is lost)",
                        path, type(e).__name__, aside)
            if os.path.exists(path):
                shutil.move(path, aside)
            self._open(map_size)

    def _open(self, map_size: int) -> None:
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        self.env = lmdb.open(self.path, map_size=map_size, max_dbs=8, max_readers=4096, sync=False,
                             metasync=False, readahead=False, max_spare_txns=64)
        try:
            self._meta = self.env.open_db(b"meta")
            self._versions = self.env.open_db(b"versions")
            self._extents = self.env.open_db(b"extents")
            self._present = self.env.open_db(b"present")
            self._listings = self.env.open_db(b"listings")
            with self.env.begin(write=True) as txn:
                schema = txn.get(b"schema", db=self._meta)
                if schema is None or schema in UPGRADES:
                    txn.put(b"schema", SCHEMA, db=self._meta)
                elif schema != SCHEMA:
                    raise ValueError(f"schema {schema!r}")
                # Touch every record once so a truncated or garbage file fails here, not mid-read.
                for db in (self._versions, self._extents, self._present, self._listings):
                    for k, v in txn.cursor(db=db):
                        if db is self._extents and (len(k) != 24 or len(v) != _EXT.size):
                            raise ValueError("bad extent record")
                        if db is self._present and len(k) != 24:
                            raise ValueError("bad present record")
        except BaseException:
            self.env.close()
            raise

    def lookup(self, vid: bytes, offset: int) -> tuple[bytes, int] | None:
        """(hash, length) of the extent of `vid` starting at `offset`, if known."""
        with self.env.begin(db=self._extents, buffers=False) as txn:
            v = txn.get(vid + _OFF.pack(offset))
        return _EXT.unpack(v) if v is not None else None

    def extents(self, vid: bytes) -> dict[int, tuple[bytes, int]]:
        """Every known extent of `vid`: offset -> (hash, length)."""
        out: dict[int, tuple[bytes, int]] = {}
        with self.env.begin(db=self._extents) as txn:
            cur = txn.cursor()
            if cur.set_range(vid):
                for k, v in cur:
                    if k[:16] != vid:
                        break
                    out[_OFF.unpack(k[16:])[0]] = _EXT.unpack(v)
        return out

    def _version_record(self, txn: lmdb.Transaction, vid: bytes, identity: str, domain: str,
                        info: ObjectInfo) -> None:
        if vid in self._touched:
            return
        old = txn.get(vid, db=self._versions)
        rec = json.loads(bytes(old)) if old is not None else {"loads": 0}
        rec.update({"source": identity, "domain": domain, "key": info.key, "etag": info.etag, "size": info.size,
                    "last_used": time.time()})
        txn.put(vid, json.dumps(rec).encode(), db=self._versions)

    def record(self, vid: bytes, identity: str, domain: str, info: ObjectInfo, offset: int, digest: bytes,
               length: int) -> None:
        """Remember that `length` bytes of `vid` at `offset` hash to `digest` (bytes not stored: the cache
        was full). A failed write (disk full, map full) only costs warmth: counted, logged once."""
        self._write(vid, identity, domain, info, [(offset, digest, length)], present=False)

    def mark_present(self, vid: bytes, identity: str, domain: str, info: ObjectInfo, entries: list[Entry]) -> bool:
        """The bytes of these extents are in the version's file now (written there, invariant 1): their
        hashes and their presence, in one transaction. False if the index could not be written."""
        return self._write(vid, identity, domain, info, entries, present=True)

    def _write(self, vid: bytes, identity: str, domain: str, info: ObjectInfo, entries: list[Entry],
               present: bool) -> bool:
        try:
            with self.env.begin(write=True) as txn:
                for offset, digest, length in entries:
                    key = vid + _OFF.pack(offset)
                    txn.put(key, _EXT.pack(digest, length), db=self._extents)
                    if present:
                        txn.put(key, b"", db=self._present)
                self._version_record(txn, vid, identity, domain, info)
        except lmdb.Error as e:
            self._write_failed(e)
            return False
        with self._lock:
            self._touched.add(vid)
        return True

    def unmark(self, extents: Iterable[tuple[bytes, int]]) -> None:
        """These (vid, offset) are no longer in their files (evicted, found damaged): before the punch."""
        try:
            with self.env.begin(write=True, db=self._present) as txn:
                for vid, offset in extents:
                    txn.delete(vid + _OFF.pack(offset))
        except lmdb.Error as e:
            self._write_failed(e)

    def present(self) -> dict[bytes, dict[int, tuple[bytes, int]]]:
        """Every present extent: vid -> offset -> (hash, length) (read once, at start)."""
        out: dict[bytes, dict[int, tuple[bytes, int]]] = {}
        with self.env.begin() as txn:
            ext = txn.cursor(db=self._extents)
            for k, _ in txn.cursor(db=self._present):
                v = ext.get(k)
                if v is None:
                    continue  # cannot happen (written together); unknown content is not served
                out.setdefault(bytes(k[:16]), {})[_OFF.unpack(k[16:])[0]] = _EXT.unpack(v)
        return out

    def seal(self, vid: bytes, identity: dict[str, int | str]) -> bool:
        """Record the identity of a version's cache file, sealed (`integrity`, invariants 1 and 5); False if
        the version has no record (or the write failed)."""
        try:
            with self.env.begin(write=True, db=self._versions) as txn:
                v = txn.get(vid)
                if v is None:
                    return False
                rec = json.loads(bytes(v))
                rec["seal"] = identity
                txn.put(vid, json.dumps(rec).encode())
                return True
        except lmdb.Error as e:
            self._write_failed(e)
            return False

    def version(self, vid: bytes) -> dict[str, object] | None:
        with self.env.begin(db=self._versions) as txn:
            v = txn.get(vid)
        return json.loads(v) if v is not None else None

    def note_load(self, vid: bytes, identity: str, domain: str, info: ObjectInfo) -> int:
        """One more load of `vid` began (a first READ after an open); returns how many there have been. A
        version with no record yet (every byte of it read from other versions' files) gets one."""
        try:
            with self.env.begin(write=True, db=self._versions) as txn:
                v = txn.get(vid)
                rec: dict[str, object] = json.loads(bytes(v)) if v is not None else {
                    "source": identity, "domain": domain, "key": info.key, "etag": info.etag, "size": info.size}
                loads = int(str(rec.get("loads", 0))) + 1
                rec["loads"], rec["last_used"] = loads, time.time()
                txn.put(vid, json.dumps(rec).encode())
                return loads
        except lmdb.Error as e:
            self._write_failed(e)
            return 1

    def _write_failed(self, e: lmdb.Error) -> None:
        self.write_errors += 1
        if self.write_errors == 1:
            log.warning("cannot write to the index (%s): serving without recording what is cached", e)

    @staticmethod
    def _source_key(identity: str, prefix: str, kind: str = "") -> bytes:
        return f"{identity}\0{prefix}{chr(0) + kind if kind else ''}".encode("utf-8", "surrogatepass")

    def _put_if_changed(self, key: bytes, value: bytes) -> None:
        try:
            with self.env.begin(write=True, db=self._listings) as txn:
                if txn.get(key) != value:
                    txn.put(key, value)
        except lmdb.Error as e:
            self._write_failed(e)

    def _get_source(self, key: bytes) -> bytes | None:
        with self.env.begin(db=self._listings) as txn:
            return txn.get(key)

    def save_listing(self, identity: str, prefix: str, listing: Listing) -> None:
        """Keep the store's latest listing of `prefix`, for offline mode."""
        rec = {"dirs": listing.dirs,
               "objects": [[name, o.size, o.etag, o.mtime] for name, o in listing.objects]}
        self._put_if_changed(self._source_key(identity, prefix),
                             json.dumps(rec, ensure_ascii=False).encode("utf-8", "surrogatepass"))

    def load_listing(self, identity: str, prefix: str) -> Listing | None:
        """The last saved listing of `prefix`, or None if it was never listed."""
        value = self._get_source(self._source_key(identity, prefix))
        if value is None:
            return None
        rec = json.loads(value.decode("utf-8", "surrogatepass"))
        return Listing(dirs=list(rec["dirs"]),
                       objects=[(name, ObjectInfo(prefix + name, int(size), str(etag), float(mtime)))
                                for name, size, etag, mtime in rec["objects"]])

    def save_manifest(self, identity: str, prefix: str, raw: bytes) -> None:
        """Keep the prefix's manifest, so offline mode reads published files with their layout."""
        self._put_if_changed(self._source_key(identity, prefix, "manifest"), raw)

    def load_manifest(self, identity: str, prefix: str) -> bytes | None:
        return self._get_source(self._source_key(identity, prefix, "manifest"))

    def versions(self) -> dict[bytes, dict[str, object]]:
        """All recorded versions (for administration and tests)."""
        with self.env.begin(db=self._versions) as txn:
            return {bytes(k): json.loads(v) for k, v in txn.cursor()}

    def sync(self) -> None:
        self.env.sync(True)

    def close(self) -> None:
        try:
            self.env.sync(True)
        finally:
            self.env.close()
