"""The content hash every layer agrees on: xxh3-128 of an extent's bytes (fast, not collision-resistant:
content is shared by hash only within one trust domain)."""

from __future__ import annotations

import xxhash


def content_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The 16-byte content hash of an extent's bytes (xxh3-128)."""
    return xxhash.xxh3_128_digest(data)
