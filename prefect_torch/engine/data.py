"""Loading tabular datasets (CSV, Parquet) from a local path or any fsspec URL.

A file is either read correctly or refused with a ``DataError`` that names the
file, the line (and column or character where it applies) and the fix; CSV is
checked and parsed in ``csvread``. A loaded ``Table`` remembers which line each
row came from, so later checks (NaN, text in a numeric feature) can say where.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from prefect_torch.engine.csvread import read_csv_bytes
from prefect_torch.engine.records import Recordable
from prefect_torch.engine.spec import Spec
from prefect_torch.errors import DataError

DataFormat = Literal["auto", "csv", "parquet"]
Delimiter = Literal["auto", ",", ";", "\t", "|"]

_PARQUET_MAGIC = b"PAR1"
_GZIP_MAGIC = b"\x1f\x8b"


class LoadSpec(Spec):
    """How to read a dataset."""

    uri: str = Field(title="URI", description="Local path or fsspec URL (e.g. s3://bucket/data.csv) of the dataset.")
    format: DataFormat = Field(
        default="auto", description="File format; 'auto' decides from the file name and content."
    )
    columns: list[str] | None = Field(
        default=None, description="Columns to keep; all columns when empty."
    )
    delimiter: Delimiter = Field(
        default="auto",
        description="CSV field delimiter; 'auto' takes the one the header line uses (, tab ; or |).",
    )


@dataclass(frozen=True)
class Table(Recordable):
    """A loaded dataset and the key that identifies its content."""

    frame: pd.DataFrame
    key: str
    source: str
    # Where data rows sit in the source file, for error messages: row i is on line
    # i + first_line, unless ``lines`` lists each row's line (blank lines, quoted
    # line breaks). Both None when rows have no lines (Parquet, a DataFrame).
    first_line: int | None = field(default=None, compare=False, repr=False)
    lines: np.ndarray | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, source: str = "<DataFrame>") -> "Table":
        return cls(frame=frame, key=frame_key(frame), source=source)

    def where(self, row: int) -> str:
        """Where the data row at position ``row`` comes from, e.g. 'line 7 of data.csv'."""
        if self.lines is not None:
            return f"line {int(self.lines[row])} of {self.source}"
        if self.first_line is not None:
            return f"line {row + self.first_line} of {self.source}"
        return f"row {row + 1} of {self.source}"

    def __record__(self):
        import torch

        buffer = io.BytesIO()
        self.frame.to_parquet(buffer, index=False)
        tensors = {"parquet": torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)}
        if self.lines is not None:
            tensors["lines"] = torch.from_numpy(np.asarray(self.lines, dtype=np.int64))
        return tensors, {"key": self.key, "source": self.source, "first_line": self.first_line}

    @classmethod
    def __from_record__(cls, tensors, meta):
        frame = pd.read_parquet(io.BytesIO(tensors["parquet"].numpy().tobytes()))
        lines = tensors["lines"].numpy() if "lines" in tensors else None
        return cls(frame=frame, key=meta["key"], source=meta["source"], first_line=meta["first_line"], lines=lines)


def frame_key(frame: pd.DataFrame) -> str:
    """Content key of an in-memory DataFrame, with pandas' vectorised hashing."""
    digest = hashlib.sha256()
    digest.update("\x1f".join(map(str, frame.columns)).encode())
    digest.update("\x1f".join(map(str, frame.dtypes)).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return "frame-" + digest.hexdigest()[:32]


def load_table(spec: LoadSpec, storage_options: dict[str, Any] | None = None) -> Table:
    """Read ``spec.uri`` into a DataFrame, keyed by the file's bytes."""
    raw = _read_bytes(spec.uri, storage_options)
    key = "sha256-" + hashlib.sha256(raw).hexdigest()[:32]
    fmt = _detect_format(spec.uri, spec.format, raw)
    if fmt == "parquet":
        table = Table(frame=_parse_parquet(raw, spec.uri), key=key, source=spec.uri)
    else:
        read = read_csv_bytes(raw, spec.uri, spec.delimiter)
        table = Table(read.frame, key, spec.uri, read.first_line, read.lines)
    if spec.columns:
        missing = [c for c in spec.columns if c not in table.frame.columns]
        if missing:
            raise DataError(
                f"Columns {missing} are not in {spec.uri}. Its columns are: {list(table.frame.columns)}."
            )
        table = Table(table.frame[spec.columns], table.key, table.source, table.first_line, table.lines)
    return table


def _read_bytes(uri: str, storage_options: dict[str, Any] | None) -> bytes:
    if "://" not in uri:
        path = Path(uri).expanduser()
        if not path.exists():
            raise DataError(f"Dataset file not found: {uri}. Check the path (relative to {Path.cwd()}).")
        if path.is_dir():
            raise DataError(f"{uri} is a folder; pass the path of a .csv or .parquet file inside it.")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise DataError(f"Cannot read {uri}: {exc.strerror}. Check its permissions.") from exc
    import fsspec

    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as handle:
            return handle.read()
    except FileNotFoundError as exc:
        raise DataError(f"Dataset not found: {uri}. Check the URL and that the object exists.") from exc
    except (OSError, ValueError, ImportError) as exc:
        raise DataError(f"Cannot read {uri}: {exc}. Check the URL, endpoint and credentials.") from exc


def _detect_format(uri: str, declared: str, raw: bytes) -> str:
    if declared != "auto":
        return declared
    name = uri.lower()
    if raw[:4] == _PARQUET_MAGIC or name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz", ".txt", ".tsv")) or raw[:2] == _GZIP_MAGIC:
        return "csv"
    raise DataError(
        f"Cannot tell the format of {uri}: it is neither CSV nor Parquet by name or content. "
        "Pass format='csv' or format='parquet' (CLI: --format)."
    )


# --- Parquet -------------------------------------------------------------------


def _parse_parquet(raw: bytes, uri: str) -> pd.DataFrame:
    """Read Parquet bytes. Corruption is caught where the format allows: a missing
    end marker (truncation), an unreadable footer or page, and page checksums when
    the writer stored them (pyarrow's write_page_checksum=True); an uncompressed page
    without a checksum can be damaged undetectably."""
    if raw[:4] != _PARQUET_MAGIC or raw[-4:] != _PARQUET_MAGIC:
        state = "is empty" if not raw else "does not start and end with the Parquet marker 'PAR1'"
        raise DataError(
            f"{uri} is not a readable Parquet file: it {state}, so it is truncated, corrupted or "
            "not Parquet. Re-export it (DataFrame.to_parquet), or pass format='csv' if it is CSV."
        )
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(io.BytesIO(raw)).names
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if not duplicated:
            frame = pd.read_parquet(io.BytesIO(raw), page_checksum_verification=True)
    except Exception as exc:  # pyarrow raises many types for corrupt files
        detail = " ".join(str(exc).split())[:200]
        raise DataError(
            f"{uri} is not a readable Parquet file ({type(exc).__name__}: {detail}). "
            "It is truncated or corrupted; re-export it."
        ) from exc
    if duplicated:
        raise DataError(f"{uri} has duplicate column names {duplicated}. Rename them so each is unique.")
    if frame.empty:
        raise DataError(f"{uri} has no data rows. Point to a file with data.")
    return frame
