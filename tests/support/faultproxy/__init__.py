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

from tests.support.faultproxy.proxy import FaultProxy
from tests.support.faultproxy.rules import Fault, FaultKind, RequestRecord, Rule

__all__ = ["Fault", "FaultKind", "FaultProxy", "RequestRecord", "Rule"]
