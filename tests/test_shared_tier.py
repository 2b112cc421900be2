"""The shared cache tier across nodes: real SeaweedFS (origin and shared tier as two buckets), the origin
behind the fault proxy so the bytes it serves are counted from its request log, and up to three daemons on
this machine with their own cache dirs and mountpoints (three nodes of a fleet)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelfs.catalog.index import version_id
from modelfs.remote import ObjectInfo
from modelfs.shared import claim_key, version_key
from tests.conftest import BUCKET, Checkpoint, Mount, cli, requires_fuse
from tests.conftest import sha256_file as sha
from tests.support.checkpoints import make_variant_set
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.seaweed import SeaweedServer

pytestmark = [requires_fuse, pytest.mark.mount, pytest.mark.s3]

SHARED_BUCKET = "fleet-cache"


def load_tree(root: Path, want: Path) -> None:
    """Read every file under `root` and compare it with the source tree `want`."""
    files = sorted(p.relative_to(want) for p in want.rglob("*") if p.is_file())
    assert sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) == files
    for rel in files:
        assert sha(root / rel) == sha(want / rel), rel


def load_on_all(nodes: list[Mount], want: Path, limit: float = 600) -> None:
    """Every node loads the whole tree at once (a thread each); a load that fails or hangs fails the test."""
    errors: list[BaseException] = []

    def load(m: Mount) -> None:
        try:
            load_tree(m.path, want)
        except BaseException as e:  # handed to the test thread below
            errors.append(e)

    threads = [threading.Thread(target=load, args=(m,)) for m in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=limit)
    assert not any(t.is_alive() for t in threads), "a load hung"
    assert not errors, errors


def settled_write_backs(m: Mount, limit: float = 120) -> dict[str, int]:
    """Counters once every extent this node fetched from the origin is in the shared tier (bounded wait:
    a write-back that never lands fails the test, it does not hang it)."""
    deadline = time.monotonic() + limit
    while True:
        st = m.stats()
        if st["fetches_in_flight"] == 0 and st["prefetch_queue"] == 0 and \
                st["shared_bytes_written"] >= st["bytes_fetched"] > 0:
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.2)


@pytest.fixture
def fleet(seaweed: SeaweedServer, mounter: Callable[..., Mount]) -> Iterator[Callable[..., Mount]]:
    """node(source, shared_endpoint=..., extra=[...]) -> a daemon of this fleet: origin through `origin`
    (the proxy below), shared tier at s3://fleet-cache/<test>/ (SeaweedFS direct, or a given endpoint)."""
    seaweed.create_bucket(SHARED_BUCKET)
    prefix = f"t{os.getpid()}-{time.monotonic_ns()}"
    with FaultProxy(seaweed.endpoint_url) as origin:
        env = {**seaweed.env(), "AWS_ENDPOINT_URL": origin.endpoint_url}

        def node(source: str, shared_endpoint: str = seaweed.endpoint_url, extra: tuple[str, ...] = ()) -> Mount:
            return mounter(source, env=env, args=["-o", f"shared.url=s3://{SHARED_BUCKET}/{prefix}",
                                                  "-o", f"shared.endpoint_url={shared_endpoint}", *extra])

        node.origin = origin  # type: ignore[attr-defined]
        node.prefix = prefix  # type: ignore[attr-defined]
        yield node


def test_a_second_node_loads_from_the_shared_tier_not_the_origin(s3_checkpoint: str, checkpoint: Checkpoint,
                                                                 fleet: Callable[..., Mount]) -> None:
    origin: FaultProxy = fleet.origin  # type: ignore[attr-defined]
    size = sum(checkpoint.files().values())
    a = fleet(s3_checkpoint)
    load_tree(a.path, checkpoint.root)
    st = settled_write_backs(a)
    assert origin.ranged_bytes() >= size * 0.98 and st["shared_hits"] == 0
    origin.clear_log()

    b = fleet(s3_checkpoint)
    load_tree(b.path, checkpoint.root)
    fetched = origin.ranged_bytes()
    assert fetched <= 0.02 * size, (fetched, size, b.stats())
    st = b.stats()
    assert st["shared_hits"] > 0 and st["shared_bytes_read"] >= size * 0.98 and st["shared_corrupt"] == 0


def test_a_fine_tune_fetches_only_its_changed_tensors_from_the_origin(seaweed: SeaweedServer, tmp_path: Path,
                                                                     fleet: Callable[..., Mount]) -> None:
    origin: FaultProxy = fleet.origin  # type: ignore[attr-defined]
    root = tmp_path / "variants"
    changed = make_variant_set(root)
    prefix = f"ft-{fleet.prefix}"  # type: ignore[attr-defined]
    for d in ("base", "ft"):
        r = cli("publish", str(root / d), f"s3://{BUCKET}/{prefix}/{d}", "-q", env=seaweed.env())
        assert r.returncode == 0, r.stderr
    source = f"s3://{BUCKET}/{prefix}"
    a = fleet(source)
    load_tree(a.path / "base", root / "base")
    settled_write_backs(a)
    origin.clear_log()

    b = fleet(source)  # an empty local cache: only the shared tier knows the base's tensors
    load_tree(b.path / "ft", root / "ft")
    size = (root / "ft" / "model.safetensors").stat().st_size
    fetched = origin.ranged_bytes()
    assert fetched <= changed + 0.02 * size, (fetched, changed, size)
    assert b.stats()["shared_hits"] > 0


def test_three_nodes_loading_at_once_fetch_about_once_from_the_origin(s3_checkpoint: str, checkpoint: Checkpoint,
                                                                      fleet: Callable[..., Mount]) -> None:
    origin: FaultProxy = fleet.origin  # type: ignore[attr-defined]
    size = sum(checkpoint.files().values())
    nodes = [fleet(s3_checkpoint) for _ in range(3)]
    load_on_all(nodes, checkpoint.root, limit=300)
    fetched = origin.ranged_bytes()
    assert fetched <= 1.5 * size, (fetched / size, [m.stats()["shared_hits"] for m in nodes])


@pytest.mark.parametrize("fault", ["blackhole", "503", "flipped"])
def test_a_failing_shared_tier_never_fails_or_stalls_a_load(fault: str, seaweed: SeaweedServer, s3_checkpoint: str,
                                                            checkpoint: Checkpoint,
                                                            fleet: Callable[..., Mount]) -> None:
    with FaultProxy(seaweed.endpoint_url) as tier:
        a = fleet(s3_checkpoint, shared_endpoint=tier.endpoint_url)
        load_tree(a.path, checkpoint.root)
        settled_write_backs(a)
        if fault == "blackhole":
            tier.blackhole()
        elif fault == "503":
            tier.add_rule(Fault.slow_down(), method="GET")
        else:  # every object of the tier with one bit flipped, its metadata kept
            s3 = seaweed.client()
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket=SHARED_BUCKET,
                                                         Prefix=fleet.prefix)["Contents"]]  # type: ignore[attr-defined]
            for key in keys:
                obj = s3.get_object(Bucket=SHARED_BUCKET, Key=key)
                data = bytearray(obj["Body"].read())
                data[len(data) // 2] ^= 0x01
                s3.put_object(Bucket=SHARED_BUCKET, Key=key, Body=bytes(data), Metadata=obj["Metadata"])
        b = fleet(s3_checkpoint, shared_endpoint=tier.endpoint_url, extra=("-o", "shared.deadline=1"))
        began = time.monotonic()
        load_tree(b.path, checkpoint.root)  # every byte right: from the origin
        took = time.monotonic() - began
        st = b.stats()
        assert st["shared_hits"] == 0, st
        if fault == "flipped":
            assert st["shared_corrupt"] >= 1, st
        else:
            # At most one failed request per extent (no claim after a failed read: that would cost the loader
            # a second deadline), and skipped once it answered nothing for two deadlines.
            extents = sum(-(-size // (8 << 20)) + 1 for size in checkpoint.files().values())
            assert 1 <= st["shared_errors"] <= extents, (st, extents)
        assert took < 120, took  # a hang bound, not a timing
        tier.blackhole(False)


def test_prefetch_on_one_node_warms_the_fleet(s3_checkpoint: str, checkpoint: Checkpoint,
                                              fleet: Callable[..., Mount]) -> None:
    """`modelfs prefetch` with a shared tier fills the tier too (one CI step warms the fleet), even for
    extents the node's own cache already held."""
    origin: FaultProxy = fleet.origin  # type: ignore[attr-defined]
    size = sum(checkpoint.files().values())
    a = fleet(s3_checkpoint, extra=("-o", "shared.write_back=false"))  # nothing shared in the background
    r = cli("prefetch", str(a.path), env=a.env)
    assert r.returncode == 0, r.stderr
    assert a.stats()["shared_bytes_written"] >= size * 0.98, a.stats()
    origin.clear_log()
    b = fleet(s3_checkpoint)
    load_tree(b.path, checkpoint.root)
    assert origin.ranged_bytes() <= 0.02 * size, b.stats()


def test_a_claim_left_by_a_node_that_died_costs_a_bounded_wait(seaweed: SeaweedServer,
                                                              s3_checkpoint: str, checkpoint: Checkpoint,
                                                              fleet: Callable[..., Mount]) -> None:
    """A node claimed an extent for the fleet and died: the others wait for it at most 4 x shared.deadline,
    then fetch it from the origin. (Once the claim is older than a flight can last, it is simply taken over:
    `test_shared_store.py`, against the claim's age, with no wait.)"""
    origin: FaultProxy = fleet.origin  # type: ignore[attr-defined]
    rel = f"{checkpoint.hf_dir}/model-00001-of-00003.safetensors"
    bucket, prefix = s3_checkpoint.removeprefix("s3://").split("/", 1)
    head = seaweed.client().head_object(Bucket=bucket, Key=prefix + rel)
    info = ObjectInfo(rel, int(head["ContentLength"]), str(head["ETag"]), 0.0)
    identity, domain = f"s3:{origin.endpoint_url}/{bucket}/{prefix}", f"s3:{origin.endpoint_url}/{bucket}"
    claim = claim_key(version_key(domain, version_id(identity, info), 0))
    seaweed.client().put_object(Bucket=SHARED_BUCKET, Key=f"{fleet.prefix}/{claim}", Body=b"a node that died")  # type: ignore[attr-defined]
    # fetch.deadline=5 and shared.deadline=1: a claim is stale after 5 + 4 x 1 = 9 s, so this one stands
    # through the load. One extent per GET: the claimed extent's flight is its own.
    node = fleet(s3_checkpoint, extra=("-o", "shared.deadline=1", "-o", "fetch.deadline=5",
                                       "-o", "fetch.max_request=8MiB"))
    load_tree(node.path, checkpoint.root)  # correct bytes either way
    st = node.stats()
    assert st["shared_waits"] == 1 and st["shared_misses"] >= 1, st  # waited for the claimed extent, then fetched
    assert st["shared_wait_expired"] == 1, st


def test_three_nodes_ride_out_an_overloaded_origin(s3_checkpoint: str, checkpoint: Checkpoint, seaweed: SeaweedServer,
                                                   fleet: Callable[..., Mount]) -> None:
    """An overloaded store is not an outage. While three nodes load at once, the origin refuses every
    connection for a second out of two and answers a third of the requests 1.5 s late, and the tier
    answers a quarter of its requests late: every load completes with the source's bytes, no node goes
    offline, and no file the mount listed turns into ENOENT."""
    origin: FaultProxy = fleet.origin  # type: ignore[attr-defined]
    with FaultProxy(seaweed.endpoint_url, seed=3) as tier:
        tier.add_rule(Fault.latency(2.5), probability=0.25)
        count = int(os.environ.get("MODELFS_TEST_FLEET_NODES", "3"))  # 6 for the closing runs of the fix
        # One extent per GET: enough GETs, for long enough, that the refusals cut bodies in flight (botocore
        # retries a refused connect itself; a cut body is modelfs's to try again, counted in store_retries).
        nodes = [fleet(s3_checkpoint, shared_endpoint=tier.endpoint_url,
                       extra=("-o", "shared.deadline=1", "-o", "fetch.max_request=8MiB"))
                 for _ in range(count)]
        shards = sorted(os.listdir(checkpoint.root / checkpoint.hf_dir))
        for m in nodes:  # listed, as a loader lists a checkpoint dir before it opens the shards
            assert sorted(os.listdir(m.path / checkpoint.hf_dir)) == shards
        slow = origin.add_rule(Fault.latency(1.5), probability=0.3)
        stop, bursts = threading.Event(), [0]

        def overload() -> None:  # refusing from the start, a second out of two
            while not stop.is_set():
                origin.refuse(True)
                bursts[0] += 1
                stop.wait(1.0)
                origin.refuse(False)
                stop.wait(1.0)

        burster = threading.Thread(target=overload)
        burster.start()
        try:
            load_on_all(nodes, checkpoint.root)
        finally:
            stop.set()
            burster.join()
            origin.refuse(False)
        assert bursts[0] >= 1 and slow.fired >= 1, (bursts, slow.fired)
        # GETs the store failed were tried again (ridden out), not avoided: a body cut by a refusal is asked
        # for again from where it stopped (body_retries), a GET failed past botocore's retries is sent again
        # (store_retries)
        assert sum(m.stats()["store_retries"] + m.stats()["body_retries"] for m in nodes) >= 1, \
            [m.stats() for m in nodes]
        for m in nodes:
            assert json.loads(os.getxattr(m.path, "user.modelfs.health"))["offline"] is False
            assert m.stats()["offline_misses"] == 0


def test_a_node_unmounted_right_after_its_load_hands_on_its_write_backs(seaweed: SeaweedServer, s3_checkpoint: str,
                                                                          checkpoint: Checkpoint,
                                                                          fleet: Callable[..., Mount]) -> None:
    """A node that loads and is unmounted at once (a job that ends, a node drained): what it fetched from the
    origin still reaches the tier before its daemon exits (shared.flush_on_exit), so the next node loads from
    the tier, not the origin. The tier takes 1.5 s to answer each write, so write-backs are still queued when
    the load ends (the log line says how many were handed on)."""
    origin: FaultProxy = fleet.origin  # type: ignore[attr-defined]
    size = sum(checkpoint.files().values())
    with FaultProxy(seaweed.endpoint_url) as tier:
        tier.add_rule(Fault.latency(1.5), method="PUT")
        a = fleet(s3_checkpoint, shared_endpoint=tier.endpoint_url)
        load_tree(a.path, checkpoint.root)
        a.umount()  # write-backs still queued are handed on before the daemon exits
    log = (a.cache_dir / "modelfs.log").read_text()
    assert "write-backs to the shared tier handed on" in log and "dropped (shared.flush_on_exit)" not in log, log
    origin.clear_log()

    b = fleet(s3_checkpoint)
    load_tree(b.path, checkpoint.root)
    fetched = origin.ranged_bytes()
    assert fetched <= 0.02 * size, (fetched, size, b.stats())
