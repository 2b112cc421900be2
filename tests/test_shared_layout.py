"""The shared tier's key layout and cooperative order, without a store (the tier itself: test_shared_tier.py)."""

from __future__ import annotations

import re

from modelfs.shared import content_key, version_key


def test_keys_follow_the_documented_layout_and_keep_trust_domains_apart() -> None:
    digest = bytes(range(16))
    key = content_key("s3:http://e/bucket-a", digest)
    assert re.fullmatch(r"v1/[0-9a-f]{16}/000102030405060708090a0b0c0d0e0f", key), key
    assert content_key("s3:http://e/bucket-b", digest) != key  # same bytes, other trust domain: other key
    ver = version_key("s3:http://e/bucket-a", b"\xab" * 16, 8 << 20)
    assert ver == f"{key.rsplit('/', 1)[0]}/ver/{'ab' * 16}/{8 << 20}"
