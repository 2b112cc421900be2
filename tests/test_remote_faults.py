"""Remote faults through real mounts: a fault-injecting proxy between the daemon and SeaweedFS.

Each test gets its own proxy (`tests.support.faultproxy`) and programs the faults it needs: S3 error
statuses, resets, truncated bodies, stalls, a silent (blackholed) store. Deadlines and timeouts are set
low so the suite stays fast; no assertion is about time.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import BUCKET, Checkpoint, Mount, cli, eventually, requires_fuse
from tests.conftest import sha256_file as sha
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.seaweed import SeaweedServer

pytestmark = [requires_fuse, pytest.mark.mount, pytest.mark.s3]

MiB = 1 << 20
#: Fast failure settings: a silent socket is given up after 2 s, a read after 8 s.
FAST = ["-o", "s3.read_timeout=2", "-o", "s3.connect_timeout=2", "-o", "s3.max_attempts=4",
        "-o", "fetch.deadline=8", "-o", "fetch.probe_interval=1", "-o", "fetch.offline_after=2"]
NO_PREFETCH = ["-o", "prefetch.whole_file=false", "-o", "prefetch.checkpoint_sets=false",
               "-o", "prefetch.sequential=false"]


READ_ONE = """
import hashlib, sys
try:
    with open(sys.argv[1], "rb") as f:
        print(hashlib.sha256(f.read()).hexdigest())
except OSError as e:
    print("errno", e.errno)
"""


def read_in_child(path: Path, timeout: float = 120) -> str:
    """Read a whole file in a child process (a hung read can then never hang the test run)."""
    r = subprocess.run([sys.executable, "-c", READ_ONE, str(path)], capture_output=True, text=True, timeout=timeout)
    return r.stdout.strip()


@pytest.fixture
def proxy(seaweed: SeaweedServer, s3_checkpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(seaweed.endpoint_url) as p:
        yield p


@pytest.fixture
def env(seaweed: SeaweedServer, proxy: FaultProxy) -> dict[str, str]:
    return {**seaweed.env(), "AWS_ENDPOINT_URL": proxy.endpoint_url}


TRANSIENT = {
    "503 SlowDown": (Fault.slow_down(), 3),
    "500 InternalError": (Fault.internal_error(), 3),
    "reset before response": (Fault.reset(), 2),
    "reset mid-body": (Fault.reset(after_bytes=MiB), 2),
    "truncated body": (Fault.truncate(fraction=0.5), 2),
    "silent socket": (Fault.stall(30), 1),
    "stall mid-body": (Fault.stall(30, after_bytes=MiB), 1),
    "latency": (Fault.latency(0.5), 4),
}


@pytest.mark.parametrize("case", list(TRANSIENT))
def test_transient_faults_are_retried_and_bytes_are_correct(case: str, proxy: FaultProxy, env: dict[str, str],
                                                            s3_checkpoint: str, checkpoint: Checkpoint,
                                                            mounter: Callable[..., Mount]) -> None:
    fault, times = TRANSIENT[case]
    rule = proxy.add_rule(fault, method="GET", ranged=True, times=times)
    m = mounter(s3_checkpoint, env=env, args=[*FAST, *NO_PREFETCH])
    assert read_in_child(m.path / checkpoint.torch_file) == sha(checkpoint.root / checkpoint.torch_file)
    assert rule.fired == times
    stats = m.stats()
    assert stats["store_errors"] == 0 and stats["read_timeouts"] == 0, stats


def test_unsatisfiable_read_gets_eio_others_carry_on_then_recovers(proxy: FaultProxy, env: dict[str, str],
                                                                   s3_checkpoint: str, checkpoint: Checkpoint,
                                                                   mounter: Callable[..., Mount]) -> None:
    m = mounter(s3_checkpoint, env=env, args=[*FAST, *NO_PREFETCH, "-o", "fetch.deadline=4"])
    stuck = checkpoint.torch_file
    other = sorted(f for f in checkpoint.files() if f.endswith(".safetensors"))[0]
    proxy.add_rule(Fault.stall(600), method="GET", path_contains=stuck.split("/")[-1])
    child = subprocess.Popen([sys.executable, "-c", READ_ONE, str(m.path / stuck)], stdout=subprocess.PIPE,
                             text=True)
    assert proxy.wait_stalled(1, timeout=60)
    # While that reader waits, the daemon serves others.
    assert read_in_child(m.path / other) == sha(checkpoint.root / other)
    out, _ = child.communicate(timeout=120)
    assert out.strip() == f"errno {errno.EIO}"
    assert m.stats()["read_timeouts"] >= 1
    proxy.clear()
    proxy.release()
    assert read_in_child(m.path / stuck) == sha(checkpoint.root / stuck)


def test_reader_killed_while_blocked_on_a_stalled_fetch(proxy: FaultProxy, env: dict[str, str], s3_checkpoint: str,
                                                        checkpoint: Checkpoint,
                                                        mounter: Callable[..., Mount]) -> None:
    # One stalled attempt held throughout (read timeout past the hang bound below, the stall past both), so
    # "the stuck GET has not completed" is a state the test can check, not a race with botocore's retries.
    hang_bound = 60.0
    m = mounter(s3_checkpoint, env=env, args=[*NO_PREFETCH, "-o", "fetch.deadline=600", "-o", "s3.read_timeout=300",
                                              "-o", "s3.hedge_after=0"])
    stuck = checkpoint.torch_file
    rule = proxy.add_rule(Fault.stall(600), method="GET", path_contains=stuck.split("/")[-1])
    child = subprocess.Popen([sys.executable, "-c", READ_ONE, str(m.path / stuck)], stdout=subprocess.PIPE)
    assert proxy.wait_stalled(1, timeout=60)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL  # killable while blocked in a READ: not in D state
    before = m.stats()
    # The daemon answers, and the GET the dead reader waited for is still in flight: flights belong to the
    # daemon, not to the reader that started them.
    assert before["fetches_in_flight"] >= 1 and before["gets"] == 0, before
    other = sorted(f for f in checkpoint.files() if f.endswith(".safetensors"))[0]
    try:
        # The bound only detects a hang: a daemon that runs one GET at a time never serves this file while
        # the stall holds its only thread.
        digest = read_in_child(m.path / other, timeout=hang_bound)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{other} was not served while the GET of {stuck} stalled")
    assert digest == sha(checkpoint.root / other)
    # Ordering, not time: all of the other file was served WHILE the stuck GET was still held, unanswered.
    assert proxy.stalled == 1 and rule.fired == 1
    assert proxy.requests_matching(method="GET", path_contains=stuck.split("/")[-1]) == 1  # no retry either
    during = m.stats()
    # Fetched: the other file, and not one byte of the stuck one.
    assert during["fetches_in_flight"] >= 1 and during["bytes_fetched"] == checkpoint.files()[other], during
    proxy.clear()
    proxy.release()
    assert read_in_child(m.path / stuck) == sha(checkpoint.root / stuck)
    assert int(os.getxattr(m.path, "user.modelfs.pid")) == m.pid  # the same daemon all along


#: A stuck request would hold a reader for the read timeout or the deadline; hedging must not wait for either.
SLOW_GIVE_UP = ["-o", "s3.read_timeout=300", "-o", "fetch.deadline=600", "-o", "s3.hedge_after=0.5",
                "-o", "fetch.probe_interval=1", "-o", "fetch.offline_after=3"]


def test_a_stalled_get_is_sent_again_and_the_reader_is_answered_by_the_second(
        proxy: FaultProxy, env: dict[str, str], s3_checkpoint: str, checkpoint: Checkpoint,
        mounter: Callable[..., Mount]) -> None:
    """The first GET of a file stalls past any bound here (read timeout 300 s): the request is sent again
    after s3.hedge_after, the reader gets every byte from the second, while the first is still held."""
    m = mounter(s3_checkpoint, env=env, args=[*NO_PREFETCH, *SLOW_GIVE_UP])
    stuck = checkpoint.torch_file
    proxy.add_rule(Fault.stall(600), method="GET", path_contains=stuck.split("/")[-1], times=1)
    try:  # the bound only detects a hang: without hedging the reader waits out the 300 s read timeout
        digest = read_in_child(m.path / stuck, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the reader waited on the stalled GET")
    assert digest == sha(checkpoint.root / stuck)
    assert proxy.stalled == 1  # ordering, not time: served while the first request was still unanswered
    st = m.stats()
    assert st["hedged_gets"] >= 1 and st["store_errors"] == 0 and st["read_timeouts"] == 0, st
    proxy.release()


def test_a_get_and_its_hedge_both_stalled_while_the_store_answers_are_sent_once_more(
        proxy: FaultProxy, env: dict[str, str], s3_checkpoint: str, checkpoint: Checkpoint,
        mounter: Callable[..., Mount]) -> None:
    """The first GET and its hedge both stall (two requests each held on its own, as a slow node behind
    the endpoint does), while the bucket check answers: not a cut, so no offline mode, and the reader is
    not left to the read timeout either: a third request answers it, while both stalled ones are held."""
    m = mounter(s3_checkpoint, env=env, args=[*NO_PREFETCH, *SLOW_GIVE_UP])
    stuck = checkpoint.torch_file
    proxy.add_rule(Fault.stall(600), method="GET", path_contains=stuck.split("/")[-1], times=2)
    try:  # the bound only detects a hang: without a third request the reader waits out the 300 s read timeout
        digest = read_in_child(m.path / stuck, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the reader waited on two stalled GETs")
    assert digest == sha(checkpoint.root / stuck)
    assert proxy.stalled == 2  # ordering, not time: served while both stalled requests were unanswered
    st = m.stats()
    assert st["hedged_gets"] >= 2 and st["store_errors"] == 0 and st["read_timeouts"] == 0, st
    assert json.loads(os.getxattr(m.path, "user.modelfs.health"))["offline"] is False
    proxy.release()


def test_a_network_cut_is_noticed_from_a_silent_get_and_its_hedge(
        proxy: FaultProxy, env: dict[str, str], s3_checkpoint: str, checkpoint: Checkpoint,
        mounter: Callable[..., Mount]) -> None:
    """A cut while the daemon runs (connections accepted, nothing answered) is not waited out: a GET and
    its hedge both silent, then a silent bucket check, make the store suspect; when it answers nothing
    (GETs sent again, bucket checks) for fetch.offline_after, the mount goes offline and the reader gets
    EIO; cached files keep loading, and the probe ends it once the store answers."""
    warm = checkpoint.torch_file
    cold = sorted(f for f in checkpoint.files() if f.endswith(".safetensors"))[0]
    m = mounter(s3_checkpoint, env=env, args=[*NO_PREFETCH, *SLOW_GIVE_UP])
    assert sha(m.path / warm) == sha(checkpoint.root / warm)
    (m.path / cold).stat()
    proxy.blackhole(True)
    try:  # without the check the reader waits out fetch.deadline (600 s)
        assert read_in_child(m.path / cold, timeout=60) == f"errno {errno.EIO}"
    except subprocess.TimeoutExpired:
        pytest.fail("the reader waited out the cut")
    assert json.loads(os.getxattr(m.path, "user.modelfs.health"))["offline"] is True
    Path("/proc/sys/vm/drop_caches").write_text("1")
    assert read_in_child(m.path / warm) == sha(checkpoint.root / warm)
    proxy.blackhole(False)
    assert eventually(lambda: read_in_child(m.path / cold) == sha(checkpoint.root / cold))
    assert m.stats()["hedged_gets"] >= 1
    assert "does not answer (a GET and its hedge silent" in (m.cache_dir / "modelfs.log").read_text()


def test_silent_store_at_mount_fails_within_the_deadline(proxy: FaultProxy, env: dict[str, str], s3_checkpoint: str,
                                                         tmp_path: Path) -> None:
    proxy.blackhole(True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = cli("mount", s3_checkpoint, str(mnt), "--cache-dir", str(tmp_path / "cache"), *FAST, env=env, timeout=120)
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert ("did not answer within 8 s" in r.stderr or "cannot reach" in r.stderr) and proxy.endpoint_url in r.stderr
    assert "serve offline" in r.stderr, r.stderr
    assert not os.listdir(mnt)


def test_offline_mode_serves_the_cache_and_ends_when_the_store_answers(
        proxy: FaultProxy, env: dict[str, str], s3_checkpoint: str, checkpoint: Checkpoint,
        mounter: Callable[..., Mount]) -> None:
    warm = checkpoint.torch_file
    cold = sorted(f for f in checkpoint.files() if f.endswith(".safetensors"))[0]
    m = mounter(s3_checkpoint, env=env, args=[*FAST, *NO_PREFETCH, "-o", "mount.metadata_ttl=0"])
    assert sha(m.path / warm) == sha(checkpoint.root / warm)
    assert (m.path / cold).stat().st_size == checkpoint.files()[cold]  # listed, never read
    m.umount()
    proxy.blackhole(True)
    offline = m.remount()  # the store does not answer: mounts from the index and cache
    assert sorted(os.listdir(offline.path)) == sorted(os.listdir(checkpoint.root))
    assert read_in_child(offline.path / warm) == sha(checkpoint.root / warm)
    assert read_in_child(offline.path / cold) == f"errno {errno.EIO}"
    assert offline.stats()["offline_misses"] >= 1
    proxy.blackhole(False)
    assert eventually(lambda: read_in_child(offline.path / cold) == sha(checkpoint.root / cold))
    log = (m.cache_dir / "modelfs.log").read_text()
    assert "offline mode" in log and "offline mode ended" in log


def test_object_overwritten_while_open_never_mixes_versions(seaweed: SeaweedServer, tmp_path: Path,
                                                            mounter: Callable[..., Mount]) -> None:
    prefix = f"overwrite-{os.getpid()}-{time.monotonic_ns()}/"
    client = seaweed.client()
    v1, v2 = os.urandom(40 * MiB), os.urandom(40 * MiB)
    client.put_object(Bucket=BUCKET, Key=prefix + "blob.bin", Body=v1)
    m = mounter(f"s3://{BUCKET}/{prefix}", env=seaweed.env(), args=[*NO_PREFETCH, "-o", "mount.metadata_ttl=1"])
    with open(m.path / "blob.bin", "rb", buffering=0) as f:
        assert os.pread(f.fileno(), MiB, 0) == v1[:MiB]
        # Opened before the overwrite, so it holds the old version too (opened after, on a busy machine the
        # 1 s metadata TTL could pass first and the open would get the new version).
        direct = os.open(m.path / "blob.bin", os.O_RDONLY | os.O_DIRECT)
        client.put_object(Bucket=BUCKET, Key=prefix + "blob.bin", Body=v2)
        # Not cached: the old version is gone from the store. The daemon answers ESTALE; O_DIRECT shows the
        # answer as it is (a buffered read sees what the kernel makes of a failed page read).
        buf = mmap.mmap(-1, MiB)
        try:
            with pytest.raises(OSError) as e:
                os.preadv(direct, [buf], 24 * MiB)
            assert e.value.errno == errno.ESTALE
        finally:
            os.close(direct)
            buf.close()
        with pytest.raises(OSError) as e:
            os.pread(f.fileno(), MiB, 32 * MiB)
        assert e.value.errno == errno.ESTALE
        assert os.pread(f.fileno(), MiB, 0) == v1[:MiB]  # cached bytes of the old version: still old
    assert m.stats()["version_changes"] >= 1
    time.sleep(1.5)  # past the metadata TTL
    assert eventually(lambda: sha(m.path / "blob.bin") == hashlib.sha256(v2).hexdigest())
