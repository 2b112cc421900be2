"""Hedged ranged GETs against a real SeaweedFS through the fault-injecting proxy, in this process (so the
S3 client's threads can be counted with threading.enumerate()).

Why: a hedge's loser used to keep its thread (and socket) until botocore's read timeout, so a burst of
stalled GETs left as many threads behind as it had GETs (a 60-minute soak grew 1.11x in threads). Here
the read timeout is 300 s: a loser left to it outlives every bound below, which only detect a hang;
no assertion is about time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator

import pytest

from modelfs.config import S3Config
from modelfs.errors import StoreUnreachable
from modelfs.remote.base import ObjectInfo
from modelfs.remote.s3 import S3Store
from tests.conftest import eventually
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.seaweed import SeaweedServer

pytestmark = [pytest.mark.s3]

BUCKET = "hedging"
GETS = 8  # ranged GETs at once, each of its own object
SIZE = 256 << 10
HANG = 60.0  # seconds: a GET left to its stalled request waits out the 300 s read timeout


@pytest.fixture(scope="module")
def objects(seaweed: SeaweedServer) -> dict[str, bytes]:
    seaweed.create_bucket(BUCKET)
    client = seaweed.client()
    data = {f"obj-{i:03d}.bin": os.urandom(SIZE) for i in range(GETS)}
    for key, body in data.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=body)
    return data


@pytest.fixture
def make_store(seaweed: SeaweedServer, proxy: FaultProxy,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], S3Store]]:
    for name, value in seaweed.env().items():
        if name != "AWS_ENDPOINT_URL":
            monkeypatch.setenv(name, value)
    stores: list[S3Store] = []

    def make(max_request_threads: int) -> S3Store:
        cfg = S3Config(endpoint_url=proxy.endpoint_url, addressing_style="path", read_timeout=300.0,
                       hedge_after=0.5, max_request_threads=max_request_threads)
        stores.append(S3Store(BUCKET, "", cfg))
        return stores[-1]

    yield make
    proxy.release()  # the stalled requests end; the threads the test left (if it failed) end with them
    for store in stores:
        store.close()


def request_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "s3-request")


class Peak:
    """The most S3 request threads seen at once, sampled in a thread of its own while the GETs run."""

    def __init__(self) -> None:
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-sampler", daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, request_threads())
            self._stop.wait(0.002)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def get_all(store: S3Store, objects: dict[str, bytes]) -> dict[str, bytes | BaseException]:
    """One ranged GET of every object, all at once, each from a thread of its own (like the fetcher's)."""
    infos = {key: store.head(key) for key in objects}
    start, length = 1000, SIZE // 2
    got: dict[str, bytes | BaseException] = {}

    def get(info: ObjectInfo) -> None:
        buf = bytearray(length)
        try:
            store.read_into(info, start, [memoryview(buf)])
            got[info.key] = bytes(buf)
        except BaseException as e:  # reported by the test, not lost in a thread
            got[info.key] = e

    threads = [threading.Thread(target=get, args=(info,), name=f"get-{key}") for key, info in infos.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG)
        if t.is_alive():
            pytest.fail(f"{t.name} waited on its stalled request: not hedged")
    for key, body in objects.items():
        value = got[key]
        assert not isinstance(value, BaseException), f"{key}: {value!r}"
        assert value == body[start:start + length], key
    return got


def test_hedged_losers_are_cut_and_request_threads_stay_bounded(make_store: Callable[[int], S3Store],
                                                                 proxy: FaultProxy,
                                                                 objects: dict[str, bytes]) -> None:
    """Every GET's first request is held silently (600 s): each is hedged and answered by its hedge; once
    all have returned, the losers' threads end (their connections are shut), not at the read timeout."""
    bound = 2 * GETS  # room for every GET and its hedge
    store = make_store(bound)
    rules = [proxy.add_rule(Fault.stall(600), method="GET", path_contains=f"/{key}", times=1) for key in objects]
    with Peak() as peak:
        get_all(store, objects)
        assert all(rule.fired == 1 for rule in rules)
        assert proxy.stalled == GETS  # ordering, not time: every GET was answered while its first was held
        assert store.hedged == GETS
        # The bound only detects a hang: left to botocore, a loser ends at its 300 s read timeout.
        assert eventually(lambda: request_threads() == 0, limit=30.0), f"{request_threads()} request threads left"
    assert peak.most <= bound, f"{peak.most} request threads at once, s3.max_request_threads={bound}"
    assert peak.most >= GETS  # the sampler saw the GETs in flight: it measured something
    # The abandoned requests were not retried by botocore: one request each, and one hedge.
    assert proxy.requests_matching(method="GET") == 2 * GETS


def test_request_threads_never_exceed_the_setting(make_store: Callable[[int], S3Store], proxy: FaultProxy,
                                                  objects: dict[str, bytes]) -> None:
    """Fewer request threads allowed than a burst of hedged GETs would use: the S3 client never has more;
    a GET that finds none free is sent unhedged (here it waits out a short stall) instead of waiting."""
    bound = GETS - 2
    store = make_store(bound)
    for key in objects:
        proxy.add_rule(Fault.stall(2, then="continue"), method="GET", path_contains=f"/{key}", times=1)
    with Peak() as peak:
        get_all(store, objects)
        assert eventually(lambda: request_threads() == 0, limit=30.0), f"{request_threads()} request threads left"
    assert peak.most <= bound, f"{peak.most} request threads at once, s3.max_request_threads={bound}"
    assert 1 <= store.hedged < GETS


def test_a_silent_store_leaves_no_request_threads(make_store: Callable[[int], S3Store], proxy: FaultProxy,
                                                  objects: dict[str, bytes]) -> None:
    """The store stops answering: a GET, its hedge and the bucket check are all silent, the GET fails as
    unreachable, and none of the three requests is left waiting for its read timeout."""
    store = make_store(3)
    key = next(iter(objects))
    info = store.head(key)
    proxy.blackhole(True)
    try:
        with Peak() as peak:
            with pytest.raises(StoreUnreachable):
                store.read_into(info, 0, [memoryview(bytearray(4096))])
            assert eventually(lambda: request_threads() == 0, limit=30.0), f"{request_threads()} request threads left"
        assert peak.most == 3  # the GET, its hedge, the bucket check
        assert proxy.requests_matching(method="GET") == 2 and proxy.requests_matching(method="HEAD") == 2
    finally:
        proxy.blackhole(False)
