"""Stores: what the core needs from S3 or a local directory (`base`), and picking one for a source.

`base` defines the interface and its types; `s3` and `local` implement it (`testing.memstore` too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelfs.errors import ConfigError
from modelfs.remote.base import Listing, ObjectInfo, Store, WritableStore, read_bytes

if TYPE_CHECKING:
    from modelfs.config import S3Config

__all__ = ["Listing", "ObjectInfo", "Store", "WritableStore", "open_store", "read_bytes"]


def open_store(source: str, s3_cfg: S3Config) -> Store:
    """Pick the implementation for `source`: s3://bucket/prefix, file:///dir, or a plain directory."""
    if source.startswith("s3://"):
        from modelfs.remote.s3 import S3Store, parse_s3_url

        bucket, prefix = parse_s3_url(source)
        return S3Store(bucket, prefix, s3_cfg)
    if "://" in source and not source.startswith("file://"):
        raise ConfigError(f"source: unsupported URL scheme in {source!r} (use s3://BUCKET/PREFIX or a directory)")
    from modelfs.remote.local import LocalStore

    return LocalStore(source.removeprefix("file://"))
