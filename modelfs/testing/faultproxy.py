"""A fault-injecting HTTP/1.1 proxy for tests, placed between an S3 client (boto3, the daemon) and an S3 server.

Why: the retry, timeout and error paths of the daemon only run when S3 misbehaves, and SeaweedFS on loopback
never does. The proxy forwards every request byte for byte -- request line, all headers *including Host*, and
the body -- so SigV4 signatures made for the proxy's address still verify upstream. Tests then program faults:
S3 XML error statuses, TCP resets, truncated bodies, stalls, added latency, and a global blackhole.

Usage::

    with FaultProxy(seaweed.endpoint_url) as proxy:
        client = boto3.client("s3", endpoint_url=proxy.endpoint_url, ...)
        rule = proxy.add_rule(Fault.slow_down(), method="GET", path_contains="/bucket/key", times=1)
        ...
        assert rule.fired == 1

For the daemon, which is a subprocess, pass ``{**seaweed.env(), "AWS_ENDPOINT_URL": proxy.endpoint_url}``.

Rules are checked in the order they were added; the first rule that matches a request and has firings left
applies to it (one fault per request) and counts the firing in ``rule.fired``. A rule added with
``probability=p`` fires on that share of the requests it matches (a seeded draw: ``FaultProxy(url, seed=n)``
repeats a run); a request it spares goes on to the next rule, so a few such rules make a mix of faults.
Faults (see :class:`Fault`):

* ``Fault.status(code, s3_code)`` / ``Fault.slow_down()`` / ``Fault.internal_error()``: answer with an S3-style
  XML error without asking upstream; the client connection stays alive.
* ``Fault.reset(after_bytes=None)``: abort the client connection with a TCP RST, before any response byte
  (``after_bytes=None``) or after upstream's headers plus ``after_bytes`` body bytes.
* ``Fault.truncate(after_bytes=None, fraction=None)``: send upstream's headers (full Content-Length) and only
  part of the body, then close the connection (FIN).
* ``Fault.stall(seconds, after_bytes=None, then="close")``: hold the request silently -- before asking upstream
  (``after_bytes=None``) or after headers plus ``after_bytes`` body bytes -- until ``seconds`` pass or
  :meth:`FaultProxy.release` / :meth:`FaultProxy.stop` is called; then close the connection or carry on.
* ``Fault.latency(seconds)``: sleep, then forward normally.

:meth:`FaultProxy.link` models an origin far away: every request waits one round trip (`rtt`) before it is
forwarded, and the response bodies of all connections together are paced to `bandwidth` bytes per second
(one shared link: a virtual clock hands each chunk its slot).

:meth:`FaultProxy.refuse` models a server that is overloaded or restarting rather than gone: while on, the
listener is closed (a connect gets ECONNREFUSED) and the open connections are shut; off, it listens again on
the same port.

"Body bytes" are counted as sent on the wire after the response headers (chunk framing included for chunked
responses). A mid-body fault whose byte offset lies beyond the end of the body applies at the end of the body.

Each client connection gets its own upstream connection, opened lazily and reopened when upstream closed it.
Threads are named ``faultproxy-<port>-...`` so tests can check that :meth:`FaultProxy.stop` left none behind.
"""

from __future__ import annotations

import contextlib
import enum
import http
import itertools
import random
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

__all__ = ["Fault", "FaultKind", "FaultProxy", "RequestRecord", "Rule"]

_MAX_HEAD = 64 << 10  # request/response heads larger than this are refused
_CHUNK = 64 << 10  # bodies are relayed in pieces of at most this size
_UPSTREAM_CONNECT_TIMEOUT = 5.0
_UPSTREAM_READ_TIMEOUT = 120.0  # a hung upstream should not pin a handler thread forever
_EXPECT_WAIT = 1.0  # like botocore: how long to wait for upstream's "100 Continue" before sending the body
_DRAIN_SECONDS = 0.5  # after a graceful close, how long to read what the client still sends (avoids an RST)
_ACCEPT_POLL = 0.2


_RANGE = re.compile(r"bytes=(\d+)-(\d+)")

class FaultKind(enum.Enum):
    """What a rule does to a matching request."""

    STATUS = "status"
    RESET = "reset"
    TRUNCATE = "truncate"
    STALL = "stall"
    LATENCY = "latency"


@dataclass(frozen=True)
class Fault:
    """A fault and its parameters; build one with the class-method helpers rather than directly."""

    kind: FaultKind
    status: int = 503
    code: str = "SlowDown"
    message: str = ""
    after_bytes: int | None = None
    fraction: float | None = None
    seconds: float = 0.0
    then: Literal["close", "continue"] = "close"

    @classmethod
    def status_error(cls, status: int, code: str, message: str = "") -> Fault:
        """Answer ``status`` with ``<Error><Code>code</Code>...`` (the request never reaches upstream)."""
        return cls(FaultKind.STATUS, status=status, code=code, message=message or f"{code} (injected by faultproxy)")

    @classmethod
    def slow_down(cls) -> Fault:
        """S3's throttling answer: 503 SlowDown (boto3 retries it with throttling backoff)."""
        return cls.status_error(503, "SlowDown", "Please reduce your request rate.")

    @classmethod
    def internal_error(cls) -> Fault:
        """S3's transient failure: 500 InternalError."""
        return cls.status_error(500, "InternalError", "We encountered an internal error. Please try again.")

    @classmethod
    def reset(cls, after_bytes: int | None = None) -> Fault:
        """TCP RST the client: before any response (None) or after headers + ``after_bytes`` body bytes."""
        return cls(FaultKind.RESET, after_bytes=after_bytes)

    @classmethod
    def truncate(cls, after_bytes: int | None = None, fraction: float | None = None) -> Fault:
        """Send headers (full Content-Length) and a prefix of the body, then close.

        The prefix is ``after_bytes`` bytes, or ``fraction`` of Content-Length (default: half; nothing when
        upstream sends no Content-Length); when the length is known the prefix is kept at least one byte
        short so the body really is incomplete.
        """
        if after_bytes is None and fraction is None:
            fraction = 0.5
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ValueError("fraction must lie in [0, 1]")
        return cls(FaultKind.TRUNCATE, after_bytes=after_bytes, fraction=fraction)

    @classmethod
    def stall(
        cls, seconds: float = 60.0, *, after_bytes: int | None = None, then: Literal["close", "continue"] = "close"
    ) -> Fault:
        """Hold the request silently for ``seconds`` (or until release()/stop()), then close or continue."""
        if then not in ("close", "continue"):
            raise ValueError("then must be 'close' or 'continue'")
        return cls(FaultKind.STALL, seconds=seconds, after_bytes=after_bytes, then=then)

    @classmethod
    def latency(cls, seconds: float) -> Fault:
        """Sleep ``seconds`` before forwarding the request normally."""
        return cls(FaultKind.LATENCY, seconds=seconds)


@dataclass(eq=False)
class Rule:
    """A fault plus what it matches (None matches anything) and how often it may fire (None: forever)."""

    fault: Fault
    method: str | None = None
    path_contains: str | None = None
    ranged: bool | None = None
    times: int | None = None
    probability: float = 1.0  # share of matching requests it fires on (drawn from the proxy's seeded RNG)
    fired: int = 0  # updated by the proxy under its lock

    def matches(self, method: str, target: str, ranged: bool) -> bool:
        """True if this rule applies to a request (ignoring how many firings it has left)."""
        if self.method is not None and self.method.upper() != method.upper():
            return False
        if self.path_contains is not None and self.path_contains not in target:
            return False
        return self.ranged is None or self.ranged == ranged

    @property
    def exhausted(self) -> bool:
        """True once the rule has fired ``times`` times."""
        return self.times is not None and self.fired >= self.times


@dataclass(frozen=True)
class RequestRecord:
    """One request the proxy saw: method, request target (path + query), Range header, fault applied."""

    method: str
    path: str
    range: str | None
    fault: FaultKind | None
    blackholed: bool = False

    @property
    def ranged(self) -> bool:
        return self.range is not None


class _Closed(Exception):
    """The client connection is finished (closed, reset, or the proxy stops): leave the handler loop."""


class _BadMessage(Exception):
    """A malformed or oversized HTTP head, or EOF in the middle of a message."""


class _Reader:
    """Buffered reads from a socket without ``makefile`` (whose references would keep an RST'd socket open)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(_CHUNK)
        if not data:
            return False
        self.buf += data
        return True

    def readable(self, timeout: float) -> bool:
        """True if a read would not block (buffered data, incoming data or EOF) within ``timeout``."""
        if self.buf:
            return True
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return bool(ready)

    def read_head(self) -> bytes | None:
        """Read one message head through its blank line; None on a clean EOF before any byte."""
        while True:
            while self.buf.startswith(b"\r\n"):  # stray CRLFs between messages are allowed
                del self.buf[:2]
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[: end + 4])
                del self.buf[: end + 4]
                return head
            if len(self.buf) > _MAX_HEAD:
                raise _BadMessage("head too large")
            if not self._fill():
                if self.buf:
                    raise _BadMessage("EOF inside a message head")
                return None

    def readline(self) -> bytes:
        """One CRLF-terminated line, terminator included."""
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line = bytes(self.buf[: end + 1])
                del self.buf[: end + 1]
                return line
            if len(self.buf) > _MAX_HEAD:
                raise _BadMessage("line too long")
            if not self._fill():
                raise _BadMessage("EOF inside a line")

    def read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes (at least one), or b'' at EOF."""
        if not self.buf:
            return self.sock.recv(min(limit, _CHUNK))
        piece = bytes(self.buf[:limit])
        del self.buf[:limit]
        return piece


@dataclass
class _Head:
    """A parsed message head; ``raw`` is what travels on, unchanged."""

    raw: bytes
    start: list[str]  # request line (method, target, version) or status line (version, status, reason)
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names; repeated ones joined by ", "

    @classmethod
    def parse(cls, raw: bytes) -> _Head:
        lines = raw.decode("latin-1").split("\r\n")
        start = lines[0].split(" ", 2)
        if len(start) < 2:
            raise _BadMessage(f"bad start line {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadMessage("header line without a colon")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return cls(raw, start, headers)

    def tokens(self, name: str) -> set[str]:
        """Comma-separated, lower-cased tokens of a header (Connection, Transfer-Encoding)."""
        return {t.strip().lower() for t in self.headers.get(name, "").split(",") if t.strip()}

    @property
    def chunked(self) -> bool:
        return "chunked" in self.tokens("transfer-encoding")

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        if value is None:
            return None
        try:
            return int(value.split(",")[0])
        except ValueError:
            raise _BadMessage("bad Content-Length") from None


def _rst(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST instead of a FIN (SO_LINGER on, timeout 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _xml_error(status: int, code: str, message: str, resource: str, request_id: str) -> bytes:
    """An S3 ``<Error>`` document, as S3 and SeaweedFS send it."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource)}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()


class FaultProxy:
    """A threaded HTTP/1.1 forwarding proxy on 127.0.0.1 with programmable faults; see the module docstring."""

    def __init__(self, upstream_url: str, seed: int = 0) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream_url!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self._cond = threading.Condition()  # guards everything below; stalls and blackholes wait on it
        self._rules: list[Rule] = []
        self._random = random.Random(seed)  # probabilistic rules draw from it under _cond: runs repeat
        self._log: list[RequestRecord] = []
        self._blackhole = False
        self._refusing = False
        self._rtt = 0.0
        self._bandwidth = 0.0  # bytes per second, shared by all connections; 0: unlimited
        self._link_lock = threading.Lock()
        self._link_free_at = 0.0  # when the shared link has sent everything handed to it so far
        self._release_gen = 0
        self._stalled = 0
        self._stopped = False
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conn_ids = itertools.count(1)
        self._connections = 0
        self._request_ids = itertools.count(1)
        self.port = 0

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Bind a free loopback port and start accepting connections."""
        if self._accept_thread is not None:
            raise RuntimeError("FaultProxy already started")
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"faultproxy-{self.port}-accept",
                                               daemon=True)
        self._accept_thread.start()
        return self

    @staticmethod
    def _listen(port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        listener.settimeout(_ACCEPT_POLL)  # the accept loop polls the stop flag
        return listener

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every connection, release all stalls, and join the threads; idempotent."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            sockets = list(self._sockets)
        for sock in sockets:  # wakes handlers blocked in recv/send; each closes its own sockets
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))  # it polls the flag
        with self._cond:
            listener, self._listener = self._listener, None
            threads = list(self._threads)
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.close()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            leftovers = list(self._sockets)
            self._sockets.clear()
        for sock in leftovers:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT``: point the S3 client here instead of at the server."""
        if not self.port:
            raise RuntimeError("FaultProxy not started")
        return f"http://127.0.0.1:{self.port}"

    # -- programming faults --------------------------------------------------------------------------

    def add_rule(
        self,
        fault: Fault,
        *,
        method: str | None = None,
        path_contains: str | None = None,
        ranged: bool | None = None,
        times: int | None = None,
        probability: float = 1.0,
    ) -> Rule:
        """Apply ``fault`` to requests matching all given criteria, at most ``times`` times (None: always),
        each time with ``probability`` (a request the draw spares is offered to the next rule)."""
        if not 0.0 < probability <= 1.0:
            raise ValueError("probability must lie in (0, 1]")
        rule = Rule(fault, method=method, path_contains=path_contains, ranged=ranged, times=times,
                    probability=probability)
        with self._cond:
            self._rules.append(rule)
        return rule

    def remove_rule(self, rule: Rule) -> None:
        """Stop applying ``rule``; requests already holding it are not affected."""
        with self._cond, contextlib.suppress(ValueError):
            self._rules.remove(rule)

    def clear(self) -> None:
        """Remove every rule (the request log and the blackhole mode stay)."""
        with self._cond:
            self._rules.clear()

    def blackhole(self, on: bool = True) -> None:
        """While on, read requests but never answer; turning it off closes the connections it held."""
        with self._cond:
            self._blackhole = on
            self._cond.notify_all()

    def link(self, bandwidth: float = 0.0, rtt: float = 0.0) -> None:
        """Model the path to a distant origin: `rtt` seconds before each request is forwarded, response
        bodies of every connection together at most `bandwidth` bytes per second (0: no limit)."""
        with self._link_lock:
            self._rtt, self._bandwidth, self._link_free_at = rtt, bandwidth, 0.0

    def _pace(self, nbytes: int) -> None:
        """Wait for `nbytes` to pass the shared link (FIFO slots on a virtual clock)."""
        with self._link_lock:
            if self._bandwidth <= 0:
                return
            now = time.monotonic()
            self._link_free_at = max(now, self._link_free_at) + nbytes / self._bandwidth
            wait = self._link_free_at - now
        self._sleep(wait)

    def refuse(self, on: bool = True) -> None:
        """While on, refuse new connections (the listener is closed: ECONNREFUSED) and shut the open ones,
        as an overloaded or restarting server does; off, listen again on the same port."""
        with self._cond:
            if on == self._refusing or self._stopped:
                return
            self._refusing = on
            listener = self._listener if on else None
            if on:
                self._listener = None
            else:  # listening again before this returns: the next connect gets through
                self._listener = self._listen(self.port)
            sockets = list(self._sockets) if on else []
            self._cond.notify_all()
        if listener is not None:  # shutdown stops the listening now, even while accept() polls it
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                listener.close()
        for sock in sockets:  # wakes their handlers, which close them (the client sees the connection end)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def release(self) -> None:
        """End every stall in progress now (each then closes or continues as its rule says)."""
        with self._cond:
            self._release_gen += 1
            self._cond.notify_all()

    def wait_stalled(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Wait until at least ``count`` requests are stalled (or blackholed); False on timeout.

        Lets a test call :meth:`release` only once the stall really started, without sleeping.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._stalled < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopped:
                    return False
                self._cond.wait(remaining)
            return True

    # -- counters ------------------------------------------------------------------------------------

    @property
    def stalled(self) -> int:
        """Requests currently held by a stall or the blackhole."""
        with self._cond:
            return self._stalled

    @property
    def connections(self) -> int:
        """How many client connections were accepted: shows whether a client kept its connection alive."""
        with self._cond:
            return self._connections

    @property
    def requests(self) -> int:
        """How many requests the proxy received (forwarded, faulted or blackholed)."""
        with self._cond:
            return len(self._log)

    @property
    def log(self) -> list[RequestRecord]:
        """A copy of the request log, oldest first."""
        with self._cond:
            return list(self._log)

    def requests_matching(
        self, method: str | None = None, path_contains: str | None = None, ranged: bool | None = None
    ) -> int:
        """How many logged requests match all given criteria (same semantics as rules)."""
        probe = Rule(Fault(FaultKind.LATENCY), method=method, path_contains=path_contains, ranged=ranged)
        with self._cond:
            return sum(1 for r in self._log if probe.matches(r.method, r.path, r.ranged))

    def ranged_bytes(self, method: str = "GET") -> int:
        """Bytes asked for by the ranged requests answered without a fault (`bytes=a-b` each), e.g. what an
        origin behind this proxy served."""
        total = 0
        with self._cond:
            for r in self._log:
                m = _RANGE.fullmatch(r.range or "")
                if m and r.method == method and r.fault is None and not r.blackholed:
                    total += int(m.group(2)) - int(m.group(1)) + 1
        return total

    def clear_log(self) -> None:
        """Forget the requests seen so far (counters restart at zero)."""
        with self._cond:
            self._log.clear()

    # -- internals -----------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            with self._cond:
                while self._refusing and not self._stopped:
                    self._cond.wait()
                if self._stopped or self._listener is None:
                    return
                listener = self._listener
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                continue  # closed by refuse() or stop(): the loop sees which
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._track(sock):
                sock.close()
                return
            thread = threading.Thread(
                target=self._serve, args=(sock,), name=f"faultproxy-{self.port}-conn{next(self._conn_ids)}",
                daemon=True,
            )
            with self._cond:
                self._threads.add(thread)
                self._connections += 1
            thread.start()

    def _track(self, sock: socket.socket) -> bool:
        """Register ``sock`` so stop() can shut it down; False if the proxy is already stopping."""
        with self._cond:
            if self._stopped:
                return False
            self._sockets.add(sock)
            return True

    def _untrack(self, sock: socket.socket) -> None:
        with self._cond:
            self._sockets.discard(sock)

    def _serve(self, sock: socket.socket) -> None:
        conn = _Connection(self, sock)
        try:
            conn.run()
        except (_Closed, _BadMessage, OSError):
            pass
        finally:
            conn.close()
            with self._cond:
                self._threads.discard(threading.current_thread())

    def _pick_rule(self, method: str, target: str, ranged: bool) -> Fault | None:
        with self._cond:
            for rule in self._rules:
                if not rule.exhausted and rule.matches(method, target, ranged) and (
                        rule.probability >= 1.0 or self._random.random() < rule.probability):
                    rule.fired += 1
                    return rule.fault
        return None

    def _record(self, record: RequestRecord) -> None:
        with self._cond:
            self._log.append(record)

    def _hold(self, until: Callable[[], bool], seconds: float | None) -> bool:
        """Count this request as stalled and wait until ``until()`` (checked under the lock), ``seconds``
        pass, or stop(); return False if the proxy is stopping."""
        deadline = None if seconds is None else time.monotonic() + seconds
        with self._cond:
            self._stalled += 1
            self._cond.notify_all()
            try:
                while not self._stopped and not until():
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    self._cond.wait(remaining)
                return not self._stopped
            finally:
                self._stalled -= 1

    def _stall(self, seconds: float) -> bool:
        generation = self._release_gen
        return self._hold(lambda: self._release_gen != generation, seconds)

    def _sleep(self, seconds: float) -> bool:
        """Sleep that stop() interrupts; False if stopping."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while not self._stopped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return True
                self._cond.wait(remaining)
        return False


class _Connection:
    """One client connection and its upstream connection: a loop of request/response exchanges."""

    def __init__(self, proxy: FaultProxy, sock: socket.socket) -> None:
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
        remaining = head.content_length or 0
        while remaining > 0:
            piece = reader.read_some(min(remaining, _CHUNK))
            if not piece:
                raise _BadMessage("EOF inside a request body")
            out(piece)
            remaining -= len(piece)

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
            remaining = size + 2  # data and its CRLF
            while remaining > 0:
                piece = reader.read_some(min(remaining, _CHUNK))
                if not piece:
                    raise _BadMessage("EOF inside a chunk")
                out(piece)
                remaining -= len(piece)

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
