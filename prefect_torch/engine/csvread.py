"""Reading CSV bytes (RFC 4180): a correct DataFrame, or a ``DataError`` that names
the file, the line (and character or column where it applies) and the fix.

The bytes are checked before pandas sees them (encoding, NUL bytes, the header,
quoting and every row's field count, see ``csvscan``), because pandas' own
leniency turns malformed rows into silently shifted or NaN-padded data.

Decisions on hostile input:
- UTF-8 only (a UTF-8 BOM is accepted): other bytes are refused with their line
  and character, never decoded into mojibake.
- The delimiter is sniffed from the header line (comma, tab, semicolon or pipe)
  unless the caller names it, so a ``;`` file is read as ``;``, and a file whose
  header has one column but whose rows use ``;`` is refused.
- A gzip file is read whatever its name (up to a bound on its expanded size);
  other binary files (xlsx, xls, UTF-16, Parquet) are refused by name.
- A quote inside an unquoted field is refused (RFC 4180), not kept or swallowed.
- A trailing delimiter on the header and on every row is an empty last column:
  it is dropped. On the rows only, it is an extra field, refused with its line.
- Values stay text: nothing is evaluated (a ``=cmd|...`` spreadsheet formula is
  just a string).
- A header of numbers means the file has none; repeated or empty names are refused.

Parsing: once the bytes pass those checks, pyarrow's multi-threaded reader parses
them when every column comes out as plain numbers (int64 or float64): the common
ML table, about 1.5 times faster than pandas on two cores. Anything else (text,
dates, booleans, an empty column, a value pyarrow reads differently from pandas)
is parsed by pandas as before, so what a file means never depends on the reader.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from prefect_torch.engine.csvscan import CsvLayout, locate, scan_csv
from prefect_torch.errors import DataError

logger = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"
# Binary formats people save with a .csv name, and what to tell them.
_FOREIGN_MAGIC = {
    b"PK\x03\x04": "a ZIP archive (an Excel .xlsx workbook?); export the sheet as 'CSV UTF-8'",
    b"\xd0\xcf\x11\xe0": "an old Excel .xls workbook; export the sheet as 'CSV UTF-8'",
    b"\xff\xfe": "UTF-16 text; re-save it as UTF-8",
    b"\xfe\xff": "UTF-16 text; re-save it as UTF-8",
    b"PAR1": "a Parquet file; pass format='parquet' (or 'auto')",
}
_SNIFFED = (",", "\t", ";", "|")
# The header is read on its own first; a first line longer than this is not a header.
HEADER_LIMIT = 4 * 1024 * 1024
MAX_COLUMNS = 100_000
# A gzip member may expand a thousandfold; stop before memory does.
MAX_GUNZIP_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class CsvRead:
    """A parsed CSV file and where its data rows are (see ``Table.where``)."""

    frame: pd.DataFrame
    first_line: int | None
    lines: np.ndarray | None


def read_csv_bytes(raw: bytes, uri: str, delimiter: str = "auto") -> CsvRead:
    """Parse CSV bytes into a DataFrame, or raise ``DataError`` naming line and fix."""
    if raw[:2] == _GZIP_MAGIC:
        raw = gunzip(raw, uri)
    if raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM):]
    _check_text(raw, uri)
    if delimiter == "auto":
        delimiter = _sniff_delimiter(raw, uri)
    # A file of numbers without quotes is parsed first: pyarrow checks every line's
    # field count as it goes, which spares the scan its slowest pass.
    frame = _read_numeric_frame(raw, delimiter) if _plain_numbers_candidate(raw, delimiter) else None
    layout = scan_csv(raw, delimiter, uri, fields=None if frame is None else len(frame.columns))
    names = _header_names(raw, layout, delimiter, uri)
    if layout.n_records == 0:
        raise DataError(f"{uri} has a header ({_clip(', '.join(names), 120)}) but no data rows. "
                        "Add rows, or point to the full file.")
    if frame is None:
        frame = _read_frame(raw, delimiter, uri)
    frame = _drop_trailing_empty_column(frame, names, uri)
    if len(frame.columns) == 1 and delimiter == ",":
        _refuse_other_delimiter(raw, layout, uri)
    if len(frame) != layout.n_records:
        # The scan and pandas disagree on what a row is; keep the data, drop the line numbers.
        return CsvRead(frame, None, None)
    return CsvRead(frame, 2, layout.record_lines)


def gunzip(raw: bytes, uri: str, limit: int = MAX_GUNZIP_BYTES) -> bytes:
    """Decompress every gzip member of ``raw``, refusing more than ``limit`` bytes of output."""
    out = bytearray()
    data = raw
    while data:
        inflater = zlib.decompressobj(wbits=31)
        try:
            while not inflater.eof:
                chunk = inflater.decompress(data, limit + 1 - len(out))
                out += chunk
                if len(out) > limit:
                    raise DataError(
                        f"{uri} is gzip-compressed and expands to more than {limit:,} bytes. "
                        "Split it into smaller files, or use Parquet."
                    )
                data = inflater.unconsumed_tail
                if not chunk and not data:
                    break
        except zlib.error as exc:
            raise DataError(f"{uri} is gzip-compressed but corrupted ({exc}). Re-create the file.") from exc
        if not inflater.eof:
            raise DataError(f"{uri} is gzip-compressed but truncated (the stream ends early). Re-create "
                            "or re-download the file.")
        data = inflater.unused_data.lstrip(b"\x00")  # gzip allows zero padding between members
    return bytes(out)


def _check_text(raw: bytes, uri: str) -> None:
    """Refuse empty, binary and non-UTF-8 content, naming the line and character."""
    for magic, what in _FOREIGN_MAGIC.items():
        if raw.startswith(magic):
            raise DataError(f"{uri} is not CSV text: it is {what}.")
    if not raw or raw.isspace():  # stops at the first non-space byte, unlike strip() which copies
        raise DataError(f"{uri} is empty. Point to a CSV file with a header row and data rows.")
    nul = raw.find(b"\x00")
    if nul >= 0:
        line, character = locate(raw, nul)
        raise DataError(
            f"{uri}, line {line}, character {character}: a NUL byte. The file is binary or corrupted, "
            "not CSV text; re-export it as CSV (UTF-8)."
        )
    if raw.isascii():
        return
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, character = locate(raw, exc.start)
        raise DataError(
            f"{uri}, line {line}, character {character}: byte 0x{raw[exc.start]:02x} is not valid UTF-8; "
            "the file is in another encoding (often Latin-1 or Windows-1252). Re-save it as UTF-8 "
            "(e.g. `iconv -f latin1 -t utf-8`, or in Python read it with encoding='latin-1' and write "
            "it with encoding='utf-8')."
        ) from None


def _first_line(raw: bytes, uri: str) -> bytes:
    ends = [i for i in (raw.find(b"\n", 0, HEADER_LIMIT), raw.find(b"\r", 0, HEADER_LIMIT)) if i >= 0]
    if not ends and len(raw) > HEADER_LIMIT:
        raise DataError(
            f"{uri}: the first line is longer than {HEADER_LIMIT // 2**20} MiB, so it is not a header "
            "row naming the columns. Is this a CSV file? The first line must name the columns."
        )
    return raw[:min(ends)] if ends else raw


def _sniff_delimiter(raw: bytes, uri: str) -> str:
    """The delimiter the header line uses: ',' if any, else the most used of tab ; |."""
    line = re.sub(rb'"(?:[^"]|"")*"', b"", _first_line(raw, uri))  # commas in quoted names don't count
    counts = {d: line.count(d.encode()) for d in _SNIFFED}
    if counts[","]:
        return ","
    best = max(_SNIFFED[1:], key=lambda d: counts[d])
    if counts[best] == 0:
        return ","
    logger.info("%s: the header line uses %r between columns; reading it with that delimiter.", uri, best)
    return best


def _header_names(raw: bytes, layout: CsvLayout, delimiter: str, uri: str) -> list[str]:
    """The header's column names, checked: not too many, none empty or repeated, not data."""
    if layout.header_end - layout.header_start > HEADER_LIMIT:
        raise DataError(
            f"{uri}: the header row is longer than {HEADER_LIMIT // 2**20} MiB, so it is not a row "
            "naming the columns. Is this a CSV file, and is the delimiter right?"
        )
    if layout.n_fields > MAX_COLUMNS:
        raise DataError(f"{uri} has {layout.n_fields} columns; at most {MAX_COLUMNS} are supported. "
                        "Select the columns you need before saving, or use Parquet.")
    text = raw[layout.header_start:layout.header_end].decode("utf-8")
    names = next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True), [])
    header_line = locate(raw, layout.header_start)[0]
    empty = [i + 1 for i, name in enumerate(names) if not name.strip()]
    if empty and empty != [len(names)]:
        raise DataError(
            f"{uri}, line {header_line}: header column {empty[0]} has no name. Name every column in "
            "the header row."
        )
    seen: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        seen.setdefault(name, []).append(i + 1)
    repeated = {name: where for name, where in seen.items() if len(where) > 1 and name.strip()}
    if repeated:
        name, where = next(iter(repeated.items()))
        raise DataError(
            f"{uri}, line {header_line}: column name {name!r} appears {len(where)} times in the header "
            f"(columns {', '.join(map(str, where))}). Column names must be unique: rename the duplicates."
        )
    named = [name for name in names if name.strip()]
    if named and all(_looks_numeric(name) for name in named):
        raise DataError(
            f"{uri}, line {header_line}: the first row ({_clip(delimiter.join(named), 80)}) holds numbers, "
            "not column names: the file seems to have no header row. Add a first line naming the "
            "columns (e.g. x1,x2,target); pandas writes one with DataFrame.to_csv(path, index=False)."
        )
    return names


def _looks_numeric(name: str) -> bool:
    try:
        float(name)
    except ValueError:
        return False
    return any(ch.isdigit() for ch in name)


def _read_frame(raw: bytes, delimiter: str, uri: str) -> pd.DataFrame:
    try:
        return pd.read_csv(
            io.BytesIO(raw),
            sep=delimiter,
            encoding="utf-8",
            header=0,
            # The scan guarantees equal field counts; this stops pandas from ever turning
            # a first column into the index.
            index_col=False,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise DataError(f"{uri} is not a well-formed CSV file: {_clip(str(exc).strip(), 300)}") from exc


# Where pyarrow and pandas agree on a column's meaning: numbers, with pandas' NA spellings.
_ARROW_NUMERIC = ("int64", "double")
_PANDAS_NA_VALUES = sorted(pd._libs.parsers.STR_NA_VALUES)


def _plain_numbers_candidate(raw: bytes, delimiter: str) -> bool:
    """Worth handing to pyarrow before the scan: no quotes anywhere, and a header
    line of sane length and width (hostile shapes meet the scan's bounds first)."""
    if b'"' in raw:
        return False
    end = raw.find(b"\n", 0, HEADER_LIMIT)
    if end < 0:
        return False  # a first line this long is refused by the checks that follow
    return 0 < raw.count(delimiter.encode(), 0, end) < MAX_COLUMNS


def _read_numeric_frame(raw: bytes, delimiter: str) -> pd.DataFrame | None:
    """The file parsed by pyarrow if every column is int64 or float64, else ``None``.

    ``None`` hands the file to pandas: pyarrow infers types pandas does not
    (timestamps, booleans from "1"/"true" mixes, null-typed empty columns) and
    refuses lines pandas accepts (whitespace-only lines), so only the case where
    both read the same numbers is taken here.
    """
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    try:
        table = pa_csv.read_csv(
            pa.py_buffer(raw),
            read_options=pa_csv.ReadOptions(use_threads=True),
            parse_options=pa_csv.ParseOptions(delimiter=delimiter),
            convert_options=pa_csv.ConvertOptions(null_values=_PANDAS_NA_VALUES, auto_dict_encode=False),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if any(str(field.type) not in _ARROW_NUMERIC for field in table.schema):
        return None
    if any(_beyond_int64(table.column(i)) for i, field in enumerate(table.schema) if str(field.type) == "double"):
        return None
    # Columns are converted one at a time and their Arrow buffers freed as they go,
    # so the parse never holds two full copies of the data.
    return table.to_pandas(self_destruct=True, split_blocks=True)


def _beyond_int64(column: Any) -> bool:
    """Whether a float column holds magnitudes past int64, where pandas may read
    integer text as uint64 (or text) while pyarrow falls back to float64."""
    import pyarrow.compute as pa_compute

    bounds = pa_compute.min_max(column)
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    # -2**63 itself: a double that rounded there may come from text just below int64.
    return low is not None and (low <= -(2.0**63) or high >= 2.0**63)


def _drop_trailing_empty_column(frame: pd.DataFrame, names: list[str], uri: str) -> pd.DataFrame:
    """A trailing delimiter on the header and every row adds an empty, unnamed column."""
    if not names or names[-1].strip():
        return frame
    last = frame.columns[-1]
    if frame[last].notna().any():
        raise DataError(
            f"{uri}: the last column has values but no name in the header (the header line ends with "
            f"a delimiter). Name the column, or remove the trailing delimiters."
        )
    logger.info("%s: every line ends with a delimiter; ignoring the empty last column.", uri)
    return frame.drop(columns=[last])


def _refuse_other_delimiter(raw: bytes, layout: CsvLayout, uri: str) -> None:
    """A one-column read of a file whose rows use another delimiter is a wrong parse."""
    start = layout.header_end
    row = _first_line(raw[start:start + HEADER_LIMIT].lstrip(b"\r\n"), uri)
    used = [d for d in _SNIFFED[1:] if d.encode() in row]
    if used:
        raise DataError(
            f"{uri}: the header has a single column but the rows contain {used[0]!r}. If {used[0]!r} "
            f"separates the columns, use it in the header too (or pass delimiter={used[0]!r})."
        )


def _clip(text: str, limit: int) -> str:
    """Data echoed in a message is cut short: a field can be megabytes long."""
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"
