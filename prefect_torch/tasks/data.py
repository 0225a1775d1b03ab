"""Data Load and Data Split cards."""

from __future__ import annotations

import pandas as pd
from prefect import task

from prefect_torch.engine.data import LoadSpec, Table, load_table
from prefect_torch.engine.split import Splits, SplitSpec, split_table, take_early_split
from prefect_torch.reporting.names import data_load_run_name, data_split_run_name
from prefect_torch.tasks._common import coarse_card
from prefect_torch.blocks.results import tensor_cache_dir
from prefect_torch.tasks.lineage import SourceLineage, fingerprint_cache


@task(name="data_load", task_run_name=data_load_run_name,
      **coarse_card("2", cache_policy=SourceLineage(code_version="2")))
def data_load(spec: LoadSpec) -> Table:
    """Data Load: read a CSV or Parquet file (local path or s3:// URL) into a table.

    The table carries a key derived from the file's bytes, so everything
    computed from it can be cached by lineage. Its persisted result is a reference
    to the file (URI, content key, format, columns), never a copy of the rows.
    """
    return load_table(spec, fingerprint_cache=fingerprint_cache())


@task(name="data_split", task_run_name=data_split_run_name, **coarse_card("2"))
def data_split(table: Table | pd.DataFrame, spec: SplitSpec) -> Splits:
    """Data Split: validate columns, split train/val/test, standardise, convert to tensors.

    In a Torch Storage the tensors are written once, uncompressed, as a safetensors
    file under ``tensors/``; the persisted result points at it, and a cache hit maps
    the file instead of reading a copy.
    """
    splits = take_early_split(table, spec)  # the CLI's early split of this table, if any
    if splits is None:
        splits = split_table(table, spec)
    storage = _torch_storage()
    if storage is not None:
        splits.store(storage.url("tensors"), fs=storage.filesystem(), cache_dir=tensor_cache_dir(),
                     upload=lambda local, url: storage.upload_file(local, url))
    else:
        splits.discard_staged()  # the early split wrote its file for a storage this run has not
    return splits


def _torch_storage():
    """The Torch Storage this task run persists its result in, if any."""
    from prefect.context import TaskRunContext

    from prefect_torch.blocks.results import TorchResultStorage

    context = TaskRunContext.get()
    store = getattr(context, "result_store", None) if context else None
    storage = getattr(store, "result_storage", None)
    if context is None or not context.persist_result or not isinstance(storage, TorchResultStorage):
        return None
    return storage.storage
