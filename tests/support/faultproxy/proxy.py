"""The proxy: its listener, rules, request log, link model and the waits its faults make (see the package's
docstring)."""

from __future__ import annotations

import contextlib
import itertools
import random
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from urllib.parse import urlsplit

from tests.support.faultproxy.connection import _Connection
from tests.support.faultproxy.rules import Fault, FaultKind, RequestRecord, Rule
from tests.support.faultproxy.wire import _ACCEPT_POLL, _RANGE, _BadMessage, _Closed


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
