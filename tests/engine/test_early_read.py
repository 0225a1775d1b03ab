"""A dataset the cache has not seen is read in the background while the CLI starts
(``start_loading``); Data Load takes that table instead of reading the file again,
and a file the cache knows is never read early."""

import pandas as pd
import pytest

from prefect_torch.engine import fingerprint, prefetch
from prefect_torch.engine.data import LoadSpec, drop_early_reads, load_table, start_loading
from prefect_torch.errors import DataError
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
