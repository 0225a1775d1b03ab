"""Task-run names and artifact keys: whole file names, no secrets, scoped keys."""

from __future__ import annotations

import pytest

from prefect_torch.reporting.names import MAX_NAME_CHARS, file_name
from prefect_torch.reporting.publish import artifact_key, artifact_scope


@pytest.mark.parametrize("uri, name", [
    ("/work/main/prefect_torch/examples/data/churn.csv", "churn.csv"),
    ("/home/me/.prefect/prefect-torch/models/train-76f9c3/", "train-76f9c3"),
    ("s3://AKIA:secret@bucket/housing/2026-01.parquet?X-Amz-Signature=abc", "2026-01.parquet"),
    ("model", "model"),
])
def test_a_run_name_shows_the_whole_file_name(uri, name):
    assert file_name(uri) == name


def test_a_very_long_file_name_is_cut_at_its_end_not_its_start():
    long = "train-" + "0123456789abcdef" * 4
    shown = file_name(f"/models/{long}")
    assert len(shown) == MAX_NAME_CHARS and shown.startswith("train-0123") and shown.endswith("…")


def test_artifact_keys_group_a_model_on_a_dataset_by_flow():
    scope = artifact_scope("mlp-32x32", flow="train-stepwise", dataset_uri="s3://k:s@bucket/data/Housing.csv?sig=x")
    assert scope == "train-stepwise-housing-csv-mlp-32x32"
    assert artifact_key(scope, "model-card") == "train-stepwise-housing-csv-mlp-32x32-model-card"


def test_outside_a_flow_run_the_key_is_the_bare_kind():
    assert artifact_key(artifact_scope(None), "model-card") == "model-card"
    assert artifact_scope("mlp-8") == "mlp-8"
