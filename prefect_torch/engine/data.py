"""Loading tabular datasets (CSV, Parquet) from a local path or any fsspec URL.

A file is either read correctly or refused with a ``DataError`` that names the
file, the line (and column or character where it applies) and the fix; CSV is
checked and parsed in ``csvread``. A loaded ``Table`` remembers which line each
row came from, so later checks (NaN, text in a numeric feature) can say where.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from prefect_torch.engine.csvread import read_csv_bytes
from prefect_torch.engine import prefetch
from prefect_torch.engine.fingerprint import (
    content_key, drop_bytes, is_remembered, remember, take_bytes, unchanged_since,
)
from prefect_torch.engine.peek import check_parquet_markers, detect_format, unreadable_parquet
from prefect_torch.engine.records import Recordable
from prefect_torch.engine.spec import Spec
from prefect_torch.errors import DataError

DataFormat = Literal["auto", "csv", "parquet"]
Delimiter = Literal["auto", ",", ";", "\t", "|"]


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


class Table(Recordable):
    """A loaded dataset and the key that identifies its content.

    A table read from a file or object (``load_table``) is persisted as a reference:
    the source's URI, content key, format and columns, never a copy of the rows. A
    table re-created from that reference reads its rows lazily, the first time
    ``frame`` is used, and refuses a source whose content no longer matches the key.
    A table of a DataFrame passed from Python persists its content (as Parquet).
    """

    def __init__(
        self,
        frame: pd.DataFrame | None = None,
        key: str = "",
        source: str = "",
        first_line: int | None = None,
        lines: np.ndarray | None = None,
        *,
        ref: dict[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if frame is None and ref is None:
            raise ValueError("A Table needs a frame or a reference to its source.")
        self._frame = frame
        self.key = key
        self.source = source
        # Where data rows sit in the source file, for error messages: row i is on line
        # i + first_line, unless ``lines`` lists each row's line (blank lines, quoted
        # line breaks). Both None when rows have no lines (Parquet, a DataFrame).
        self._first_line = first_line
        self._lines = lines
        self.ref = ref
        self._storage_options = storage_options

    def __repr__(self) -> str:
        state = "loaded" if self._frame is not None else "not loaded"
        return f"Table(key={self.key!r}, source={self.source!r}, {state})"

    @property
    def loaded(self) -> bool:
        """Whether the rows are in memory (a table from a reference loads on first use)."""
        return self._frame is not None

    @property
    def frame(self) -> pd.DataFrame:
        if self._frame is None:
            self._load()
        return self._frame  # type: ignore[return-value]

    @property
    def first_line(self) -> int | None:
        if self._frame is None:
            self._load()
        return self._first_line

    @property
    def lines(self) -> np.ndarray | None:
        if self._frame is None:
            self._load()
        return self._lines

    @property
    def columns(self) -> list[str]:
        """Column names, without loading the rows."""
        if self._frame is None and self.ref is not None:
            return list(self.ref["names"])
        return [str(c) for c in self.frame.columns]

    def _load(self) -> None:
        ref = self.ref or {}
        spec = LoadSpec(uri=ref["uri"], format=ref["format"], columns=ref.get("columns"),
                        delimiter=ref.get("delimiter", "auto"))
        loaded = load_table(spec, self._storage_options, source=self.source)
        if loaded.key != self.key:
            raise DataError(
                f"{self.source} changed since it was loaded (its content key is now {loaded.key}, "
                f"was {self.key}). Run the flow again: Data Load reads the new content."
            )
        self._frame, self._first_line, self._lines = loaded._frame, loaded._first_line, loaded._lines

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
        if self.ref is not None:
            return {}, {"key": self.key, "source": self.source, "ref": self.ref}
        import torch

        buffer = io.BytesIO()
        self.frame.to_parquet(buffer, index=False)
        tensors = {"parquet": torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)}
        if self.lines is not None:
            tensors["lines"] = torch.from_numpy(np.asarray(self.lines, dtype=np.int64))
        return tensors, {"key": self.key, "source": self.source, "first_line": self.first_line}

    @classmethod
    def __from_record__(cls, tensors, meta):
        if "ref" in meta:
            ref = meta["ref"]
            if not isinstance(ref, dict) or not {"uri", "format", "names"} <= set(ref):
                raise ValueError(f"malformed dataset reference {ref!r}")
            return cls(key=meta["key"], source=meta["source"], ref=ref)
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


def load_table(
    spec: LoadSpec,
    storage_options: dict[str, Any] | None = None,
    fingerprint_cache: str | Path | None = None,
    source: str | None = None,
) -> Table:
    """Read ``spec.uri`` into a DataFrame, keyed by the file's bytes (read once: the
    same bytes are hashed and parsed). The table remembers how to read the source
    again, so its persisted record is a reference, not a copy.

    ``fingerprint_cache`` is the folder of remembered file fingerprints (see
    ``fingerprint``): the key computed here is remembered there."""
    source = source or spec.uri
    early = _take_early_read(spec) if storage_options is None and source == spec.uri else None
    if early is not None:
        stat, key, table = early
        remember(_local(spec.uri), stat, key, fingerprint_cache)
        return table
    raw, stat = _read_bytes(spec.uri, storage_options)
    key = content_key(raw)
    if stat is not None:
        remember(_local(spec.uri), stat, key, fingerprint_cache)
    return _parse(spec, raw, key, stat, source, storage_options)


def _parse(spec: LoadSpec, raw: bytes, key: str, stat: os.stat_result | None, source: str,
           storage_options: dict[str, Any] | None) -> Table:
    fmt = detect_format(spec.uri, spec.format, raw)
    if fmt == "parquet":
        frame, first_line, lines = _parse_parquet(raw, source), None, None
    else:
        read = read_csv_bytes(raw, source, spec.delimiter)
        frame, first_line, lines = read.frame, read.first_line, read.lines
    del raw
    if spec.columns:
        missing = [c for c in spec.columns if c not in frame.columns]
        if missing:
            raise DataError(
                f"Columns {missing} are not in {source}. Its columns are: {list(frame.columns)}."
            )
        frame = frame[spec.columns]
    uri = str(_local(spec.uri).resolve()) if stat is not None else spec.uri
    ref = {"uri": uri, "format": fmt, "columns": spec.columns, "delimiter": spec.delimiter,
           "names": [str(c) for c in frame.columns], "rows": int(len(frame))}
    return Table(frame, key, source, first_line, lines, ref=ref, storage_options=storage_options)


def start_loading(spec: LoadSpec, fingerprint_cache: str | Path | None,
                  then: Callable[[Table, int], None] | None = None) -> bool:
    """Start reading ``spec``'s local file in a background thread (``prefetch``), for the
    ``load_table`` that follows in this process; whether it started.

    Only a file whose fingerprint is not remembered (in ``fingerprint_cache``) in its
    current state is read: one the cache has not seen, whose Data Load is no cache hit.
    A file the cache knows is left alone, so a rerun that changes only the model
    still never reads it.

    ``then(table, generation)`` runs in the reading thread once the table is parsed
    (``split.start_splitting`` starts the Data Split's work there); it must not import,
    and ``generation`` is the ``prefetch`` mark of this read's start."""
    if not _is_local(spec.uri):
        return False
    path = _local(spec.uri)
    if not path.is_file() or is_remembered(path, fingerprint_cache):
        return False
    # The thread must not import (see ``prefetch``): what the parse uses is imported here.
    import pyarrow  # noqa: F401
    import pyarrow.compute  # noqa: F401
    import pyarrow.csv  # noqa: F401
    import pyarrow.dataset  # noqa: F401  (pyarrow.parquet's read_table imports it on first use)
    import pyarrow.pandas_compat  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    real = path.resolve()
    generation = prefetch.generation()
    prefetch.start(str(real), lambda: _read_early(spec, path, then, generation))
    return True


def _read_early(spec: LoadSpec, path: Path, then: Callable[[Table, int], None] | None,
                generation: int) -> tuple[LoadSpec, os.stat_result, str, Table]:
    # A file written to while read is not in the state ``before`` when the card comes to
    # take this read: it is not taken then, nor remembered here.
    before = path.stat()
    raw = path.read_bytes()
    key = content_key(raw)
    remember(path, before, key, None)  # this process's fingerprint; the card stores it on disk
    table = _parse(spec, raw, key, before, spec.uri, None)
    if then is not None:
        try:
            then(table, generation)
        except Exception:  # noqa: BLE001 - what follows the read is optional; the read is not lost
            pass
    return spec, before, key, table


def _take_early_read(spec: LoadSpec) -> tuple[os.stat_result, str, Table] | None:
    """The table ``start_loading`` read for this same spec, if the file is still in the
    state it was read in."""
    if not _is_local(spec.uri):
        return None
    path = _local(spec.uri)
    try:
        early = prefetch.take(str(path.resolve()))
    except OSError:
        return None
    if early is None:
        return None
    read_spec, before, key, table = early
    if read_spec != spec or not unchanged_since(path, before):
        return None
    return before, key, table


def drop_early_reads(kept_for: Table | None = None) -> None:
    """Let go of what was read for a Data Load that did not need it (a cache hit): the
    bytes its fingerprint kept and any table ``start_loading`` read. Work begun on the
    table Data Load returned (``kept_for``: an early split of it) is kept."""
    drop_bytes()
    prefetch.discard(keep_following=kept_for)


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _local(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser()


def _read_bytes(uri: str, storage_options: dict[str, Any] | None) -> tuple[bytes, os.stat_result | None]:
    """The bytes at ``uri``, and for a local file its state before the read."""
    if _is_local(uri):
        path = _local(uri)
        if not path.exists():
            raise DataError(f"Dataset file not found: {uri}. Check the path (relative to {Path.cwd()}).")
        if path.is_dir():
            raise DataError(f"{uri} is a folder; pass the path of a .csv or .parquet file inside it.")
        try:
            stat = path.stat()
            shared = take_bytes(path, stat)  # the fingerprint just read them: no second read
            return (shared if shared is not None else path.read_bytes()), stat
        except OSError as exc:
            raise DataError(f"Cannot read {uri}: {exc.strerror}. Check its permissions.") from exc
    import fsspec

    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as handle:
            return handle.read(), None
    except FileNotFoundError as exc:
        raise DataError(f"Dataset not found: {uri}. Check the URL and that the object exists.") from exc
    except (OSError, ValueError, ImportError) as exc:
        raise DataError(f"Cannot read {uri}: {exc}. Check the URL, endpoint and credentials.") from exc


# --- Parquet -------------------------------------------------------------------


def _parse_parquet(raw: bytes, uri: str) -> pd.DataFrame:
    """Read Parquet bytes. Corruption is caught where the format allows: a missing
    end marker (truncation), an unreadable footer or page, and page checksums when
    the writer stored them (pyarrow's write_page_checksum=True); an uncompressed page
    without a checksum can be damaged undetectably."""
    check_parquet_markers(uri, raw[:4], raw[-4:], len(raw))
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(io.BytesIO(raw)).names
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if not duplicated:
            # Straight from Arrow, one block per column: float32 stays float32 and numeric
            # columns without nulls are not copied again (self_destruct frees Arrow's
            # buffers as they are handed over).
            import pyarrow as pa

            arrow = pq.read_table(pa.BufferReader(raw), page_checksum_verification=True)
            frame = arrow.to_pandas(split_blocks=True, self_destruct=True)
            del arrow
    except Exception as exc:  # pyarrow raises many types for corrupt files
        raise unreadable_parquet(uri, exc) from exc
    if duplicated:
        raise DataError(f"{uri} has duplicate column names {duplicated}. Rename them so each is unique.")
    if frame.empty:
        raise DataError(f"{uri} has no data rows. Point to a file with data.")
    return frame
