"""Turning a table into train / validation / test tensors.

Features are standardised with statistics fitted on the train split only, and
everything is converted to tensors once, here, so no later step touches pandas.
"""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
from pydantic import Field, model_validator

from prefect_torch.engine import prefetch
from prefect_torch.engine.data import Table
from prefect_torch.engine.records import Recordable
from prefect_torch.engine.problem import ProblemChoice, ProblemType, resolve_problem
from prefect_torch.engine.spec import Spec
from prefect_torch.engine.tensorfile import StagedFile, map_tensor_file, stage_tensor_file, write_tensor_file
from prefect_torch.errors import DataError

SPLIT_NAMES = ("train", "val", "test")


class SplitSpec(Spec):
    """Which columns to learn from and how to divide the rows."""

    target: str = Field(description="Name of the column to predict.")
    features: list[str] | None = Field(
        default=None, description="Feature columns; every column but the target when empty."
    )
    problem: ProblemChoice = Field(
        default="auto",
        description="regression, binary or multiclass; 'auto' infers it from the target column.",
    )
    val_fraction: float = Field(default=0.15, ge=0.0, lt=1.0, description="Share of rows for validation.")
    test_fraction: float = Field(default=0.15, ge=0.0, lt=1.0, description="Share of rows for the test split.")
    seed: int = Field(default=0, ge=0, description="Seed of the row shuffle.")
    stratify: bool = Field(
        default=True, description="Keep class proportions in every split (classification only)."
    )
    standardize: bool = Field(
        default=True, description="Scale features (and a regression target) with train-split statistics."
    )

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self) -> "SplitSpec":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be below 1 to leave rows for training; "
                f"got {self.val_fraction} + {self.test_fraction}."
            )
        return self


@dataclass
class DatasetInfo:
    """Everything needed to turn raw rows into model inputs and back (JSON-able)."""

    target: str
    features: list[str]
    problem: ProblemType
    classes: list[Any] | None
    feature_mean: list[float]
    feature_std: list[float]
    target_mean: float | None
    target_std: float | None
    data_key: str
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.problem == "multiclass" and self.classes else 1

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DatasetInfo":
        return cls(**data)

    def encode_features(self, frame: pd.DataFrame) -> torch.Tensor:
        """Standardised feature tensor for new rows (prediction, evaluation)."""
        missing = [c for c in self.features if c not in frame.columns]
        if missing:
            raise DataError(
                f"The data lacks feature columns the model was trained on: {missing}. "
                "Provide them with the same names."
            )
        _check_features(frame, self.features)  # NaN or text would give silently wrong predictions
        values = _numeric_features(frame, self.features)
        mean = np.asarray(self.feature_mean, dtype=np.float64)
        std = np.asarray(self.feature_std, dtype=np.float64)
        return torch.from_numpy(((values - mean) / std).astype(np.float32))

    def encode_target(self, target: pd.Series) -> torch.Tensor:
        _check_finite_target(target)
        if self.problem == "regression":
            values = pd.to_numeric(target, errors="raise").to_numpy(dtype=np.float64)
            if self.target_mean is not None:
                values = (values - self.target_mean) / self.target_std
            return torch.from_numpy(values.astype(np.float32)).reshape(-1, 1)
        index = {label: i for i, label in enumerate(self.classes or [])}
        unseen = sorted({_py(v) for v in target.tolist()} - set(index), key=str)
        if unseen:
            raise DataError(
                f"Target column {self.target!r} has labels the model never saw in training: "
                f"{unseen[:10]}. Known labels: {(self.classes or [])[:20]}."
            )
        codes = np.fromiter((index[_py(v)] for v in target.tolist()), dtype=np.int64, count=len(target))
        if self.problem == "binary":
            return torch.from_numpy(codes.astype(np.float32)).reshape(-1, 1)
        return torch.from_numpy(codes)

    def decode_regression(self, outputs: torch.Tensor) -> torch.Tensor:
        """Model outputs back in the target's original units."""
        values = outputs.reshape(-1).double()
        if self.target_mean is not None:
            values = values * self.target_std + self.target_mean
        return values


@dataclass
class TensorSplit:
    X: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def to(self, device: torch.device) -> "TensorSplit":
        if self.X.device == device:
            return self
        return TensorSplit(self.X.to(device, non_blocking=True), self.y.to(device, non_blocking=True))


@dataclass
class Splits(Recordable):
    """Train / validation / test tensors and the dataset's metadata."""

    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    info: DatasetInfo
    key: str = ""
    # Where the tensors are stored (a tensorfile reference), once they are.
    stored: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    # The tensor file written ahead (``stage``) for ``store`` to rename into place.
    staged: StagedFile | None = field(default=None, compare=False, repr=False)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The split tensors by name ('train.X', 'train.y', ...)."""
        tensors = {}
        for name in SPLIT_NAMES:
            part = getattr(self, name)
            tensors[f"{name}.X"] = part.X
            tensors[f"{name}.y"] = part.y
        return tensors

    def stage(self, folder: str | Path) -> "Splits":
        """Write the tensor file ahead, under a temporary name in the local ``folder``, for
        ``store`` to rename into place: the CLI's early split does this in the background
        while Prefect starts. The file goes when this object does, if nobody stored it."""
        staged = stage_tensor_file(folder, self.tensors())
        weakref.finalize(self, staged.discard)
        self.staged = staged
        return self

    def discard_staged(self) -> None:
        """Remove the file ``stage`` wrote, if ``store`` did not take it."""
        staged, self.staged = self.staged, None
        if staged is not None:
            staged.discard()

    def store(self, folder: str, fs: Any = None, cache_dir: Any = None, upload: Any = None) -> "Splits":
        """Write the tensors once, uncompressed, as a safetensors file in ``folder``
        (named by the split's key and checksum); from then on this object's record is
        a small reference to that file, and reading it back maps the file. A file
        ``stage`` wrote is renamed into place instead."""
        staged, self.staged = self.staged, None
        self.stored = write_tensor_file(
            folder, self.key or "split", self.tensors(), fs=fs, cache_dir=cache_dir, upload=upload, staged=staged
        )
        return self

    def __record__(self):
        meta = {"info": self.info.to_dict(), "key": self.key}
        if self.stored is not None:
            return {}, {**meta, "tensors": self.stored}
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.tensors().items()}
        return tensors, meta

    @classmethod
    def __from_record__(cls, tensors, meta):
        stored = meta.get("tensors")
        if stored is not None:
            tensors = map_tensor_file(stored)
        parts = {name: TensorSplit(tensors[f"{name}.X"], tensors[f"{name}.y"]) for name in SPLIT_NAMES}
        return cls(**parts, info=DatasetInfo.from_dict(meta["info"]), key=meta["key"], stored=stored)

    def __getitem__(self, name: str) -> TensorSplit:
        if name not in SPLIT_NAMES:
            raise DataError(f"Unknown split {name!r}. Use one of: {', '.join(SPLIT_NAMES)}.")
        return getattr(self, name)


def split_table(table: Table | pd.DataFrame, spec: SplitSpec) -> Splits:
    """Validate the columns, divide the rows and build standardised tensors."""
    if isinstance(table, pd.DataFrame):
        table = Table.from_frame(table)
    frame = table.frame
    features = _choose_features(frame, spec)
    _check_features(frame, features, table.where)
    target = frame[spec.target]
    _check_finite_target(target, table.where)
    problem = resolve_problem(spec.problem, target)
    classes = _classes(target, problem)

    parts = _assign_rows(target, problem, classes, spec)
    # The matrix lives on only where a split reads from it (float64 data).
    rows = _FeatureMatrix(frame, features).split(parts)
    if spec.standardize:
        mean, std = _column_stats(rows["train"])
        std = np.where(std > 0, std, 1.0)
    else:
        mean, std = np.zeros(len(features)), np.ones(len(features))

    target_mean = target_std = None
    if problem == "regression" and spec.standardize:
        train_target = pd.to_numeric(target, errors="raise").to_numpy(dtype=np.float64)[parts["train"]]
        target_mean = float(train_target.mean())
        target_std = float(train_target.std()) or 1.0

    info = DatasetInfo(
        target=spec.target,
        features=features,
        problem=problem,
        classes=classes,
        feature_mean=[float(v) for v in mean],
        feature_std=[float(v) for v in std],
        target_mean=target_mean,
        target_std=target_std,
        data_key=table.key,
        rows={name: int(len(idx)) for name, idx in parts.items()},
    )
    y_all = info.encode_target(target)
    splits = {
        name: TensorSplit(rows[name].standardized(mean, std), y_all[torch.from_numpy(idx)])
        for name, idx in parts.items()
    }
    del rows
    key = _splits_key(table.key, spec)
    return Splits(**splits, info=info, key=key)


def start_splitting(table: Table, spec: SplitSpec, unless_discarded_since: int | None = None,
                    stage_in: str | Path | None = None) -> bool:
    """Split ``table`` in a background thread (``prefetch``) for the Data Split card that
    follows in this process; whether it started. The CLI starts it as soon as its early
    read has parsed the file, so the split's arithmetic, which mostly releases the GIL,
    runs while Prefect is imported and the flow run starts. With ``stage_in`` (a local
    folder) the tensor file is written and fsynced there too (``Splits.stage``), which
    the card then only renames into its storage. ``split_table`` and ``stage`` import
    nothing on their way, as a prefetch job must not."""

    def work() -> Splits:
        splits = split_table(table, spec)
        if stage_in is not None:
            try:
                splits.stage(stage_in)
            except OSError:
                pass  # no room or no right to write there: the card writes the file itself
        return splits

    return prefetch.start(_early_split_name(table, spec), work, follows=table,
                          unless_discarded_since=unless_discarded_since)


def take_early_split(table: Table | pd.DataFrame, spec: SplitSpec) -> Splits | None:
    """The Splits ``start_splitting`` made of this very table object with this spec (the
    Data Load card handed on the early read's table), once done; ``None`` otherwise, at
    once. A failed early split is ``None`` too: the card splits and meets the error itself."""
    if not isinstance(table, Table):
        return None
    return prefetch.take(_early_split_name(table, spec))


def _early_split_name(table: Table, spec: SplitSpec) -> str:
    # The job holds the table, so while it waits to be taken no other object has its id.
    return f"split-{id(table)}-{spec.model_dump_json()}"


def _splits_key(data_key: str, spec: SplitSpec) -> str:
    payload = json.dumps({"data": data_key, "spec": spec.model_dump(mode="json")}, sort_keys=True)
    return "split-" + hashlib.sha256(payload.encode()).hexdigest()[:32]


def _choose_features(frame: pd.DataFrame, spec: SplitSpec) -> list[str]:
    columns = [str(c) for c in frame.columns]
    if spec.target not in frame.columns:
        raise DataError(
            f"Target column {spec.target!r} is not in the data. Available columns: {columns}. "
            "Pass the right name with target=... (CLI: --target)."
        )
    if spec.features:
        missing = [c for c in spec.features if c not in frame.columns]
        if missing:
            raise DataError(f"Feature columns {missing} are not in the data. Available columns: {columns}.")
        if spec.target in spec.features:
            raise DataError(f"The target {spec.target!r} cannot also be a feature; remove it from features.")
        return list(spec.features)
    features = [c for c in frame.columns if c != spec.target]
    if not features:
        raise DataError(
            f"The data has no feature columns: its only column is the target {spec.target!r}. "
            "Add input columns to the file."
        )
    return features


def _data_row(row: int) -> str:
    return f"data row {row + 1}"


def _check_features(
    frame: pd.DataFrame, features: list[str], where: Callable[[int], str] = _data_row
) -> None:
    """Refuse text, missing and infinite feature values, naming the column and the line
    (``where`` turns a row position into 'line 7 of data.csv')."""
    non_numeric = {}
    for column in features:
        series = frame[column]
        if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
            continue
        # Text columns whose every value is a number (e.g. integers too big for int64) are fine.
        bad = pd.to_numeric(series, errors="coerce").isna().to_numpy() & series.notna().to_numpy()
        if bad.any():
            non_numeric[column] = int(np.flatnonzero(bad)[0])
    if non_numeric:
        column, row = next(iter(non_numeric.items()))
        raise DataError(
            f"Feature columns must be numeric; these are not: {list(non_numeric)[:10]}. Column "
            f"{column!r} has {_clip(frame[column].iloc[row])} at {where(row)}. Encode such columns as "
            "numbers (e.g. pandas.get_dummies for categories) or leave them out with features=[...] "
            "(CLI: --features)."
        )
    if all(_column_finite(frame[column]) for column in features):
        return
    # Something is missing or infinite: find the first one, in row order, for the message.
    values = frame[features].to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        counts = {features[i]: int(n) for i, n in enumerate(bad.sum(axis=0)) if n}
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        col = int(np.flatnonzero(bad[row])[0])
        kind = ("is empty or NaN" if np.isnan(values[row, col]) else
                f"is {values[row, col]} (infinite, or a number too large for float64 such as 1e400)")
        raise DataError(
            f"Feature column {features[col]!r} {kind} at {where(row)} (rows affected per column: "
            f"{counts}). Drop those rows (DataFrame.dropna) or fill them (DataFrame.fillna) before "
            "training."
        )


def _column_finite(series: pd.Series) -> bool:
    """Whether every value of a numeric column is finite (one column at a time, so no
    float64 copy of the whole table is made)."""
    if series.dtype.kind in "fc":
        return bool(np.isfinite(series.to_numpy()).all())
    if series.dtype.kind in "iub" and not series.hasnans:
        return True
    return bool(np.isfinite(series.to_numpy(dtype=np.float64, na_value=np.nan)).all())


def _check_finite_target(target: pd.Series, where: Callable[[int], str] = _data_row) -> None:
    missing = int(target.isna().sum())
    if missing:
        first = int(np.flatnonzero(target.isna().to_numpy())[0])
        raise DataError(
            f"Target column {target.name!r} has {missing} missing values (first at {where(first)}). "
            "Drop those rows before training."
        )
    if pd.api.types.is_numeric_dtype(target) and not pd.api.types.is_bool_dtype(target):
        values = target.to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            first = int(np.flatnonzero(~np.isfinite(values))[0])
            raise DataError(
                f"Target column {target.name!r} has infinite values (first at {where(first)}). "
                "Drop or fix those rows."
            )


def _clip(value: Any, limit: int = 60) -> str:
    """A data value for a message: repr'd and cut short (a field can be megabytes long)."""
    value = _py(value)
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"… ({len(value)} characters)"
    return repr(value)


def _numeric_features(frame: pd.DataFrame, features: list[str]) -> np.ndarray:
    """The feature values as one array: float32 when every feature column is float32
    (exact, and half the memory), float64 otherwise."""
    if all(frame[c].dtype == np.float32 for c in features):
        return frame[features].to_numpy(dtype=np.float32)
    return frame[features].to_numpy(dtype=np.float64, na_value=np.nan)


# Bytes of a float64 block when standardising: the work stays this size whatever the
# data size, and a split is a few dozen numpy operations (each one, on the background
# split, waits for the GIL as a transpose chunk does).
_BLOCK_BYTES = 32 << 20


# Bytes of the matrix filled per chunk of rows. Each chunk is two torch copies made
# without the GIL (the columns stacked, then transposed into place in cache-sized
# tiles): the split runs on a background thread while the main thread imports Prefect,
# and every time a copy hands the GIL back it waits for the main thread's switch
# interval (5 ms). Copying column by column took it back once per column per megabyte
# (at 1M x 64, a 1.4 s split took about 4 s beside the import).
_TRANSPOSE_BYTES = 64 << 20
_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


class _FeatureMatrix:
    """The feature values as one row-major matrix: float32 when every feature is float32
    (exact, as Parquet data usually is), float64 otherwise (the numbers
    ``_numeric_features`` gives).

    A split's rows are whole rows of it, read in one sequential run each, instead of
    one random read per value from every column. ``split`` of float32 data gathers the
    rows once into the split's float32 tensor, which the statistics and the
    standardising then work on in place."""

    def __init__(self, frame: pd.DataFrame, features: list[str]):
        self.float32 = all(frame[c].dtype == np.float32 for c in features)
        dtype = np.dtype(np.float32 if self.float32 else np.float64)
        columns = [
            _tensor_to_read(
                frame[c].to_numpy() if frame[c].dtype == dtype else frame[c].to_numpy(dtype=dtype, na_value=np.nan)
            )
            for c in features
        ]
        self.width = len(features)
        # Allocated by torch: numpy asks the kernel for huge pages for large arrays, and
        # where it compacts memory for them on demand (THP defrag "madvise", a common
        # default) the first write to a new array can cost several times the copy.
        matrix = torch.empty((len(frame), self.width), dtype=_TORCH_DTYPES[dtype])
        step = max(1, _TRANSPOSE_BYTES // max(1, self.width * dtype.itemsize))
        for start in range(0, len(frame), step):
            rows = slice(start, start + step)
            matrix[rows].copy_(torch.stack([column[rows] for column in columns]).t())
        self.matrix = matrix.numpy()

    def split(self, parts: dict[str, np.ndarray]) -> dict[str, "_SplitRows"]:
        """Each split's rows, by split name."""
        return {name: self._rows(rows) for name, rows in parts.items()}

    def _rows(self, rows: np.ndarray) -> "_SplitRows":
        if not self.float32:
            return _SplitRows(self.width, rows, matrix=self.matrix)
        # torch's row gather uses every core; numpy's fancy indexing one.
        gathered = torch.from_numpy(self.matrix).index_select(0, torch.from_numpy(rows)).numpy()
        return _SplitRows(self.width, rows, gathered=gathered)


def _tensor_to_read(array: np.ndarray) -> torch.Tensor:
    """A tensor over ``array``'s memory, only to be read. Arrow-backed columns (a Parquet
    read) are read-only, which ``torch.from_numpy`` warns about; DLPack shares them
    without the warning where numpy can say read-only (numpy >= 2.1), else they are copied."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    try:
        return torch.from_dlpack(array)
    except BufferError:
        return torch.from_numpy(array.copy())


class _SplitRows:
    """One split's feature rows, visited in float64 blocks of ``_BLOCK_BYTES`` in row order:
    from its own float32 copy (``gathered``) or straight from the float64 ``matrix``."""

    def __init__(self, width: int, rows: np.ndarray, *, gathered: np.ndarray | None = None,
                 matrix: np.ndarray | None = None):
        self.width, self.rows, self.gathered, self.matrix = width, rows, gathered, matrix

    def blocks(self) -> Iterator[tuple[slice, np.ndarray]]:
        """(where in the split, its rows as float64) per block; a block may be changed in place."""
        step = max(1, _BLOCK_BYTES // max(1, self.width * 8))
        scratch = np.empty((min(len(self.rows), step), self.width), dtype=np.float64)
        for start in range(0, len(self.rows), step):
            where = slice(start, min(start + step, len(self.rows)))
            block = scratch[: where.stop - start]
            if self.gathered is not None:
                block[...] = self.gathered[where]
            else:
                np.take(self.matrix, self.rows[where], axis=0, out=block)
            yield where, block

    def standardized(self, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
        """``(rows - mean) / std`` as float32, computed in float64."""
        out = self.gathered if self.gathered is not None else \
            np.empty((len(self.rows), self.width), dtype=np.float32)
        for where, block in self.blocks():
            block -= mean
            block /= std
            out[where] = block
        return torch.from_numpy(out)


def _column_stats(rows: _SplitRows) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) standard deviation per column, in float64, by blocks of
    rows in a fixed order: bitwise reproducible, and without a float64 copy of the data."""
    n = len(rows.rows)
    total = np.zeros(rows.width, dtype=np.float64)
    for _, block in rows.blocks():
        total += block.sum(axis=0)
    mean = total / max(n, 1)
    squares = np.zeros(rows.width, dtype=np.float64)
    for _, block in rows.blocks():
        block -= mean
        block *= block
        squares += block.sum(axis=0)
    return mean, np.sqrt(squares / max(n, 1))


def _classes(target: pd.Series, problem: ProblemType) -> list[Any] | None:
    if problem == "regression":
        if not pd.api.types.is_numeric_dtype(target) or pd.api.types.is_bool_dtype(target):
            raise DataError(
                f"Target column {target.name!r} is not numeric, so it cannot be a regression target. "
                "Use problem='binary' or 'multiclass', or 'auto'."
            )
        return None
    labels = sorted({_py(v) for v in target.tolist()}, key=lambda v: (str(type(v)), v))
    if problem == "binary" and len(labels) != 2:
        raise DataError(
            f"A binary problem needs exactly 2 distinct labels in {target.name!r}; found {len(labels)}: "
            f"{labels[:10]}. Use problem='multiclass' or 'regression'."
        )
    if problem == "multiclass" and len(labels) < 2:
        raise DataError(f"Target column {target.name!r} has a single label {labels}; there is nothing to learn.")
    return labels


def _assign_rows(
    target: pd.Series, problem: str, classes: list[Any] | None, spec: SplitSpec
) -> dict[str, np.ndarray]:
    fractions = {"train": 1.0 - spec.val_fraction - spec.test_fraction,
                 "val": spec.val_fraction, "test": spec.test_fraction}
    wanted = [name for name in SPLIT_NAMES if fractions[name] > 0]
    rng = np.random.default_rng(spec.seed)
    n = len(target)
    if n < len(wanted):
        raise DataError(
            f"The data has {n} rows; splitting into {'/'.join(wanted)} needs at least {len(wanted)}. "
            "Provide more rows or set val_fraction/test_fraction to 0."
        )
    if problem != "regression" and spec.stratify:
        index = {label: i for i, label in enumerate(classes or [])}
        codes = np.fromiter((index[_py(v)] for v in target.tolist()), dtype=np.int64, count=n)
        groups = [np.flatnonzero(codes == i) for i in range(len(index))]
        for label, rows in zip(classes or [], groups):
            if len(rows) < len(wanted):
                raise DataError(
                    f"Class {label!r} of {target.name!r} has {len(rows)} row(s); a stratified "
                    f"{'/'.join(wanted)} split needs at least {len(wanted)} per class. Gather more rows "
                    "of that class, drop it, or pass stratify=False."
                )
    else:
        groups = [np.arange(n)]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    for rows in groups:
        rows = rng.permutation(rows)
        counts = _split_counts(len(rows), fractions, wanted)
        start = 0
        for name in SPLIT_NAMES:
            parts[name].append(rows[start:start + counts[name]])
            start += counts[name]
    result = {name: np.sort(np.concatenate(chunks)) if chunks else np.array([], dtype=np.int64)
              for name, chunks in parts.items()}
    for name in wanted:
        if len(result[name]) == 0:
            raise DataError(
                f"The {name} split is empty with {n} rows and fractions {fractions}. "
                "Provide more rows or change the fractions."
            )
    return result


def _split_counts(n: int, fractions: dict[str, float], wanted: list[str]) -> dict[str, int]:
    """Rows per split: at least one in each wanted split, the rest by fraction."""
    counts = {name: 0 for name in SPLIT_NAMES}
    for name in wanted:
        if name != "train":
            counts[name] = max(1, int(math.floor(n * fractions[name] + 0.5)))
    counts["train"] = n - counts["val"] - counts["test"]
    while counts["train"] < 1:
        largest = max(("val", "test"), key=lambda k: counts[k])
        counts[largest] -= 1
        counts["train"] += 1
    return counts


def _py(value: Any) -> Any:
    """numpy scalars → Python scalars, so labels are JSON-able and comparable."""
    return value.item() if isinstance(value, np.generic) else value
