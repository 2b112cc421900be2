"""Credentials never reach a log line: redaction of known secrets and of signature-shaped text."""

from __future__ import annotations

import logging
from pathlib import Path

from modelfs.logs import redact, register_secret, setup_logging


def test_known_secrets_and_signature_shapes_are_redacted() -> None:
    register_secret("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    line = ("creds wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY https://b.s3/k?X-Amz-Credential=AKIA%2F2026&"
            "X-Amz-Signature=abcdef0123&X-Amz-Security-Token=FQoGZXIvYXdzE "
            "headers={'Authorization': b'AWS4-HMAC-SHA256 Credential=AKIA/x, Signature=deadbeef', "
            "'X-Amz-Security-Token': b'IQoJb3JpZ2luX2VjE'} aws_secret_access_key = hunter2hunter2")
    out = redact(line)
    for secret in ("wJalrXUtnFEMI", "abcdef0123", "FQoGZXIvYXdzE", "deadbeef", "IQoJb3JpZ2luX2VjE",
                   "hunter2hunter2"):
        assert secret not in out, out
    assert "[redacted]" in out


def test_setup_logging_scrubs_tracebacks_and_caps_botocore(tmp_path: Path, monkeypatch: object) -> None:
    import pytest

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value-1234567890")
    log_file = tmp_path / "log"
    setup_logging("DEBUG", str(log_file))
    try:
        raise ValueError("token session-token-value-1234567890 in an error")
    except ValueError:
        logging.getLogger("modelfs.test").exception("failed")
    logging.getLogger("botocore.endpoint").debug("Sending http request: secret headers")
    for h in logging.getLogger().handlers:
        h.flush()
    text = log_file.read_text()
    assert "session-token-value-1234567890" not in text and "[redacted]" in text
    assert "secret headers" not in text
    logging.getLogger().handlers.clear()


def test_journal_format_is_one_line_with_priority() -> None:
    import sys

    from modelfs.logs import JournalFormatter

    fmt = JournalFormatter("%(name)s: %(message)s")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = logging.LogRecord("modelfs.x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    line = fmt.format(rec)
    assert line.startswith("<3>modelfs.x: failed here") and "\n" not in line and "RuntimeError: boom" in line
