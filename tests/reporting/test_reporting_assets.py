"""Asset keys: URIs Prefect accepts, from where data was read and models were saved."""

from pathlib import Path

import pytest
from prefect.assets import Asset

from prefect_torch.engine.models import ModelSpec
from prefect_torch.reporting.assets import asset_key, dataset_asset, model_asset
from prefect_torch.reporting.names import data_split_run_name  # noqa: F401  (import check: no cycles)


def test_a_local_path_becomes_an_absolute_file_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert asset_key("data/housing.csv") == "file://" + (tmp_path / "data" / "housing.csv").as_posix()
    assert asset_key(f"file://{tmp_path}/m") == f"file://{tmp_path}/m"


def test_object_store_keys_lose_credentials_and_queries():
    assert asset_key("S3://AKIA:secret@bucket/data/x.csv?versionId=3") == "s3://bucket/data/x.csv"


@pytest.mark.parametrize("name", ["my data.csv", "a#b.csv", "100%.csv", "q?.csv", "[x].csv"])
def test_characters_prefect_refuses_are_replaced(tmp_path, name):
    key = asset_key(str(tmp_path / name))
    Asset(key=key)  # Prefect's own validation
    assert key.endswith(".csv")


def test_very_long_keys_stay_valid_and_distinct():
    long_a = "s3://bucket/" + "a" * 600 + "/x.csv"
    long_b = "s3://bucket/" + "a" * 600 + "/y.csv"
    key_a, key_b = asset_key(long_a), asset_key(long_b)
    Asset(key=key_a)
    assert len(key_a) <= 512 and key_a != key_b


def test_dataset_and_model_assets_describe_themselves(tmp_path):
    data = dataset_asset("s3://k:s@bucket/data/housing.csv")
    assert data.key == "s3://bucket/data/housing.csv"
    assert data.properties.name == "housing.csv" and "s:" not in data.properties.description
    model = model_asset(str(tmp_path / "model"), ModelSpec(hidden=[8]))
    assert model.key == "file://" + Path(tmp_path / "model").as_posix()
    assert model.properties.name == "mlp-8 model"
