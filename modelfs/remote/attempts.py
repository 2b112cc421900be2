"""Requests that another thread can abandon: a GET, its hedge, a bucket check, each in a thread of its own
(`RequestThreads`), whose connection is recorded while it holds one, so that a request that lost a race (or
that its caller gave up on) is cut short at once: its socket is shut down (waking the thread blocked on it),
botocore is stopped from sending it again or retrying it, and a late answer's body is closed unread.
`make_abandonable` fits a boto3 client with the connection pools that record; `remote.s3` is the user.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

import botocore
from botocore.awsrequest import AWSHTTPConnection, AWSHTTPConnectionPool, AWSHTTPSConnection, AWSHTTPSConnectionPool

log = logging.getLogger(__name__)
R = TypeVar("R")  # what a request running in an Attempt thread returns


class Abandoned(Exception):
    """Raised inside an abandoned request's thread, so botocore neither retries it nor sends it again."""


class Attempt(Generic[R]):
    """One request running in a thread of its own, that another thread can abandon: the connection it is
    using (recorded by the connection pool below, in the request's thread) is shut down, so the thread
    blocked on it wakes now instead of at the read timeout. A connection is recorded only while the request
    holds it (from taking it out of the pool until it goes back, or the request returns its response), so
    a connection in the pool or in another request's hands is never touched."""

    def __init__(self) -> None:
        self.future: Future[R] = Future()
        self._lock = threading.Lock()
        self._conn: Any = None
        self._abandoned = False
        self._finished = False

    @property
    def abandoned(self) -> bool:
        return self._abandoned

    def abandon(self) -> None:
        with self._lock:
            if self._finished:
                return
            self._abandoned = True
            if self._conn is not None:
                _shut(self._conn)

    def track(self, conn: Any) -> None:
        """`conn` is this request's now (it may already be connected: a kept-alive one)."""
        with self._lock:
            self._conn = conn
            if self._abandoned:
                _shut(conn)

    def connected(self, conn: Any) -> None:
        """`conn` has just connected: abandoned while it was connecting, it is shut now."""
        with self._lock:
            if self._abandoned and self._conn is conn:
                _shut(conn)

    def untrack(self) -> None:
        """The connection goes back to the pool (or was discarded): no longer this request's."""
        with self._lock:
            self._conn = None

    def finish(self) -> None:
        """The request returned: its connection (if it returned a response) now belongs to the caller."""
        with self._lock:
            self._finished = True
            self._conn = None


def _shut(conn: Any) -> None:
    """Shut down `conn`'s socket (not close it: its owner thread closes it, so the fd is never reused under
    it). On the plain socket even under TLS: ssl.SSLSocket.shutdown would drop the SSL object the blocked
    thread is reading with."""
    sock = getattr(conn, "sock", None)
    if isinstance(sock, socket.socket):
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:  # already closed or reset
            pass


_current = threading.local()  # .attempt: the Attempt whose thread this is (None in other threads)


def _attempt() -> Attempt[Any] | None:
    return getattr(_current, "attempt", None)


def _stop_abandoned(**_: Any) -> None:
    """botocore event handler (before-send, needs-retry; registered first): an abandoned request is not
    sent again, and its failure is not retried (nor charged to botocore's retry quota)."""
    attempt = _attempt()
    if attempt is not None and attempt.abandoned:
        raise Abandoned()


class _TrackedConnection:
    """Mixin for botocore's connections: report connecting to the request being abandoned."""

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]  # a mixin over botocore's untyped classes
        attempt = _attempt()
        if attempt is not None:
            attempt.connected(self)


class _TrackedPool:
    """Mixin for botocore's connection pools: record which connection a request in an Attempt thread holds.
    Both calls run in the thread of the request (urllib3's urlopen), except putting back the connection of a
    response whose body the caller read, which is no longer the attempt's (`finish`)."""

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]  # a mixin over botocore's untyped classes
        attempt = _attempt()
        if attempt is not None:
            attempt.track(conn)
        return conn

    def _put_conn(self, conn: Any) -> None:
        attempt = _attempt()
        if attempt is not None:
            attempt.untrack()
        super()._put_conn(conn)  # type: ignore[misc]  # a mixin over botocore's untyped classes


class _HTTPConnection(_TrackedConnection, AWSHTTPConnection):  # type: ignore[misc]  # botocore ships no types
    pass


class _HTTPSConnection(_TrackedConnection, AWSHTTPSConnection):  # type: ignore[misc]  # botocore ships no types
    pass


class _HTTPPool(_TrackedPool, AWSHTTPConnectionPool):  # type: ignore[misc]  # botocore ships no types
    ConnectionCls = _HTTPConnection


class _HTTPSPool(_TrackedPool, AWSHTTPSConnectionPool):  # type: ignore[misc]  # botocore ships no types
    ConnectionCls = _HTTPSConnection


def make_abandonable(client: Any) -> bool:
    """Give `client` connection pools that record each request's connection, and stop abandoned requests
    in its event system. False (losers then end at their read timeout, as they did) where botocore's
    session is not laid out as expected."""
    session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    classes = getattr(session, "_pool_classes_by_scheme", None)  # shared by its pool managers, per client
    if not isinstance(classes, dict) or classes.get("http") is not AWSHTTPConnectionPool:
        log.warning("botocore %s: hedged requests that lose cannot be cut short here; they end at "
                    "s3.read_timeout", botocore.__version__)
        return False
    classes["http"], classes["https"] = _HTTPPool, _HTTPSPool
    for event in ("before-send.s3", "needs-retry.s3"):
        client.meta.events.register_first(event, _stop_abandoned, unique_id=f"modelfs-abandon-{event}")
    return True


class RequestThreads:
    """At most `limit` request threads at once (s3.max_request_threads), counted in slots taken before a
    thread starts. Nothing ever waits for a slot: a caller that finds none does without (no hedge, no
    bucket check). A thread gives its slot back as its last act and may still be finishing then, so a new
    thread starts only once every such thread is gone: threading.enumerate() never shows more than `limit`.
    Threads are daemons: a request still ending (in a retry's backoff) never holds the process at exit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._taken = 0
        self._ending: list[threading.Thread] = []  # gave their slot back, maybe not yet gone

    def take(self, n: int) -> bool:
        with self._lock:
            if self._taken + n > self.limit:
                return False
            self._taken += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self._taken -= n

    def start(self, fn: Callable[[], R]) -> Attempt[R]:
        """Run `fn` in a new thread, on a slot already taken (given back if no thread starts); its result or
        exception in `.future`."""
        with self._lock:
            ending = list(self._ending)
        for t in ending:
            t.join()  # past its last statement: returns at once
        with self._lock:
            self._ending = [t for t in self._ending if t not in ending]
        attempt: Attempt[R] = Attempt()
        try:
            threading.Thread(target=self._run, args=(fn, attempt), name="s3-request", daemon=True).start()
        except BaseException:  # RuntimeError: can't start new thread
            self.give(1)
            raise
        return attempt

    def _run(self, fn: Callable[[], R], attempt: Attempt[R]) -> None:
        _current.attempt = attempt
        try:
            if attempt.abandoned:
                raise Abandoned()
            result = fn()
        except BaseException as e:  # handed to whoever waits on the future
            attempt.finish()
            attempt.future.set_exception(e)
        else:
            attempt.finish()
            attempt.future.set_result(result)
        finally:
            _current.attempt = None
            with self._lock:
                self._taken -= 1
                self._ending.append(threading.current_thread())
