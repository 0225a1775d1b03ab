"""A dataset the cache has not seen is read in the background while the CLI starts
(``start_loading``); Data Load takes that table instead of reading the file again,
and a file the cache knows is never read early."""

import gc
import os

import pandas as pd
import pytest
import torch

from prefect_torch.engine import fingerprint, prefetch
from prefect_torch.engine.data import LoadSpec, drop_early_reads, load_table, start_loading
from prefect_torch.engine.split import SplitSpec, split_table, start_splitting, take_early_split
from prefect_torch.errors import DataError
from tests.datasets import noisy_linear
from tests.engine.test_fingerprint import age, hashed_opens


@pytest.fixture(autouse=True)
def fresh_process_state():
    fingerprint.clear_cache()
    prefetch.discard()
    yield
    drop_early_reads()
    fingerprint.clear_cache()


def csv_file(tmp_path, name="d.csv", rows=((1, 2), (3, 4))):
    path = tmp_path / name
    path.write_text("x,y\n" + "".join(f"{a},{b}\n" for a, b in rows))
    age(path)
    return path


def card_load(spec, cache):
    """What the Data Load card does: its cache key's fingerprint, then the load."""
    key = fingerprint.source_key(spec.uri, cache_dir=cache)
    return key, load_table(spec, fingerprint_cache=cache)


def test_an_unseen_file_is_read_once_in_all_and_the_card_takes_that_table(tmp_path):
    data, cache = csv_file(tmp_path), tmp_path / "fingerprints"
    spec = LoadSpec(uri=str(data))

    def start_then_load():
        assert start_loading(spec, cache) is True
        return card_load(spec, cache)

    (key, table), opens = hashed_opens(data, start_then_load)
    assert opens == 1
    assert table.key == key and table.frame.equals(pd.DataFrame({"x": [1, 3], "y": [2, 4]}))
    # The card remembered the fingerprint on disk, as after any first read.
    fingerprint.clear_cache()
    assert fingerprint.is_remembered(data, cache)


def test_a_file_the_cache_knows_is_not_read_early(tmp_path):
    data, cache = csv_file(tmp_path), tmp_path / "fingerprints"
    spec = LoadSpec(uri=str(data))
    card_load(spec, cache)
    fingerprint.clear_cache()  # a new process

    started, opens = hashed_opens(data, lambda: start_loading(spec, cache))
    assert (started, opens) == (False, 0)


def test_a_file_changed_after_the_early_read_is_read_again(tmp_path):
    data, cache = csv_file(tmp_path), tmp_path / "fingerprints"
    spec = LoadSpec(uri=str(data))
    assert start_loading(spec, cache)
    prefetch.wait(str(data.resolve()))
    data.write_text("x,y\n5,6\n")
    age(data, 30)

    key, table = card_load(spec, cache)
    assert table.frame.equals(pd.DataFrame({"x": [5], "y": [6]}))
    assert key == table.key == fingerprint.content_key(data.read_bytes())


def test_an_early_read_for_other_options_is_not_taken(tmp_path):
    data, cache = csv_file(tmp_path), tmp_path / "fingerprints"
    assert start_loading(LoadSpec(uri=str(data)), cache)
    _, table = card_load(LoadSpec(uri=str(data), columns=["y"]), cache)
    assert list(table.frame.columns) == ["y"]


def test_a_malformed_file_still_fails_in_the_card_with_the_usual_error(tmp_path):
    data, cache = tmp_path / "bad.parquet", tmp_path / "fingerprints"
    data.write_bytes(b"PAR1 this is not parquet")
    age(data)
    spec = LoadSpec(uri=str(data))
    assert start_loading(spec, cache)
    with pytest.raises(DataError, match="bad.parquet"):
        load_table(spec, fingerprint_cache=cache)


def test_a_load_with_no_early_read_is_unchanged(tmp_path):
    data, cache = csv_file(tmp_path), tmp_path / "fingerprints"
    (key, table), opens = hashed_opens(data, lambda: card_load(LoadSpec(uri=str(data)), cache))
    assert opens == 1 and table.key == key


# The early split: the CLI splits the early read's table in the background as well.

def regression_file(tmp_path, rows=400):
    path = tmp_path / "r.csv"
    noisy_linear(rows, features=3, seed=4).to_csv(path, index=False)
    age(path)
    return path


def start_reading_and_splitting(spec, cache, split_spec, stage_in=None):
    return start_loading(spec, cache, then=lambda table, generation: start_splitting(table, split_spec, generation,
                                                                                     stage_in))


def loaded_with_early_split(tmp_path, split_spec):
    """As the command and the flow do: early read and split, Data Load, then the drop of
    what Load did not take. The load spec, the fingerprint cache and Load's table."""
    data, cache = regression_file(tmp_path), tmp_path / "fingerprints"
    spec = LoadSpec(uri=str(data))
    assert start_reading_and_splitting(spec, cache, split_spec)
    _, table = card_load(spec, cache)
    drop_early_reads(kept_for=table)
    return spec, cache, table


def test_the_card_takes_the_early_split_of_the_table_load_returned_bitwise_equal(tmp_path):
    split_spec = SplitSpec(target="y")
    _, _, table = loaded_with_early_split(tmp_path, split_spec)

    early = take_early_split(table, split_spec)
    assert early is not None
    made_here = split_table(table, split_spec)
    assert early.key == made_here.key and early.info == made_here.info
    for name in ("train", "val", "test"):
        for got, want in zip((early[name].X, early[name].y), (made_here[name].X, made_here[name].y)):
            assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert take_early_split(table, split_spec) is None  # taken once


def test_an_early_split_is_not_taken_for_another_spec_or_another_table(tmp_path):
    split_spec = SplitSpec(target="y")
    spec, cache, table = loaded_with_early_split(tmp_path, split_spec)

    assert take_early_split(table, SplitSpec(target="y", test_fraction=0.2)) is None
    same_rows = load_table(spec, fingerprint_cache=cache)  # equal content, another object
    assert take_early_split(same_rows, split_spec) is None
    assert take_early_split(table.frame, split_spec) is None


def test_a_load_that_did_not_take_the_early_read_drops_its_split(tmp_path):
    data, cache = regression_file(tmp_path), tmp_path / "fingerprints"
    split_spec = SplitSpec(target="y")
    assert start_reading_and_splitting(LoadSpec(uri=str(data)), cache, split_spec)
    prefetch.wait(str(data.resolve()))
    early_table = prefetch.take(str(data.resolve()))[-1]

    drop_early_reads()  # a cached Load: nothing of the early work is kept
    assert take_early_split(early_table, split_spec) is None


def test_work_that_follows_a_discarded_job_is_not_started():
    mark = prefetch.generation()
    prefetch.discard()
    assert prefetch.start("late", lambda: 1, unless_discarded_since=mark) is False
    assert prefetch.take("late") is None
    assert prefetch.start("on time", lambda: 2, unless_discarded_since=prefetch.generation()) is True
    assert prefetch.take("on time") == 2


def test_a_failed_early_split_leaves_the_card_to_meet_the_error(tmp_path):
    split_spec = SplitSpec(target="no such column")
    _, _, table = loaded_with_early_split(tmp_path, split_spec)
    assert take_early_split(table, split_spec) is None
    with pytest.raises(DataError, match="no such column"):
        split_table(table, split_spec)


def test_an_early_split_writes_its_tensor_file_ahead_and_the_store_renames_it(tmp_path):
    data, cache, staging = regression_file(tmp_path), tmp_path / "fingerprints", tmp_path / "staging"
    split_spec = SplitSpec(target="y")
    spec = LoadSpec(uri=str(data))
    assert start_reading_and_splitting(spec, cache, split_spec, stage_in=staging)
    _, table = card_load(spec, cache)
    drop_early_reads(kept_for=table)

    early = take_early_split(table, split_spec)
    inode = early.staged.path.stat().st_ino
    early.store(str(tmp_path / "tensors"))
    assert os.stat(early.stored["uri"]).st_ino == inode and early.staged is None
    assert list(staging.iterdir()) == []
    assert early.stored["checksum"] == split_table(table, split_spec).store(str(tmp_path / "again")).stored["checksum"]


def test_a_staged_split_nobody_stores_leaves_no_file(tmp_path):
    split_spec = SplitSpec(target="y")
    _, _, table = loaded_with_early_split(tmp_path, split_spec)
    staging = tmp_path / "staging"

    discarded = split_table(table, split_spec).stage(staging)
    assert discarded.staged.path.exists()
    discarded.discard_staged()
    assert list(staging.iterdir()) == []

    dropped = split_table(table, split_spec).stage(staging)
    assert dropped.staged.path.exists()
    del dropped
    gc.collect()
    assert list(staging.iterdir()) == []
