"""A daemon that cannot wedge, with page-cache push on: internal errors fail one read or one job, never the
mount; SIGTERM in the middle of a load ends the daemon on time; damaged extents of a cache file under
concurrent readers.

Every test is bounded: readers must return within 20 s, the daemon must exit within 15 s of SIGTERM, and
no thread of the daemon or of a reader may stay in D state (uninterruptible sleep) for more than 5 s,
sampled from /proc/PID/task/*/stat. The mounter fixture aborts the test's own FUSE connection through
fusectl at teardown if its daemon is stuck, so a failure here cannot wedge the suite or the machine.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelfs.service.mount import alive, is_mounted
from tests.conftest import Checkpoint, Mount, requires_fuse
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.seaweed import SeaweedServer

pytestmark = [requires_fuse, pytest.mark.mount]

MiB = 1 << 20
PUSH = ["-o", "prefetch.page_cache_push=true", "-o", "prefetch.push_min_available=0"]
D_STATE_LIMIT = 5.0


def shards(checkpoint: Checkpoint) -> list[str]:
    return sorted(f for f in checkpoint.files() if f.startswith(checkpoint.hf_dir) and f.endswith(".safetensors"))


def threads_in_d(pid: int) -> list[int]:
    """Thread ids of `pid` in uninterruptible sleep right now."""
    out = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, IndexError), open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "D":
                    out.append(int(tid))
    return out


@contextlib.contextmanager
def no_long_d_state(pids: Callable[[], list[int]]) -> Iterator[None]:
    """Sample every thread of `pids()` four times a second; fail if one stays in D state over 5 s."""
    since: dict[int, float] = {}
    worst: list[tuple[float, int]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.25):
            now = time.monotonic()
            seen = {tid for pid in pids() for tid in threads_in_d(pid)}
            for tid in list(since):
                if tid not in seen:
                    del since[tid]
            for tid in seen:
                since.setdefault(tid, now)
                if now - since[tid] > D_STATE_LIMIT:
                    worst.append((now - since[tid], tid))

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(5)
    assert not worst, f"threads in D state for more than {D_STATE_LIMIT:g} s: {sorted(worst)[-3:]}"


def read_all(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_direct(path: Path) -> bytes:
    """The whole file with O_DIRECT (every READ reaches the daemon; page-aligned buffer)."""
    size = path.stat().st_size
    buf = mmap.mmap(-1, max(4096, (size + 4095) // 4096 * 4096))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], 0)
        return bytes(buf[:n])
    finally:
        os.close(fd)
        buf.close()


def bounded(fn: Callable[[], object], seconds: float = 20.0) -> object:
    """Run `fn` in a thread; fail (not hang) if it does not return within `seconds`."""
    box: list[object] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as e:  # handed to the test below
            box.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"a reader did not return within {seconds:g} s"
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def run_together(*fns: Callable[[], object], seconds: float = 20.0) -> list[object]:
    """Run each of `fns` in its own thread, all at once; their results in order (each bounded)."""
    results: list[object] = [None] * len(fns)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as e:  # handed to the test below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds)
    assert not any(t.is_alive() for t in threads), f"a reader did not return within {seconds:g} s"
    if errors:
        raise errors[0]
    return results


def test_internal_errors_fail_one_read_or_one_job_and_the_mount_keeps_serving(
        seaweed: SeaweedServer, s3_checkpoint: str, checkpoint: Checkpoint, mounter: Callable[..., Mount]) -> None:
    """With push on and a READ held (its GET stalled by the proxy), an exception is raised inside a flight
    and inside a prefetch worker (MODELFS_TEST_FAULTS): the read served by that flight gets EIO and the
    next one succeeds, the prefetch job stops while its file still loads, the held READ completes once
    released, each error is logged with its traceback and counted, and nothing waits in D state."""
    first, second = shards(checkpoint)[:2]
    index = f"{checkpoint.hf_dir}/model.safetensors.index.json"  # no whole-file prefetch: demand GETs only
    with FaultProxy(seaweed.endpoint_url) as proxy:
        env = {**seaweed.env(), "AWS_ENDPOINT_URL": proxy.endpoint_url,
               "MODELFS_TEST_FAULTS": f"flight:{index},prefetch:{first}"}
        # Long timeouts, so the held GET stays held (botocore would retry it after s3.read_timeout).
        m = mounter(s3_checkpoint, env=env, args=[*PUSH, "--extent-size", "1MiB",
                                                  "-o", "prefetch.checkpoint_sets=false",
                                                  "-o", "s3.read_timeout=90", "-o", "fetch.deadline=120"])
        hold = proxy.add_rule(Fault.stall(120, then="continue"), method="GET", path_contains=second, times=1)
        with no_long_d_state(lambda: [m.pid]):
            held: list[bytes] = []
            reader = threading.Thread(target=lambda: held.append(read_all(m.path / second)), daemon=True)
            reader.start()
            assert proxy.wait_stalled(1, timeout=20), "the held READ's GET never reached the proxy"

            assert bounded(lambda: read_all(m.path / first)) == (checkpoint.root / first).read_bytes()
            # O_DIRECT: one READ per call, so its EIO reaches us (a buffered read would be retried by the
            # kernel's own fallback from readahead to a single-page READ, which then succeeds).
            with pytest.raises(OSError) as failed:
                bounded(lambda: read_direct(m.path / index))
            assert failed.value.errno == errno.EIO
            assert bounded(lambda: read_direct(m.path / index)) == (checkpoint.root / index).read_bytes()
            assert alive(m.pid) and is_mounted(str(m.path))
            assert reader.is_alive() and hold.fired == 1  # still held, the whole time

            proxy.release()
            reader.join(20)
            assert not reader.is_alive(), "the held READ never completed after its GET was released"
            assert held == [(checkpoint.root / second).read_bytes()]
        st = m.stats()
        assert st["internal_errors"] == 2, st
        assert st["pushed_bytes"] > 0, "page-cache push was not exercised"
    log = (m.cache_dir / "modelfs.log").read_text()
    assert log.count("internal error in") == 2 and log.count("InjectedFault") >= 2  # with the traceback
    m.umount()


def test_sigterm_in_the_middle_of_a_load_with_pushes_in_flight(
        seaweed: SeaweedServer, s3_checkpoint: str, checkpoint: Checkpoint, mounter: Callable[..., Mount]) -> None:
    """SIGTERM while a load runs and pushes go into the page cache: the daemon exits within 15 s, the mount
    is gone, the loader gets its bytes or an error within 20 s, and nothing waits in D state."""
    with FaultProxy(seaweed.endpoint_url) as proxy:
        proxy.add_rule(Fault.latency(0.15), method="GET", times=10_000)  # a load long enough to interrupt
        env = {**seaweed.env(), "AWS_ENDPOINT_URL": proxy.endpoint_url}
        m = mounter(s3_checkpoint, env=env, args=[*PUSH, "--extent-size", "1MiB"])
        files = [str(m.path / s) for s in shards(checkpoint)]
        # The loader pauses after its first MiB, so the prefetched rest of that file is pushed before its READs
        # could answer it (a reader keeping up with the fetch leaves nothing to push).
        loader = subprocess.Popen([sys.executable, "-c", "import sys, time\nfor i, p in enumerate(sys.argv[1:]):\n"
                                   " f = open(p, 'rb')\n if i == 0:\n  f.read(1 << 20)\n  time.sleep(5)\n f.read()",
                                   *files], stderr=subprocess.PIPE, start_new_session=True)
        try:
            with no_long_d_state(lambda: [p for p in (m.pid, loader.pid) if alive(p)]):
                deadline = time.monotonic() + 30
                while m.stats()["pushed_bytes"] == 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert m.stats()["pushed_bytes"] > 0, "no push happened before the signal"
                os.kill(m.pid, signal.SIGTERM)
                t0 = time.monotonic()
                while alive(m.pid) and time.monotonic() - t0 < 15:
                    time.sleep(0.05)
                assert not alive(m.pid), "the daemon did not exit within 15 s of SIGTERM"
                assert not is_mounted(str(m.path))
                loader.wait(timeout=20)  # bytes or an error, but it returns
        finally:
            if loader.poll() is None:
                os.killpg(loader.pid, signal.SIGKILL)
                loader.wait()
    log = (m.cache_dir / "modelfs.log").read_text()
    assert "SIGTERM: unmounting" in log and f"unmounted {m.path}" in log
    assert "internal error" not in log and "Traceback" not in log


def test_damaged_extents_under_two_concurrent_readers(checkpoint: Checkpoint,
                                                      mounter: Callable[..., Mount]) -> None:
    """20 times: flip a byte in each of two extents of the shard's cache file, remount, and read the shard
    with one sequential reader and one doing random preads at once, push on: every byte right, both extents
    caught (the new daemon hashes each extent when it first reads it back), each refetched once and written
    back in place."""
    shard = shards(checkpoint)[0]
    ref = (checkpoint.root / shard).read_bytes()
    # No checkpoint-set prefetch: the cache holds this shard's cache file only, so every flip hits it.
    # The READ path: with passthrough, the kernel would serve the complete cache file itself (after a check
    # of the whole file at open: test_passthrough.py).
    m = mounter(str(checkpoint.root), args=[*PUSH, "--extent-size", "1MiB", "-o", "prefetch.checkpoint_sets=false",
                                            "-o", "mount.passthrough=off"])
    assert read_all(m.path / shard) == ref
    rng = random.Random(11)
    for i in range(20):
        m.umount()
        files = sorted((m.cache_dir / "files").iterdir())
        assert len(files) == 1 and files[0].read_bytes() == ref, (i, files)  # whole again after each round
        fd = os.open(files[0], os.O_RDWR)
        try:
            victims = rng.sample(range(-(-len(ref) // MiB)), 2)
            for extent in victims:
                at = extent * MiB + rng.randrange(min(MiB, len(ref) - extent * MiB))
                os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0x10]), at)
        finally:
            os.close(fd)
        m = m.remount()
        path = m.path / shard

        def sequential(path: Path = path) -> bool:
            return read_all(path) == ref

        def scattered(path: Path = path) -> bool:
            fd = os.open(path, os.O_RDONLY)
            try:
                for _ in range(60):
                    off = rng.randrange(len(ref))
                    if os.pread(fd, 300_000, off) != ref[off:off + 300_000]:
                        return False
                return True
            finally:
                os.close(fd)

        with no_long_d_state(lambda pid=m.pid: [pid]):
            results = run_together(sequential, scattered)
            assert results == [True, True], (i, results)
        st = m.stats()
        # Read again through the daemon (O_DIRECT: every READ reaches it, and it answers from the cache file):
        # what it holds as checked is the source's bytes, the extents it wrote again included.
        assert bounded(lambda path=path: read_direct(path)) == ref, i
        # Each damaged extent fetched again once: in a GET of its own, or, two adjacent ones both found missing
        # before either is fetched, in one GET (adjacent missing extents are fetched together).
        gets = {1, 2} if abs(victims[0] - victims[1]) == 1 else {2}
        assert st["corrupt_extents"] == 2 and st["gets"] in gets and st["bytes_fetched"] == 2 * MiB, (i, victims, st)
