"""One client connection through the proxy and its upstream connection: a loop of request/response
exchanges, with the fault a rule picked applied to each."""

from __future__ import annotations

import contextlib
import http
import socket
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from tests.support.faultproxy.rules import Fault, FaultKind, RequestRecord
from tests.support.faultproxy.wire import (
    _CHUNK,
    _DRAIN_SECONDS,
    _EXPECT_WAIT,
    _UPSTREAM_CONNECT_TIMEOUT,
    _UPSTREAM_READ_TIMEOUT,
    _BadMessage,
    _Closed,
    _Head,
    _Reader,
    _rst,
    _xml_error,
)


class Proxy(Protocol):
    """What a connection needs of its proxy (`proxy.FaultProxy`): the upstream, the rule for a request, the
    request log, the link's pacing, and its waits (stalls, blackhole, latency) that a release or stop ends."""

    upstream: tuple[str, int]
    _blackhole: bool
    _rtt: float

    @property
    def _request_ids(self) -> Iterator[int]: ...

    def _pick_rule(self, method: str, target: str, ranged: bool) -> Fault | None: ...

    def _record(self, record: RequestRecord) -> None: ...

    def _hold(self, until: Callable[[], bool], seconds: float | None) -> bool: ...

    def _stall(self, seconds: float) -> bool: ...

    def _sleep(self, seconds: float) -> bool: ...

    def _pace(self, nbytes: int) -> None: ...

    def _track(self, sock: socket.socket) -> bool: ...

    def _untrack(self, sock: socket.socket) -> None: ...


class _Connection:
    """One client connection and its upstream connection: a loop of request/response exchanges."""

    def __init__(self, proxy: Proxy, sock: socket.socket) -> None:
        self.proxy = proxy
        self.client = sock
        self.creader = _Reader(sock)
        self.upstream: socket.socket | None = None
        self.ureader: _Reader | None = None
        self.client_open = True
        # Mid-body fault of the exchange in progress: (fault, byte offset into the body).
        self.cut: tuple[Fault, int] | None = None
        self.body_sent = 0

    # -- socket handling -----------------------------------------------------------------------------

    def close(self) -> None:
        if self.client_open:
            self.client_open = False
            self.proxy._untrack(self.client)
            with contextlib.suppress(OSError):
                self.client.close()
        self._drop_upstream()

    def _drop_upstream(self) -> None:
        if self.upstream is not None:
            self.proxy._untrack(self.upstream)
            with contextlib.suppress(OSError):
                self.upstream.close()
            self.upstream = None
            self.ureader = None

    def _reset_client(self) -> None:
        self.client_open = False
        self.proxy._untrack(self.client)
        _rst(self.client)
        raise _Closed()

    def _close_client(self) -> None:
        """FIN the client, then read briefly what it still sends so the kernel does not answer it with an RST."""
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_WR)
            self.client.settimeout(_DRAIN_SECONDS)
            deadline = time.monotonic() + _DRAIN_SECONDS
            while time.monotonic() < deadline and self.client.recv(_CHUNK):
                pass
        raise _Closed()

    def _connect_upstream(self) -> _Reader:
        """The upstream connection, (re)opened if missing or closed by upstream while idle."""
        if self.upstream is not None and self.ureader is not None:
            if not self.ureader.buf and not self.ureader.readable(0):
                return self.ureader
            self._drop_upstream()  # idle keep-alive connection closed (or junk) upstream
        sock = socket.create_connection(self.proxy.upstream, timeout=_UPSTREAM_CONNECT_TIMEOUT)
        sock.settimeout(_UPSTREAM_READ_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.proxy._track(sock):
            sock.close()
            raise _Closed()
        self.upstream = sock
        self.ureader = _Reader(sock)
        return self.ureader

    # -- the exchange loop ---------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            raw = self.creader.read_head()
            if raw is None:
                return
            request = _Head.parse(raw)
            if len(request.start) != 3:
                raise _BadMessage("bad request line")
            method, target, version = request.start
            byte_range = request.headers.get("range")
            if self.proxy._blackhole:
                self.proxy._record(RequestRecord(method, target, byte_range, None, blackholed=True))
                self.proxy._hold(lambda: not self.proxy._blackhole, None)
                return  # released (or stopping): close without a word
            if self.proxy._rtt and not self.proxy._sleep(self.proxy._rtt):
                return  # stopping
            fault = self.proxy._pick_rule(method, target, byte_range is not None)
            self.proxy._record(RequestRecord(method, target, byte_range, fault.kind if fault else None))
            keep_alive = self._exchange(request, method, target, version, fault)
            if not keep_alive:
                self._close_client()

    def _exchange(self, request: _Head, method: str, target: str, version: str, fault: Fault | None) -> bool:
        """Handle one request; True if the client connection may carry another one."""
        conn_tokens = request.tokens("connection")
        keep_alive = "close" not in conn_tokens and (version != "HTTP/1.0" or "keep-alive" in conn_tokens)
        self.cut = None
        self.body_sent = 0
        if fault is not None:
            kind = fault.kind
            before_response = fault.after_bytes is None and kind is not FaultKind.TRUNCATE
            if kind is FaultKind.LATENCY and not self.proxy._sleep(fault.seconds):
                raise _Closed()
            elif kind is FaultKind.STATUS:
                self._answer_error(request, method, target, fault, keep_alive)
                return keep_alive
            elif kind is FaultKind.RESET and before_response:
                self._reset_client()
            elif kind is FaultKind.STALL and before_response:
                if not self.proxy._stall(fault.seconds) or fault.then == "close":
                    self._close_client()
            elif kind is not FaultKind.LATENCY:  # reset/stall after N body bytes, truncate
                self.cut = (fault, fault.after_bytes or 0)
        return self._forward(request, method) and keep_alive

    def _answer_error(self, request: _Head, method: str, target: str, fault: Fault, keep_alive: bool) -> None:
        """Send an S3 XML error instead of forwarding; consume the request body first to keep the connection."""
        if self._has_body(request):
            if "100-continue" in request.tokens("expect"):
                self.client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._copy_body(request, self.creader, None)
        request_id = f"faultproxy-{next(self.proxy._request_ids)}"
        body = _xml_error(fault.status, fault.code, fault.message, target.split("?", 1)[0], request_id)
        try:
            reason = http.HTTPStatus(fault.status).phrase
        except ValueError:
            reason = "Injected"
        head = (
            f"HTTP/1.1 {fault.status} {reason}\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"x-amz-request-id: {request_id}\r\n"
            "Server: faultproxy\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        ).encode()
        self.client.sendall(head if method == "HEAD" else head + body)

    @staticmethod
    def _has_body(request: _Head) -> bool:
        return request.chunked or (request.content_length or 0) > 0

    def _forward(self, request: _Head, method: str) -> bool:
        """Send the request upstream verbatim and relay the response; True if the client connection is reusable."""
        sent_body = False
        for attempt in range(2):
            reused = self.upstream is not None
            try:
                ureader = self._connect_upstream()
                assert self.upstream is not None
                self.upstream.sendall(request.raw)
                response: _Head | None = None
                if self._has_body(request):
                    if "100-continue" in request.tokens("expect") and ureader.readable(_EXPECT_WAIT):
                        response = self._read_response_head(ureader, until_continue=True)
                    if response is None:
                        sent_body = True
                        self._copy_body(request, self.creader, self.upstream)
                if response is None:
                    response = self._read_response_head(ureader)
                    assert response is not None
                    body_fate_known = True
                else:
                    body_fate_known = False  # final answer before the body: the client may or may not send it
                break
            except (OSError, _BadMessage):
                self._drop_upstream()
                # A kept-alive upstream connection may close just as we reuse it: retry once if nothing is lost.
                if attempt == 0 and reused and not sent_body:
                    continue
                self._bad_gateway()
                return False
        assert response is not None
        self._relay_head(response)
        self._relay_body(response, method, ureader)
        status = int(response.start[1])
        framed = response.chunked or response.content_length is not None or method == "HEAD" or status in (204, 304)
        if not framed or not body_fate_known or "close" in response.tokens("connection"):
            self._drop_upstream()
            return False
        return True

    def _bad_gateway(self) -> None:
        """Upstream failed before any response byte went out: say so (502) and close."""
        body = b"faultproxy: upstream failed\n"
        with contextlib.suppress(OSError):
            self.client.sendall(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )

    def _read_response_head(self, ureader: _Reader, *, until_continue: bool = False) -> _Head | None:
        """Read upstream's next final response head, relaying interim 1xx responses to the client.

        With ``until_continue``, return None right after relaying a "100 Continue" (the caller then sends the
        request body); otherwise a final head or _BadMessage.
        """
        while True:
            raw = ureader.read_head()
            if raw is None:
                raise _BadMessage("upstream closed without a response")
            head = _Head.parse(raw)
            if not head.start[1].isdigit():
                raise _BadMessage("bad status line")
            status = int(head.start[1])
            if 100 <= status < 200 and status != 101:
                self.client.sendall(raw)
                if status == 100 and until_continue:
                    return None
                continue
            return head

    def _copy_body(self, head: _Head, reader: _Reader, dest: socket.socket | None) -> None:
        """Copy a request body (Content-Length or chunked) from ``reader`` to ``dest`` (None: discard)."""

        def out(data: bytes) -> None:
            if dest is not None:
                dest.sendall(data)

        if head.chunked:
            self._copy_chunked(reader, out)
            return
        _Connection._copy_exact(reader, head.content_length or 0, out, "a request body")

    @staticmethod
    def _copy_exact(reader: _Reader, n: int, out: Callable[[bytes], None], what: str) -> None:
        """Copy exactly `n` bytes from `reader` to `out`, in pieces; _BadMessage on EOF inside `what`."""
        while n > 0:
            piece = reader.read_some(min(n, _CHUNK))
            if not piece:
                raise _BadMessage(f"EOF inside {what}")
            out(piece)
            n -= len(piece)

    @staticmethod
    def _copy_chunked(reader: _Reader, out: Callable[[bytes], None]) -> None:
        """Copy a chunked body frame by frame, raw, through its trailers."""
        while True:
            line = reader.readline()
            out(line)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadMessage("bad chunk size") from None
            if size == 0:
                while True:
                    trailer = reader.readline()
                    out(trailer)
                    if trailer in (b"\r\n", b"\n"):
                        return
            _Connection._copy_exact(reader, size + 2, out, "a chunk")  # data and its CRLF

    # -- response relay with mid-body faults ---------------------------------------------------------

    def _relay_head(self, response: _Head) -> None:
        if self.cut is not None:
            fault, offset = self.cut
            if fault.kind is FaultKind.TRUNCATE:
                length = response.content_length
                if fault.fraction is not None and fault.after_bytes is None:
                    offset = int((length or 0) * fault.fraction)
                if length is not None and length > 0:
                    offset = min(offset, length - 1)
                self.cut = (fault, offset)
        self.client.sendall(response.raw)

    def _relay_body(self, response: _Head, method: str, ureader: _Reader) -> None:
        """Relay the body per its framing (Content-Length, chunked, or until upstream closes)."""
        status = int(response.start[1])
        if method == "HEAD" or status in (204, 304):
            self._apply_cut_at_end()
            return
        if response.chunked:
            self._copy_chunked(ureader, self._send_body)
        else:
            length = response.content_length
            remaining = length if length is not None else -1
            while remaining != 0:
                piece = ureader.read_some(_CHUNK if remaining < 0 else min(remaining, _CHUNK))
                if not piece:
                    if remaining > 0:
                        raise _Closed()  # upstream cut the body short: pass that on by closing
                    break
                self._send_body(piece)
                if remaining > 0:
                    remaining -= len(piece)
        self._apply_cut_at_end()

    def _send_body(self, data: bytes) -> None:
        """Send body bytes to the client, applying the pending mid-body fault where its offset falls."""
        if self.cut is not None:
            fault, offset = self.cut
            if self.body_sent + len(data) >= offset:
                head_part = data[: max(0, offset - self.body_sent)]
                if head_part:
                    self.client.sendall(head_part)
                    self.body_sent += len(head_part)
                self.cut = None
                self._apply(fault)  # returns only for a stall that continues
                data = data[len(head_part):]
        if data:
            self.proxy._pace(len(data))
            self.client.sendall(data)
            self.body_sent += len(data)

    def _apply_cut_at_end(self) -> None:
        if self.cut is not None:
            fault, _ = self.cut
            self.cut = None
            self._apply(fault)

    def _apply(self, fault: Fault) -> None:
        """Carry out a mid-body fault; raises _Closed unless it is a stall that continues afterwards."""
        if fault.kind is FaultKind.RESET:
            self._drop_upstream()
            self._reset_client()
        if fault.kind is FaultKind.TRUNCATE:
            self._drop_upstream()
            self._close_client()
        if fault.kind is FaultKind.STALL:
            if not self.proxy._stall(fault.seconds):
                raise _Closed()
            if fault.then == "close":
                self._drop_upstream()
                self._close_client()
