"""Rows for table artifacts: the per-epoch history and a set of metrics.

Only numbers the loop computed go in: losses, metrics, learning rate, timings.
Never data rows.
"""

from __future__ import annotations

from typing import Any, Sequence

from prefect_torch.reporting.text import table_cell

# A table artifact is one JSON document the UI loads whole; long runs are thinned.
MAX_TABLE_ROWS = 500

_COLUMN_ORDER = ("epoch", "train_loss", "val_loss")
_TRAILING = ("lr", "seconds", "samples_per_s")


def history_rows(history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per epoch: epoch, losses, each validation metric as ``val_<name>``,
    learning rate, seconds and samples/s."""
    rows = []
    for record in history:
        row: dict[str, Any] = {name: table_cell(record.get(name)) for name in _COLUMN_ORDER}
        for name, value in (record.get("val_metrics") or {}).items():
            row[f"val_{name}"] = table_cell(value)
        for name in _TRAILING:
            row[name] = table_cell(record.get(name))
        row["samples_per_s"] = table_cell(_rounded(row["samples_per_s"]))
        rows.append(row)
    return rows


def history_table(history: Sequence[dict[str, Any]], max_rows: int = MAX_TABLE_ROWS) -> tuple[list[dict[str, Any]], str]:
    """The rows to publish and a sentence saying what they cover."""
    rows = history_rows(history)
    if len(rows) <= max_rows:
        return rows, f"{len(rows)} epoch{'s' if len(rows) != 1 else ''}"
    kept = thin(rows, max_rows)
    return kept, f"{len(kept)} of {len(rows):,} epochs, evenly spaced (first and last included)"


def metrics_rows(metrics: dict[str, float]) -> list[dict[str, Any]]:
    return [{"metric": name, "value": table_cell(value)} for name, value in metrics.items()]


def thin(rows: list[Any], limit: int) -> list[Any]:
    """At most ``limit`` rows, evenly spaced, always keeping the first and last."""
    if len(rows) <= limit:
        return rows
    last = len(rows) - 1
    keep = sorted({round(i * last / (limit - 1)) for i in range(limit)})
    return [rows[i] for i in keep]


def _rounded(value: Any) -> Any:
    return round(value) if isinstance(value, float) else value
