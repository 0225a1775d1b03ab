"""Data Load and Data Split cards."""

from __future__ import annotations

import pandas as pd
from prefect import task

from prefect_torch.engine.data import LoadSpec, Table, load_table
from prefect_torch.engine.split import Splits, SplitSpec, split_table
from prefect_torch.reporting.names import data_load_run_name, data_split_run_name
from prefect_torch.tasks._common import coarse_card
from prefect_torch.tasks.lineage import SourceLineage


@task(name="data_load", task_run_name=data_load_run_name,
      **coarse_card("1", cache_policy=SourceLineage(code_version="1")))
def data_load(spec: LoadSpec) -> Table:
    """Data Load: read a CSV or Parquet file (local path or s3:// URL) into a table.

    The table carries a key derived from the file's bytes, so everything
    computed from it can be cached by lineage.
    """
    return load_table(spec)


@task(name="data_split", task_run_name=data_split_run_name, **coarse_card("1"))
def data_split(table: Table | pd.DataFrame, spec: SplitSpec) -> Splits:
    """Data Split: validate columns, split train/val/test, standardise, convert to tensors."""
    return split_table(table, spec)
