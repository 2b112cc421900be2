"""What the proxy can do to a request (`Fault`), when (`Rule`), and what it saw (`RequestRecord`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal


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
