"""Cheap checks of a dataset before anything expensive starts.

``check_columns`` looks at a local file's name, its first bytes and its column
names only (a CSV's header line, a Parquet file's schema from its footer), so a
missing file, an unreadable format or a missing target or feature column is
reported in milliseconds, before a Prefect server starts or the data is read.
It is conservative: whatever it cannot judge from that much (remote URLs, a
header it cannot parse with confidence) it leaves to ``load_table`` and
``split_table``, which check everything when the flow runs. Its messages match
theirs.

This module imports neither torch nor Prefect.
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from pathlib import Path

from prefect_torch.errors import DataError

_PARQUET_MAGIC = b"PAR1"
_GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"
_HEADER_BYTES = 1 << 20
_DELIMITERS = (",", "\t", ";", "|")


def check_columns(
    uri: str, target: str | None = None, features: list[str] | None = None, fmt: str = "auto"
) -> list[str] | None:
    """Raise ``DataError`` if ``uri`` surely cannot give ``target`` and ``features``.

    Returns the column names read, or ``None`` when the source is not a
    local file or its columns cannot be told cheaply.
    """
    if "://" in uri:
        return None
    path = Path(uri).expanduser()
    if not path.exists():
        raise DataError(f"Dataset file not found: {uri}. Check the path (relative to {Path.cwd()}).")
    if path.is_dir():
        raise DataError(f"{uri} is a folder; pass the path of a .csv or .parquet file inside it.")
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEADER_BYTES)
    except OSError as exc:
        raise DataError(f"Cannot read {uri}: {exc.strerror}. Check its permissions.") from exc
    columns = _columns(path, uri, head, detect_format(uri, fmt, head))
    if columns is None:
        return None
    if target is not None and target not in columns:
        raise DataError(
            f"Target column {target!r} is not in the data. Available columns: {columns}. "
            "Pass the right name with target=... (CLI: --target)."
        )
    missing = [name for name in features or [] if name not in columns]
    if missing:
        raise DataError(f"Feature columns {missing} are not in the data. Available columns: {columns}.")
    return columns


def detect_format(uri: str, declared: str, head: bytes) -> str:
    """'csv' or 'parquet': the declared format, else from the file name and its first bytes."""
    if declared != "auto":
        return declared
    name = uri.lower()
    if head[:4] == _PARQUET_MAGIC or name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz", ".txt", ".tsv")) or head[:2] == _GZIP_MAGIC:
        return "csv"
    raise DataError(
        f"Cannot tell the format of {uri}: it is neither CSV nor Parquet by name or content. "
        "Pass format='csv' or format='parquet' (CLI: --format)."
    )


def _columns(path: Path, uri: str, head: bytes, fmt: str) -> list[str] | None:
    if fmt == "parquet":
        return _parquet_columns(path, uri, head)
    return _csv_columns(uri, head)


def check_parquet_markers(uri: str, head: bytes, tail: bytes, size: int) -> None:
    """Refuse a file that does not start and end with 'PAR1': truncated, corrupted or not Parquet."""
    if head[:4] != _PARQUET_MAGIC or tail != _PARQUET_MAGIC:
        state = "is empty" if size == 0 else "does not start and end with the Parquet marker 'PAR1'"
        raise DataError(
            f"{uri} is not a readable Parquet file: it {state}, so it is truncated, corrupted or "
            "not Parquet. Re-export it (DataFrame.to_parquet), or pass format='csv' if it is CSV."
        )


def unreadable_parquet(uri: str, exc: Exception) -> DataError:
    """The error for a Parquet file pyarrow could not read (its footer or a page)."""
    detail = " ".join(str(exc).split())[:200]
    return DataError(
        f"{uri} is not a readable Parquet file ({type(exc).__name__}: {detail}). "
        "It is truncated or corrupted; re-export it."
    )


def _parquet_columns(path: Path, uri: str, head: bytes) -> list[str]:
    import pyarrow.parquet as pq

    size = path.stat().st_size
    with open(path, "rb") as handle:
        handle.seek(max(size - 4, 0))
        tail = handle.read(4)
    check_parquet_markers(uri, head, tail, size)
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises many types for corrupt footers
        raise unreadable_parquet(uri, exc) from exc
    metadata = schema.pandas_metadata or {}
    index = {name for name in metadata.get("index_columns", []) if isinstance(name, str)}
    return [name for name in schema.names if name not in index]


def _csv_columns(uri: str, head: bytes) -> list[str] | None:
    if head[:2] == _GZIP_MAGIC:
        try:
            head = gzip.GzipFile(fileobj=io.BytesIO(head)).read1(_HEADER_BYTES)  # type: ignore[attr-defined]
        except (OSError, EOFError, zlib.error):
            return None  # a truncated head of a large archive: the loader decides
    if head.startswith(_UTF8_BOM):
        head = head[len(_UTF8_BOM):]
    if not head or head.isspace():
        raise DataError(f"{uri} is empty. Point to a CSV file with a header row and data rows.")
    ends = [i for i in (head.find(b"\n"), head.find(b"\r")) if i >= 0]
    if not ends:
        return None  # a header longer than we read, or a file of one line: the loader decides
    line = head[: min(ends)]
    if b"\x00" in line or line.count(b'"') % 2:
        return None  # binary, or a quoted name spanning lines: the loader names the problem
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None
    unquoted = "".join(text.split('"')[::2])
    delimiter = "," if "," in unquoted else max(_DELIMITERS[1:], key=unquoted.count)
    if delimiter not in unquoted:
        delimiter = ","  # one column, or a delimiter the loader will name
    names = next(csv.reader([text], delimiter=delimiter), [])
    if names and not names[-1].strip():
        names = names[:-1]  # a trailing delimiter, which the loader drops too
    return names or None
