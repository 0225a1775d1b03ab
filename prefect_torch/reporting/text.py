"""Turning numbers, locations and errors into text a Prefect UI user reads.

Everything shown in an artifact or a run name passes through here, so this is
where credentials are scrubbed from URLs and where NaN/inf become words.
"""

from __future__ import annotations

import math
import re
from urllib.parse import urlsplit

# ``scheme://user:password@host`` (or ``scheme://token@host``): the part before '@' is a secret.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
# Query strings carry tokens (pre-signed S3 URLs: X-Amz-Signature=..., SAS tokens).
_QUERY = re.compile(r"(?P<url>[A-Za-z][A-Za-z0-9+.-]*://[^\s?#]*)[?#][^\s]*")

ELLIPSIS = "…"


def scrub_secrets(text: str) -> str:
    """``text`` with URL credentials and query strings removed."""
    text = _USERINFO.sub(r"\g<scheme>", text)
    return _QUERY.sub(r"\g<url>", text)


def display_uri(uri: str, max_length: int = 80) -> str:
    """A dataset or model location as it should appear in the UI.

    Credentials and query strings are dropped (they can hold secrets); a long
    location keeps its end, which names the file.
    """
    text = scrub_secrets(str(uri).strip())
    if "://" in text:
        parts = urlsplit(text)
        text = f"{parts.scheme}://{parts.netloc}{parts.path}"
    if len(text) > max_length:
        text = ELLIPSIS + text[-(max_length - 1):]
    return text


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: Significant digits of every number an artifact shows (tables, markdown, progress).
DIGITS = 4


def round_number(value: float, digits: int = DIGITS) -> float | int:
    """The value every artifact shows for ``value``: ``digits`` significant digits,
    a whole number from 10**digits up to 1e9, and ``digits`` significant digits in
    scientific notation beyond. Tables hold this number, markdown prints it
    (``fmt_number``), so both agree to the digit."""
    if not math.isfinite(value) or value == 0:
        return value
    magnitude = abs(value)
    if 1e-3 <= magnitude < 10 ** digits:
        rounded = float(f"{value:.{digits}g}")
        if abs(rounded) < 10 ** digits:  # 9999.7 rounds up to the next range
            return rounded
    if 1e-3 <= magnitude < 1e9:
        return int(round(value))
    return float(f"{value:.{digits - 1}e}")


def fmt_number(value: object, digits: int = DIGITS) -> str:
    """A short human form: ``0.03125``, ``1.234e-05``, ``12,345``, ``nan``; '—' for missing."""
    if value is None:
        return "—"
    if not is_number(value):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)  # 'nan', 'inf', '-inf'
    if value == 0:
        return "0"
    shown = round_number(value, digits)
    if isinstance(shown, int):
        return f"{shown:,}"
    if 1e-3 <= abs(shown) < 10 ** digits:
        return f"{shown:.{digits}g}"
    return f"{shown:.{digits - 1}e}"


def fmt_seconds(seconds: float | None) -> str:
    """``0.41 s``, ``12.3 s``, ``4 min 05 s``, ``2 h 03 min``."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def table_cell(value: object, digits: int = DIGITS) -> object:
    """A value for a table artifact: numbers stay numbers (so the UI sorts them),
    rounded as ``fmt_number`` shows them (``round_number``); NaN and inf become text,
    because the UI parses the table as strict JSON, which has no NaN or Infinity."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return round_number(value, digits)
    return value


def md_escape(text: str) -> str:
    """Text safe inside a markdown table cell or sentence."""
    return (
        str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
        .replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*").replace("_", "\\_")
    )


def md_code(text: str) -> str:
    """Inline code that survives backticks in ``text``."""
    text = str(text).replace("\n", " ")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|")


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + ELLIPSIS
