"""A ranged GET's response body read straight into the caller's buffers (one copy: the kernel's), with
the failures of a body botocore does not retry, and a late answer's body closed unread."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import botocore.exceptions as bexc
import urllib3.exceptions

from modelfs.errors import StoreError

#: Body-level failures botocore does not retry once the response headers have arrived (the body is
#: read straight from urllib3, so its exceptions arrive unwrapped: IncompleteRead, ReadTimeout, reset).
BODY_ERRORS = (bexc.IncompleteReadError, bexc.ReadTimeoutError, bexc.ResponseStreamingError,
                bexc.ConnectionClosedError, bexc.EndpointConnectionError, urllib3.exceptions.HTTPError,
                ConnectionError, TimeoutError)

def close_body(f: Future[dict[str, Any]]) -> None:
    """A hedged GET's late answer: close its body unread (the connection is dropped, not reused)."""
    if f.exception() is None:
        f.result()["Body"].close()


def read_body_into(body: Any, views: Sequence[memoryview], deadline: float | None = None,
               filled: Callable[[int], None] | None = None) -> int:
    """Read a response body straight into `views`, in order: the socket's bytes land in the pooled
    buffers with no intermediate chunk (one copy, the kernel's). Returns the bytes read.

    urllib3's own readinto reads a chunk into a new bytes object and copies it; under it (botocore's
    StreamingBody wraps urllib3's response as `_raw_stream`, which holds http.client's as `_fp`),
    http.client reads into the caller's buffer directly. Once the body is read to its end (checked with
    one more read), the connection goes back to urllib3's pool (keep-alive). Other bodies fall back to
    chunked reads. Past `deadline` (time.monotonic), TimeoutError, however the bytes trickle in.
    `filled(k)` once view k is complete.
    """
    want = sum(len(v) for v in views)
    got = 0
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    reader: Callable[[memoryview], int] | None = None
    rest: Callable[[int], bytes] = bytes
    done: Callable[[], None] | None = None
    if hasattr(fp, "readinto") and hasattr(raw, "release_conn"):
        assert fp is not None and raw is not None
        reader, rest, done = fp.readinto, fp.read, raw.release_conn
    elif hasattr(raw, "readinto"):
        assert raw is not None
        reader, rest = raw.readinto, raw.read
    if reader is not None:
        for k, view in enumerate(views):
            have = 0
            while have < len(view):
                n = reader(view[have:])
                if not n:
                    return got + have
                have += n
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError("the body did not arrive within the deadline")
            got += have
            if filled is not None:
                filled(k)
        if rest(1):
            raise StoreError(f"long body: more than {want} bytes for a ranged GET")
        if done is not None:
            done()  # the body is read to its end: the connection goes back to urllib3's pool
        return got
    pending = iter(views)
    k, dest = 0, next(pending, None)
    have = 0
    for chunk in body.iter_chunks(1 << 20):
        pos = 0
        while pos < len(chunk):
            if dest is None:
                raise StoreError(f"long body: more than {want} bytes for a ranged GET")
            n = min(len(chunk) - pos, len(dest) - have)
            dest[have:have + n] = chunk[pos:pos + n]
            have += n
            pos += n
            got += n
            if have == len(dest):
                if filled is not None:
                    filled(k)
                k, dest = k + 1, next(pending, None)
                have = 0
    return got
