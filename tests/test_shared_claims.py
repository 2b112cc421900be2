"""Cooperative fetch between two tiers of two nodes, without a mount: a real SeaweedFS bucket as the shared
tier, the waiting node's requests through the fault proxy so their order is read from its request log."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import trio

from modelfs.cache import FileCache
from modelfs.catalog.index import ChunkIndex
from modelfs.catalog.version import FileVersion
from modelfs.config import Config
from modelfs.digest import content_hash
from modelfs.health import Health
from modelfs.remote import ObjectInfo
from modelfs.remote.s3 import S3Store
from modelfs.remote.sources import Block, Origin
from modelfs.shared import SharedTier, claim_key
from modelfs.stats import Stats
from modelfs.supervise import Supervisor
from tests.support.faultproxy import FaultProxy
from tests.support.memstore import MemoryStore
from tests.support.seaweed import SeaweedServer

pytestmark = pytest.mark.s3

BUCKET = "claims-tier"
EXTENT = 1 << 20


def tier(endpoint: str, prefix: str, root: Path, node: str, sup: Supervisor) -> tuple[SharedTier, FileCache]:
    s3 = dataclasses.replace(Config().s3, endpoint_url=endpoint, max_attempts=1)
    cache = FileCache(str(root), ChunkIndex(str(root / "index"), 1 << 24), "test-domain", "s3:test/bucket/",
                      preallocate=False)
    origin = MemoryStore("origin")  # never asked here: every extent is the tier's or another node's
    behind = Origin(origin, Stats(), Health(origin.check, "origin", 60.0, 5.0))
    return SharedTier(S3Store(BUCKET, prefix, s3), "test-domain", Stats(), cache.read_back, behind, deadline=5.0,
                      probe_interval=1.0, node=node, supervisor=sup), cache


def blk(ver: FileVersion, start: int) -> Block:
    return ver.blocks([ver.extent_at(start)])[0]


def test_a_node_waiting_on_a_claim_is_answered_by_the_first_listing_after_the_write(
        seaweed: SeaweedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Node B waits for an extent node A claimed. B lists the claims (one LIST per poll, for all its waiters)
    and keeps waiting while the claim stands; A writes the extent and drops its claim; the first LIST of B
    that reaches the store after that wakes B, whose next request is the GET of the extent: right bytes,
    no origin fetch."""
    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    seaweed.create_bucket(BUCKET)
    prefix = f"t{os.getpid()}-{os.urandom(4).hex()}/"
    data = os.urandom(EXTENT)
    ver = FileVersion.of("s3:test/bucket/", ObjectInfo("model.safetensors", EXTENT, '"etag"', 0.0), EXTENT)
    with FaultProxy(seaweed.endpoint_url) as proxy:
        sup = Supervisor(Stats())
        a, a_cache = tier(seaweed.endpoint_url, prefix, tmp_path / "a", "node-a", sup)
        b, _ = tier(proxy.endpoint_url, prefix, tmp_path / "b", "node-b", sup)
        key = a.key(blk(ver, 0))
        assert key is not None
        view = memoryview(bytearray(EXTENT))
        digest = content_hash(data)
        claim = prefix + claim_key(key)
        got: list[bytes | None] = []
        listed_before = 0

        def lists() -> list[int]:
            return [i for i, r in enumerate(proxy.log) if r.method == "GET" and "list-type=2" in r.path]

        def claimed() -> bool:
            return "Contents" in seaweed.client().list_objects_v2(Bucket=BUCKET, Prefix=claim)

        async def main() -> None:
            nonlocal listed_before
            async with sup.running() as nursery:
                a.start()
                b.start()
                assert await trio.to_thread.run_sync(a.claim, blk(ver, 0)) is True
                assert await trio.to_thread.run_sync(b.claim, blk(ver, 0)) is False

                async def wait() -> None:
                    got.append(await trio.to_thread.run_sync(b.wait_for, blk(ver, 0), view))
                nursery.start_soon(wait)
                with trio.fail_after(60):  # detects a hang only
                    while len(lists()) < 3:  # B is polling; the claim stands, so it waits
                        await trio.sleep(0.01)
                    assert not got
                    await trio.to_thread.run_sync(a_cache.write, ver, 0, memoryview(data), digest)
                    a.share_soon(blk(ver, 0), digest)  # written, then the claim dropped
                    while await trio.to_thread.run_sync(claimed):
                        await trio.sleep(0.01)
                    listed_before = len(lists())
                    while not got:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()

        trio.run(main)
        assert got == [digest] and bytes(view) == data
        log = proxy.log
        fetched = next(i for i, r in enumerate(log) if r.method == "GET" and r.path.split("?")[0].endswith(key))
        assert len([i for i in lists() if i < fetched]) <= listed_before + 1, log
        assert b.stats.shared_waits == 1 and b.stats.shared_hits == 1 and b.stats.shared_misses == 0
        assert a.stats.shared_bytes_written == EXTENT
