"""`modelfs publish`: upload a local checkpoint dir as ordinary objects plus a manifest of its extents.

The objects stay plain files that any S3 tool reads; the manifest (`manifest.KEY` under the prefix)
lets a mount fetch and store each distinct tensor once across versions. Uploads go through boto3's
transfer manager (parallel multipart, its retries); a re-run uploads only files whose object is missing
or differs (by size and extent hashes), then rewrites the manifest with every object's current ETag.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import botocore.exceptions as bexc
import xxhash
from boto3.s3.transfer import TransferConfig

from modelfs.catalog import manifest as mf
from modelfs.config import MiB, S3Config
from modelfs.errors import ModelfsError, NotFound, StoreError
from modelfs.remote import ObjectInfo
from modelfs.remote.s3 import S3Store, parse_s3_url

log = logging.getLogger(__name__)

Progress = Callable[[int], object]


@dataclass
class PublishReport:
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0


def _store(url: str, s3: S3Config) -> S3Store:
    bucket, prefix = parse_s3_url(url)
    store = S3Store(bucket, prefix, s3)
    store.check()
    return store


def _head(store: S3Store, key: str) -> ObjectInfo | None:
    try:
        return store.head(key)
    except NotFound:
        return None


def read_manifest(store: S3Store) -> mf.Manifest | None:
    """The prefix's manifest, or None if it has none."""
    try:
        body = store.client.get_object(Bucket=store.bucket, Key=store.prefix + mf.KEY)["Body"].read()
    except bexc.ClientError as e:
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return None
        raise StoreError(f"cannot read the manifest: {e.response.get('Error', {}).get('Code', '?')}") from None
    return mf.Manifest.loads(body)


def publish(local_dir: str, url: str, s3: S3Config, max_extent: int = 8 * MiB, concurrency: int = 8,
            progress: Progress = lambda n: None, on_total: Callable[[int], object] = lambda n: None) -> PublishReport:
    """Upload what is missing under `url` and write its manifest; returns what was done."""
    if not os.path.isdir(local_dir):
        raise ModelfsError(f"{local_dir} is not a directory")
    store = _store(url, s3)
    old = read_manifest(store) or mf.Manifest()
    files = list(mf.iter_files(local_dir))
    on_total(sum(os.path.getsize(os.path.join(local_dir, p)) for p in files))
    transfer = TransferConfig(multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB,
                              max_concurrency=concurrency, use_threads=True)
    new = mf.Manifest()
    report = PublishReport()
    for rel in files:
        path = os.path.join(local_dir, rel)
        size = os.path.getsize(path)
        extents = mf.file_extents(path, max_extent)
        head = _head(store, rel)
        prev = old.files.get(rel)
        if (head is not None and prev is not None and head.size == size and head.etag == prev.etag
                and prev.extents == extents):
            report.skipped.append(rel)
            new.files[rel] = prev
            progress(size)
            continue
        try:
            store.client.upload_file(path, store.bucket, store.prefix + rel, Config=transfer, Callback=progress)
        except (bexc.ClientError, bexc.BotoCoreError, OSError) as e:
            raise StoreError(f"upload of {rel} failed: {type(e).__name__}") from None
        head = _head(store, rel)
        if head is None or head.size != size:
            raise StoreError(f"upload of {rel} did not land")
        new.files[rel] = mf.FileEntry(size, head.etag, extents)
        report.uploaded.append(rel)
        report.bytes_uploaded += size
    store.client.put_object(Bucket=store.bucket, Key=store.prefix + mf.KEY, Body=new.dumps(),
                            ContentType="application/json")
    store.close()
    return report


def verify(url: str, s3: S3Config, progress: Progress = lambda n: None,
           on_total: Callable[[int], object] = lambda n: None) -> list[str]:
    """Check every extent hash of the manifest against the objects' bytes; returns the problems found."""
    store = _store(url, s3)
    man = read_manifest(store)
    if man is None:
        raise ModelfsError(f"{url} has no manifest ({mf.KEY})")
    on_total(sum(e.size for e in man.files.values()))
    problems: list[str] = []
    for rel, entry in sorted(man.files.items()):
        head = _head(store, rel)
        if head is None:
            problems.append(f"{rel}: object missing")
            continue
        if head.etag != entry.etag:
            problems.append(f"{rel}: object changed since it was published (ETag)")
            continue
        body = store.client.get_object(Bucket=store.bucket, Key=store.prefix + rel, IfMatch=entry.etag)["Body"]
        for off, length, digest in entry.extents:
            h = xxhash.xxh3_128()
            left = length
            while left:
                chunk = body.read(min(left, 4 * MiB))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
                progress(len(chunk))
            if left or h.digest() != digest:
                problems.append(f"{rel}: extent at {off} ({length} bytes) does not match its hash")
        body.close()
    store.close()
    return problems
