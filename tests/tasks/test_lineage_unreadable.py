"""A card whose data cannot be read fails with the loader's message, not a cache-key error."""

import logging

import pytest
from prefect import flow

from prefect_torch import tasks
from prefect_torch.engine.data import LoadSpec
from prefect_torch.errors import DataError

pytestmark = pytest.mark.usefixtures("prefect_harness")


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_a_missing_dataset_fails_with_one_clear_error_and_no_cache_key_error(tmp_path):
    missing = tmp_path / "missing.csv"

    @flow
    def load_missing():
        return tasks.data_load(LoadSpec(uri=str(missing)))

    collect = Collect()
    logger = logging.getLogger("prefect")
    logger.addHandler(collect)
    try:
        with pytest.raises(DataError, match="Dataset file not found"):
            load_missing()
    finally:
        logger.removeHandler(collect)

    messages = [record.getMessage() for record in collect.records]
    assert any("Dataset file not found" in m for m in messages), messages  # the task's failure is logged
    assert not [m for m in messages if "computing cache key" in m], messages
