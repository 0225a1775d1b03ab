"""Keep storage credentials out of every log record.

botocore logs each request it sends at DEBUG, headers included, so the
``Authorization: AWS4-HMAC-SHA256 Credential=<access key id>/...`` header of every
S3 call lands in any log that has DEBUG on for botocore: the console, files, and
the Prefect API when ``PREFECT_LOGGING_EXTRA_LOGGERS`` names botocore. A filter on a
logger or a handler would miss handlers added later (Prefect's, pytest's, the
user's), so the redaction happens where every record is made: a log record
factory, installed once, that replaces each registered secret in the message and
in the formatted traceback with ``***``.

Secrets are registered when a Torch Storage builds its S3 client (the only place
they are unwrapped). This module imports nothing from torch or Prefect.
"""

from __future__ import annotations

import logging
import threading
import traceback
from typing import Any

REDACTED = "***"
# Shorter values would redact ordinary words; no real credential is this short.
_MIN_LENGTH = 4

_secrets: frozenset[str] = frozenset()
_lock = threading.Lock()
_installed = False


def register_secret(*values: str | None) -> None:
    """Redact these values from every log record made from now on."""
    global _secrets
    fresh = {value for value in values if value and len(value) >= _MIN_LENGTH}
    if not fresh or fresh <= _secrets:
        return
    with _lock:
        _secrets = _secrets | fresh
        _install()


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _install() -> None:
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def make_redacted_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if _secrets:
            _redact_record(record)
        return record

    logging.setLogRecordFactory(make_redacted_record)
    _installed = True


def _redact_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: logging reports it when it formats
        return
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[1] is not None:
        # Formatters use a cached exc_text when there is one: cache the redacted text.
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        clean = redact(text)
        if clean != text:
            record.exc_text = clean


__all__ = ["REDACTED", "redact", "register_secret"]
