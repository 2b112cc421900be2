"""S3 (or any S3-compatible store) through boto3.

Retries of 5xx, SlowDown, throttling and connection errors are botocore's ("standard" mode, jittered
exponential backoff), with per-request connect and read timeouts. Only what botocore cannot see is
retried here: a body that ends short or stalls after the headers arrived. Every ranged GET carries
If-Match with the version's ETag, so bytes of two versions are never combined.

Hedged GETs (`s3.hedge_after`): a ranged GET whose response headers have not arrived after
`hedge_after` seconds is sent again on another connection, and the first answer is used; a stalled
request then costs a loader `hedge_after`, not the read timeout. When both stay silent for another
`hedge_after`, one bucket check (shared by every GET that got there at once, itself bounded by
`hedge_after`) decides: silence there too means the store is unreachable (offline mode, EIO at once for
what is not cached) instead of every reader waiting out fetch.deadline. If the store answers it, the two
stalled on their own (a slow node behind the endpoint): the GET is sent once more, and again after each
further `hedge_after` of silence, up to _MAX_ATTEMPTS requests at once, so two stalls in a row cost a
loader about 2 x `hedge_after`, not the read timeout.

A request that lost the race (or that a GET gave up on) is abandoned at once (`remote.attempts`), not left
to its read timeout: its connection is shut down (SHUT_RDWR, which wakes the thread blocked on it), and botocore is
stopped from retrying it; a late answer's body is closed unread. Request threads (a GET, its hedge, the
bucket check) are at most `s3.max_request_threads` at once; a GET that finds no room for itself and its
hedge is sent unhedged from its caller's thread, so a full set of threads never makes a GET wait.
"""

from __future__ import annotations

import collections
import email.utils
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import TYPE_CHECKING, Any, BinaryIO

import boto3
import botocore.exceptions as bexc
import urllib3.exceptions
from botocore.config import Config as BotoConfig

from modelfs.errors import ConfigError, NotFound, StoreError, StoreUnreachable, VersionChanged
from modelfs.logs import register_secret
from modelfs.remote.attempts import Attempt, RequestThreads, make_abandonable
from modelfs.remote.base import Listing, ObjectInfo
from modelfs.remote.body import BODY_ERRORS, close_body, read_body_into
from modelfs.retry import BODY_ATTEMPTS, BODY_PAUSES, Resume

if TYPE_CHECKING:
    from modelfs.config import S3Config

log = logging.getLogger(__name__)

#: A ranged GET is sent at most this many times at once: the first, its hedge, and one more for each
#: further `hedge_after` that all are silent while the store answers a bucket check.
_MAX_ATTEMPTS = 4
#: Recent GETs whose time to answer sets the hedge delay (`S3Store._hedge_delay`).
_ANSWER_WINDOW = 64


def parse_s3_url(url: str) -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, "prefix/"); the prefix is "" for a whole bucket."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ConfigError(f"source: missing bucket in {url!r} (expected s3://BUCKET/PREFIX)")
    if len(bucket) < 3 or len(bucket) > 63 or not all(c.isalnum() or c in "-._" for c in bucket):
        raise ConfigError(f"source: invalid bucket name {bucket!r} in {url!r}")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/") if prefix else ""


def _payload(signed: bool) -> dict[str, bool]:
    return {} if signed else {"payload_signing_enabled": False}


def _code(e: bexc.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: bexc.ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


class S3Store:
    """Objects under s3://bucket/prefix."""

    def __init__(self, bucket: str, prefix: str, cfg: S3Config, sign_payload: bool = True) -> None:
        """`sign_payload=False` (the shared tier's writer): PUT bodies are sent UNSIGNED-PAYLOAD with a
        CRC32 checksum the store checks, not SHA-256-signed, which halves the client's CPU per byte written
        (2.2 -> 1.2 ms/MiB for 8 MiB PUTs to SeaweedFS here); headers, the block's hash among them, stay
        signed, and every read from the tier is verified against that hash."""
        self.bucket = bucket
        self.prefix = prefix
        try:
            session = boto3.session.Session(profile_name=cfg.profile or None)
        except bexc.ProfileNotFound:
            raise ConfigError(f"s3.profile: no profile named {cfg.profile!r} in the AWS config") from None
        creds = session.get_credentials()
        if creds is not None:  # whatever logs them later, these never reach a log line
            register_secret(creds.secret_key)
            register_secret(creds.token)
        region = cfg.region or session.region_name or "us-east-1"
        botocfg = BotoConfig(
            region_name=region,
            retries={"total_max_attempts": cfg.max_attempts, "mode": "standard"},
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
            max_pool_connections=cfg.max_pool_connections,
            s3={"addressing_style": cfg.addressing_style, **_payload(sign_payload)},
            tcp_keepalive=True,
        )
        try:
            self.client: Any = session.client("s3", endpoint_url=cfg.endpoint_url or None, config=botocfg)
        except ValueError as e:
            raise ConfigError(f"s3: invalid endpoint URL {cfg.endpoint_url!r}: {e}") from None
        except bexc.BotoCoreError as e:
            raise ConfigError(f"s3: {e}") from None
        self.endpoint = str(self.client.meta.endpoint_url)
        self.hedge_after = cfg.hedge_after
        self._answers: collections.deque[float] = collections.deque(maxlen=_ANSWER_WINDOW)  # seconds to answer
        self._answers_lock = threading.Lock()
        self._threads = RequestThreads(cfg.max_request_threads)
        self._abandonable = make_abandonable(self.client)
        self._silence_lock = threading.Lock()
        self._silence_check: Future[bool] | None = None  # the bucket check in progress, shared
        self._silence_verdict = (0.0, False)  # (when, unreachable) of the last one, reused for a second
        self.hedged = 0  # extra requests sent for silent GETs, hedges and re-hedges (read by the stats)
        self.unhedged = 0  # GETs sent from their caller's thread: no room for a hedge (s3.max_request_threads)
        self.body_retries = 0  # GET bodies asked for again (cut, short or stalled after the headers)
        self._count_lock = threading.Lock()
        self.identity = f"s3:{self.endpoint}/{bucket}/{prefix}"
        self.domain = f"s3:{self.endpoint}/{bucket}"

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.endpoint}"

    def _fail(self, e: Exception, what: str, silence_is_unreachable: bool = False) -> StoreError:
        """One line for users: what failed, and why, without request ids or credentials.

        StoreUnreachable (offline mode) only when no connection can be made, or, for the bucket check
        and listings (`silence_is_unreachable`), when the store does not answer: one GET that stalls or
        is cut off is that object's failure, not the store's.
        """
        if isinstance(e, StoreError):
            return e
        if isinstance(e, bexc.ClientError):
            code = _code(e)
            if code in ("NoSuchBucket",):
                return StoreError(f"bucket '{self.bucket}' does not exist at {self.endpoint}")
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or _status(e) == 403:
                return StoreError(f"access denied to s3://{self.bucket} at {self.endpoint} ({code or 403}): "
                                  "check credentials")
            status = _status(e)
            busy = status in (429, 503) or (isinstance(status, int) and status >= 500) or \
                code in ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError")
            return StoreError(f"{what} failed: {code or status} from {self.endpoint}", transient=busy)
        if isinstance(e, bexc.NoCredentialsError):
            return StoreError("no S3 credentials found (environment, shared config, or instance role)")
        if isinstance(e, bexc.ConnectionError):  # refused, unroutable, connect timeout: after botocore's retries
            return StoreUnreachable(f"cannot reach S3 endpoint {self.endpoint} ({type(e).__name__})")
        if isinstance(e, bexc.HTTPClientError | urllib3.exceptions.HTTPError | ConnectionError | TimeoutError):
            if silence_is_unreachable:
                return StoreUnreachable(f"S3 endpoint {self.endpoint} does not answer ({type(e).__name__})")
            return StoreError(f"{what} failed: {type(e).__name__} from {self.endpoint}", transient=True)
        return StoreError(f"{what} failed: {type(e).__name__} from {self.endpoint}")

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except bexc.ClientError as e:
            if _status(e) == 404:
                raise StoreError(f"bucket '{self.bucket}' does not exist at {self.endpoint}") from None
            raise self._fail(e, "HeadBucket") from None
        except (bexc.BotoCoreError, OSError) as e:
            raise self._fail(e, "HeadBucket", silence_is_unreachable=True) from None

    def list_dir(self, prefix: str) -> Listing:
        full = self.prefix + prefix
        listing = Listing()
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, Delimiter="/")
            for page in pages:
                for cp in page.get("CommonPrefixes", ()):
                    listing.dirs.append(cp["Prefix"][len(full):-1])
                for o in page.get("Contents", ()):
                    name = o["Key"][len(full):]
                    info = ObjectInfo(prefix + name, int(o["Size"]), str(o["ETag"]),
                                      o["LastModified"].timestamp())
                    listing.objects.append((name, info))
        except (bexc.ClientError, bexc.BotoCoreError, OSError) as e:
            raise self._fail(e, f"listing {full!r}", silence_is_unreachable=True) from None
        return listing

    def read_into(self, obj: ObjectInfo, start: int, views: Sequence[memoryview],
                  filled: Callable[[int], None] | None = None) -> None:
        key = self.prefix + obj.key
        end = start + sum(len(v) for v in views)
        resume, pauses = Resume(start, views, filled), BODY_PAUSES.start()  # a retry asks only for the rest
        for attempt in range(1, BODY_ATTEMPTS + 1):
            begin, rest = resume.attempt()
            if not rest:  # all of it arrived; the attempt failed after the last byte
                return
            length = end - begin
            rng = f"bytes={begin}-{end - 1}"
            try:  # botocore has retried the request itself (5xx, SlowDown, resets, timeouts) by now
                resp = self._hedged(functools.partial(self.client.get_object, Bucket=self.bucket, Key=key,
                                                      Range=rng, IfMatch=obj.etag))
            except bexc.ClientError as e:
                if _status(e) == 412 or _code(e) == "PreconditionFailed":
                    raise VersionChanged(f"{obj.key} was overwritten in the store") from None
                if _status(e) == 404:
                    raise VersionChanged(f"{obj.key} was removed from the store") from None
                raise self._fail(e, f"GET {obj.key}") from None
            except (bexc.BotoCoreError, OSError) as e:
                raise self._fail(e, f"GET {obj.key}") from None
            body = resp["Body"]
            try:  # ... but not the body: a short, reset or stalled body is retried here (from the first
                # view not complete: what arrived whole is kept)
                got = read_body_into(body, rest, filled=resume.complete)
                if got == length:
                    return
                err: Exception = StoreError(f"short body: {got} of {length} bytes")
            except BODY_ERRORS as e:
                err = e
            finally:
                body.close()
            log.debug("GET %s %s attempt %d: %s", obj.key, rng, attempt, type(err).__name__)
            if attempt < BODY_ATTEMPTS:
                with self._count_lock:
                    self.body_retries += 1
                time.sleep(pauses.draw())
        raise StoreError(f"GET {obj.key} failed {BODY_ATTEMPTS} times reading the body: "
                         f"{err if isinstance(err, StoreError) else type(err).__name__}", transient=True)

    def _hedged(self, request: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The response of `request` (a GET whose body is read by the caller), sent a second time if the
        first is silent for `hedge_after` seconds, and once more after each further `hedge_after` that all
        stay silent while the store answers a bucket check; the first success wins. Whatever did not win is
        abandoned when this returns or raises (its connection shut, its thread ended), its body closed."""
        if self.hedge_after <= 0:
            return request()
        after = self._hedge_delay()
        if not self._threads.take(2):  # room for the request and its hedge, or neither
            self.unhedged += 1
            log.debug("no room for a hedged GET (s3.max_request_threads=%d): sent unhedged", self._threads.limit)
            return request()
        try:
            first = self._threads.start(request)
        except BaseException:
            self._threads.give(1)  # the hedge's
            raise
        began = time.monotonic()
        attempts = [first]
        winner: Attempt[dict[str, Any]] | None = None
        try:
            done, _ = wait([first.future], timeout=after)
            if done:
                self._threads.give(1)  # the hedge's, not needed
                winner = first
                self._answered(time.monotonic() - began)
                return first.future.result()
            self.hedged += 1
            attempts.append(self._threads.start(request))
            pending = {a.future: a for a in attempts}
            silent_since = time.monotonic()
            while True:
                done, _ = wait(pending, timeout=after, return_when=FIRST_COMPLETED)
                for f in done:
                    attempt = pending.pop(f)
                    if f.exception() is None:
                        winner = attempt
                        self._answered(time.monotonic() - began)
                        return f.result()
                    if not pending:
                        raise f.exception() or RuntimeError("a failed request without its exception")
                if done or time.monotonic() - silent_since < after:
                    continue
                if self._silent_store():
                    raise StoreUnreachable(f"S3 endpoint {self.endpoint} does not answer (a GET and its hedge "
                                           f"silent for {2 * after:g} s, and the bucket check too)")
                # The store answers, and every attempt in flight is silent: each stalled on its own (a slow
                # node behind the endpoint, a dropped connection). One more, while there is room.
                if len(attempts) < _MAX_ATTEMPTS and self._threads.take(1):
                    self.hedged += 1
                    attempts.append(self._threads.start(request))
                    pending[attempts[-1].future] = attempts[-1]
                silent_since = time.monotonic()
        finally:
            for attempt in attempts:
                if attempt is not winner:
                    attempt.abandon()
                    attempt.future.add_done_callback(close_body)

    def _hedge_delay(self) -> float:
        """How long a GET may stay silent before it is hedged: `s3.hedge_after`, or the 95th percentile of
        the last GETs' time to answer where that is longer. On a saturated link every GET waits its turn
        for seconds, and hedging them all would only double the queue (and the bytes); a GET stalled on
        its own is still hedged once it is slower than 19 of 20 others."""
        with self._answers_lock:
            recent = sorted(self._answers)
        if len(recent) < _ANSWER_WINDOW // 4:
            return self.hedge_after
        return max(self.hedge_after, recent[int(0.95 * (len(recent) - 1))])

    def _answered(self, seconds: float) -> None:
        with self._answers_lock:
            self._answers.append(seconds)

    def _silent_store(self) -> bool:
        """Whether the store answers nothing: one bucket check within `hedge_after`, shared by the GETs that
        ask at once and reused for a second after it ended. No room for its thread: not known, so False."""
        with self._silence_lock:
            when, verdict = self._silence_verdict
            if time.monotonic() - when < 1.0:
                return verdict
            check = self._silence_check
            if check is None:
                check = self._silence_check = Future()
                mine = True
            else:
                mine = False
        if not mine:
            return check.result()
        verdict = False
        try:
            if self._threads.take(1):
                attempt = self._threads.start(self.check)
                done, _ = wait([attempt.future], timeout=self.hedge_after)
                attempt.abandon()
                verdict = not done or isinstance(next(iter(done)).exception(), StoreUnreachable)
        finally:
            with self._silence_lock:
                self._silence_check = None
                self._silence_verdict = (time.monotonic(), verdict)
            check.set_result(verdict)
        return verdict

    def get_into(self, key: str, views: Sequence[memoryview], deadline: float | None = None
                 ) -> dict[str, str] | None:
        """Fill `views` with the whole object `key` (any version; for the shared cache tier, whose keys
        never change content), returning its user metadata; None if there is no such object. One
        attempt, within `deadline` (time.monotonic) if given: the caller decides what a failure means."""
        length = sum(len(v) for v in views)
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except bexc.ClientError as e:
            if _status(e) == 404 or _code(e) in ("NoSuchKey", "404"):
                return None
            raise self._fail(e, f"GET {key}") from None
        except (bexc.BotoCoreError, OSError) as e:
            raise self._fail(e, f"GET {key}", silence_is_unreachable=True) from None
        if int(resp.get("ContentLength", -1)) != length:
            resp["Body"].close()
            raise StoreError(f"GET {key}: {resp.get('ContentLength')} bytes, expected {length}")
        body = resp["Body"]
        try:
            got = read_body_into(body, views, deadline)
        except BODY_ERRORS as e:
            raise self._fail(e, f"GET {key}", silence_is_unreachable=True) from None
        finally:
            body.close()
        if got != length:
            raise StoreError(f"GET {key}: short body, {got} of {length} bytes")
        return dict(resp.get("Metadata") or {})

    def put(self, key: str, body: bytes | BinaryIO, metadata: dict[str, str], if_absent: bool = False) -> bool:
        """Write object `key` (the shared cache tier's write-back); `body` may be a block's mapping, read
        as a file (no copy of it in Python). With `if_absent`, only if no object `key` exists (a
        conditional PUT, If-None-Match: *): False if one does."""
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=body, Metadata=metadata, **extra)
        except bexc.ClientError as e:
            if if_absent and (_status(e) == 412 or _code(e) in ("PreconditionFailed", "ConditionalRequestConflict")):
                return False
            raise self._fail(e, f"PUT {key}", silence_is_unreachable=True) from None
        except (bexc.BotoCoreError, OSError) as e:
            raise self._fail(e, f"PUT {key}", silence_is_unreachable=True) from None
        return True

    def age(self, key: str) -> float | None:
        """Seconds since object `key` was written, by the store's own clock (its Date header against the
        object's Last-Modified, so no clock of this host is involved); None if there is no such object."""
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except bexc.ClientError as e:
            if _status(e) == 404:
                return None
            raise self._fail(e, f"HEAD {key}") from None
        except (bexc.BotoCoreError, OSError) as e:
            raise self._fail(e, f"HEAD {key}", silence_is_unreachable=True) from None
        now = r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        try:
            written: float = r["LastModified"].timestamp()
            return max(0.0, email.utils.parsedate_to_datetime(now).timestamp() - written)
        except (TypeError, ValueError):
            return 0.0

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)
        except (bexc.ClientError, bexc.BotoCoreError, OSError) as e:
            raise self._fail(e, f"DELETE {key}", silence_is_unreachable=True) from None

    def exists(self, key: str) -> bool:
        """Whether object `key` exists (a HEAD)."""
        try:
            self.head(key)
        except NotFound:
            return False
        return True

    def head(self, key: str) -> ObjectInfo:
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except bexc.ClientError as e:
            if _status(e) == 404:
                raise NotFound(f"no such object: {key}") from None
            raise self._fail(e, f"HEAD {key}") from None
        except (bexc.BotoCoreError, OSError) as e:
            raise self._fail(e, f"HEAD {key}") from None
        return ObjectInfo(key, int(r["ContentLength"]), str(r["ETag"]), r["LastModified"].timestamp())

    def close(self) -> None:
        self.client.close()
