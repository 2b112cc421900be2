"""HTTP/1.1 on the wire, as much as the proxy needs: buffered reads of heads, lines and bodies, parsed
heads, a TCP reset, an S3 XML error body."""

from __future__ import annotations

import contextlib
import re
import select
import socket
import struct
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

_MAX_HEAD = 64 << 10  # request/response heads larger than this are refused
_CHUNK = 64 << 10  # bodies are relayed in pieces of at most this size
_UPSTREAM_CONNECT_TIMEOUT = 5.0
_UPSTREAM_READ_TIMEOUT = 120.0  # a hung upstream should not pin a handler thread forever
_EXPECT_WAIT = 1.0  # like botocore: how long to wait for upstream's "100 Continue" before sending the body
_DRAIN_SECONDS = 0.5  # after a graceful close, how long to read what the client still sends (avoids an RST)
_ACCEPT_POLL = 0.2


_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


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
