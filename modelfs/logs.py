"""Logging for the daemon and the CLI, with credentials scrubbed from every line at every level.

Two layers, because one mistake must not leak a key: libraries whose debug output carries request
headers (botocore, urllib3) are never logged below WARNING, and every formatted line, tracebacks
included, passes through `redact`, which removes known secret values (the credentials the store was
opened with, AWS_* variables) and anything shaped like a signature, token or Authorization header.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading

#: Libraries whose debug logs carry request headers (Authorization, session tokens).
CHATTY = ("botocore", "boto3", "s3transfer", "urllib3")

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_PATTERNS = [
    # Presigned URL query parameters and SigV4 header fields.
    re.compile(r"(?i)(X-Amz-(?:Signature|Security-Token|Credential)|Signature|AWSAccessKeyId)=[^&\s'\",]+"),
    re.compile(r"(?i)(Authorization|X-Amz-Security-Token)(['\"]?\s*[:=]\s*b?['\"]?)[^'\"\n,}]+"),
    re.compile(r"(?i)(aws_secret_access_key|aws_session_token|secret_key|session_token)(['\"]?\s*[:=]\s*['\"]?)"
               r"[^'\"\s,}]+"),
]
_secrets: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Never log `value` (a secret key or session token), whatever logs it."""
    if value and len(value) >= 8:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, "[redacted]")
    text = _PATTERNS[0].sub(lambda m: f"{m.group(1)}=[redacted]", text)
    for pat in _PATTERNS[1:]:
        text = pat.sub(lambda m: f"{m.group(1)}{m.group(2)}[redacted]", text)
    return text


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


#: syslog priorities for the journal's `<N>` line prefix (sd-daemon(3)).
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class JournalFormatter(RedactingFormatter):
    """Under systemd (stderr is the journal): `<priority>logger: message`, one line per event (the
    journal stamps time and unit itself; a traceback's lines are joined with " | ")."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record).replace("\n", " | ")
        return f"<{_PRIORITY.get(record.levelno, 6)}>{line}"


def _stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=dev:inode of the stream it connected; it must be our stderr."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
        return stream == f"{st.st_dev}:{st.st_ino}"
    except (OSError, ValueError):
        return False


def setup_logging(level: str, file: str | None = None) -> None:
    """Root logging to `file` (or stderr) at `level`, scrubbed; chatty libraries capped at WARNING."""
    for name in _SECRET_ENV:
        register_secret(os.environ.get(name))
    handler: logging.Handler = logging.FileHandler(file) if file else logging.StreamHandler(sys.stderr)
    if not file and _stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
