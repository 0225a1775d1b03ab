"""retrain_flow in-process on the embedded Prefect: promotion and non-promotion on
real data, the recorded decision, and bad input. (Runs through a real worker are
in test_workers.py.)"""

from __future__ import annotations

import math
import os
import time
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from prefect_torch.blocks import ModelRegistry, RegistryLookupError, default_storage
from prefect_torch.errors import ConfigError, DataError
from prefect_torch.flows import RetrainResult, retrain_flow
from prefect_torch.flows.retrain import decide, find_newest_dataset
from tests.datasets import noisy_linear, separable_classes

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]

QUICK = {"epochs": 3, "batch_size": 32, "device": "cpu"}


def write(path: Path, frame, age_s: float = 0.0) -> Path:
    """Write a dataset whose modification time is ``age_s`` seconds in the past."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def retrain(data_dir: Path, name: str, **kwargs) -> tuple[RetrainResult, str]:
    """Run retrain_flow; return its result and the flow run id."""
    state = retrain_flow(data={"uri": str(data_dir), "target": "y"}, model_name=name, return_state=True, **kwargs)
    return state.result(), str(state.state_details.flow_run_id)


def decision_markdown(flow_run_id: str) -> str:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    (artifact,) = [a for a in artifacts if a.type == "markdown"]
    assert artifact.key.startswith("retrain-")
    return artifact.data


def registry() -> ModelRegistry:
    return ModelRegistry(storage=default_storage())


def test_first_run_promotes_a_better_challenger_promotes_a_worse_one_does_not(tmp_path: Path) -> None:
    name = f"lin-{uuid.uuid4().hex[:6]}"
    data = tmp_path / "incoming"
    write(data / "2026-01.csv", noisy_linear(400, noise=2.0, seed=1), age_s=60)

    first, run_id = retrain(data, name, training=QUICK)
    assert first.promoted and first.champion_version == first.challenger_version == 1
    assert first.champion_score is None and "No champion yet" in first.reason
    assert "promoted the challenger" in decision_markdown(run_id)

    newest = write(data / "2026-02.csv", noisy_linear(900, noise=0.3, seed=2))
    better, run_id = retrain(data, name, training={**QUICK, "epochs": 12})
    assert better.dataset_uri == str(newest)
    assert better.promoted and (better.previous_champion_version, better.champion_version) == (1, 2)
    assert better.challenger_score > better.champion_score
    markdown = decision_markdown(run_id)
    assert f"{better.challenger_score:.6g}" in markdown and f"{better.champion_score:.6g}" in markdown

    # The challenger is scored on the rows train_flow held out as its test split.
    version = registry().get_version(name, 2)
    stored_test_r2 = registry().load_model(name, version=2).metrics["r2"]
    assert math.isclose(version.metrics["r2"], stored_test_r2, rel_tol=1e-5)
    assert version.dataset_uri == str(newest) and version.data_key.startswith("xxh3-")
    assert version.specs["training"]["epochs"] == 12 and version.code_version["prefect_torch"]

    worse, run_id = retrain(data, name, training={**QUICK, "epochs": 1}, optimizer={"lr": 1e-6})
    assert not worse.promoted and "Not better" in worse.reason
    assert (worse.challenger_version, worse.champion_version) == (3, 2)
    assert worse.champion_score == pytest.approx(better.challenger_score, rel=1e-5)
    markdown = decision_markdown(run_id)
    assert "kept the champion" in markdown and "Not better" in markdown
    assert registry().get_alias(name).version == 2
    assert [r.version for r in registry().alias_history(name)] == [1, 2]


def test_a_challenger_must_beat_the_margin(tmp_path: Path) -> None:
    name = f"margin-{uuid.uuid4().hex[:6]}"
    write(tmp_path / "d.csv", noisy_linear(400, seed=3))
    retrain(tmp_path, name, training=QUICK)
    # Same data, same seed: the same model, so no improvement at all.
    same, _ = retrain(tmp_path, name, training=QUICK, promotion={"metric": "mse", "min_improvement": 0.5})
    assert not same.promoted and same.metric == "mse" and not same.higher_is_better
    assert same.challenger_score == pytest.approx(same.champion_score)
    assert registry().get_alias(name).version == 1


def test_decide_knows_which_metrics_are_higher_better() -> None:
    assert decide("r2", 0.9, 0.8, 0.05)[0]
    assert not decide("r2", 0.82, 0.8, 0.05)[0]
    assert "less than min_improvement 0.05" in decide("r2", 0.82, 0.8, 0.05)[1]
    assert decide("mse", 1.0, 2.0, 0.5)[0]
    assert not decide("mse", 2.0, 1.0, 0.0)[0]
    assert not decide("log_loss", 0.3, 0.3, 0.0)[0]
    assert decide("accuracy", 0.5, None, 0.1)[0]
    assert not decide("r2", float("nan"), 0.5, 0.0)[0]
    assert decide("r2", 0.5, float("nan"), 0.0)[0]


def test_a_failed_challenger_leaves_the_registry_unchanged(tmp_path: Path) -> None:
    name = f"fail-{uuid.uuid4().hex[:6]}"
    write(tmp_path / "good.csv", noisy_linear(300, seed=4), age_s=60)
    retrain(tmp_path, name, training=QUICK)
    broken = noisy_linear(300, seed=5)
    broken["x0"] = "oops"
    write(tmp_path / "broken.csv", broken)

    state = retrain_flow(data={"uri": str(tmp_path), "target": "y"}, model_name=name, training=QUICK,
                         return_state=True)
    assert state.is_failed()
    with pytest.raises(DataError, match="x0"):
        state.result()
    assert [v.version for v in registry().list_versions(name)] == [1]
    assert registry().get_alias(name).version == 1
    markdown = decision_markdown(str(state.state_details.flow_run_id))
    assert "challenger failed" in markdown and "DataError" in markdown


def test_bad_input_gets_clear_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a dataset")
    with pytest.raises(DataError, match=rf"No dataset under {empty}.*csv"):
        retrain_flow(data={"uri": str(empty), "target": "y"}, model_name="x")
    with pytest.raises(DataError, match="No dataset under"):
        retrain_flow(data={"uri": str(tmp_path / "missing" / "*.csv"), "target": "y"}, model_name="x")
    with pytest.raises(ConfigError, match=r"data.uri is still the template.*PREFECT"):
        retrain_flow(data={"uri": "{{ $PREFECT_TORCH_RETRAIN_DATA }}", "target": "y"}, model_name="x")
    with pytest.raises(ConfigError, match="Invalid model name"):
        retrain_flow(data={"uri": str(empty), "target": "y"}, model_name="no/slashes")
    with pytest.raises(RegistryLookupError, match="No model named 'never-trained'"):
        registry().load_model("never-trained")


def test_a_metric_the_problem_lacks_is_refused_before_registering(tmp_path: Path) -> None:
    name = f"cls-{uuid.uuid4().hex[:6]}"
    separable_classes(300, classes=3).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(ConfigError, match=r"'roc_auc' is not measured for multiclass"):
        retrain_flow(data={"uri": str(tmp_path), "target": "label"}, model_name=name,
                     training=QUICK, promotion={"metric": "roc_auc"})
    with pytest.raises(RegistryLookupError):
        registry().latest_version(name)
    promoted = retrain_flow(data={"uri": str(tmp_path), "target": "label"}, model_name=name, training=QUICK)
    assert promoted.metric == "accuracy" and promoted.promoted


def test_newest_dataset_by_time_local(tmp_path: Path) -> None:
    write(tmp_path / "z-old.csv", noisy_linear(10), age_s=100)
    newer = tmp_path / "sub" / "a-new.parquet"
    newer.parent.mkdir()
    noisy_linear(10).to_parquet(newer)
    os.utime(newer, (time.time() - 10, time.time() - 10))
    write(tmp_path / ".hidden.csv", noisy_linear(10))  # newest, but hidden
    (tmp_path / "notes.txt").write_text("newest, but not a dataset")
    assert find_newest_dataset.fn(str(tmp_path)) == str(newer)
    assert find_newest_dataset.fn(str(tmp_path / "*.csv")) == str(tmp_path / "z-old.csv")
    assert find_newest_dataset.fn(str(tmp_path / "z-old.csv")) == str(tmp_path / "z-old.csv")


@pytest.mark.s3
def test_newest_dataset_on_s3(s3_server, monkeypatch) -> None:
    # Datasets are read with the standard AWS settings, like data_load does.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    fs = s3_server.filesystem()
    prefix = f"{s3_server.bucket}/incoming-{uuid.uuid4().hex[:6]}"
    fs.pipe_file(f"{prefix}/housing-1.csv", b"y\n1\n")
    time.sleep(1.1)  # S3 timestamps have one-second resolution
    fs.pipe_file(f"{prefix}/housing-2.csv", b"y\n2\n")
    fs.pipe_file(f"{prefix}/readme.md", b"not data")
    assert find_newest_dataset.fn(f"s3://{prefix}/") == f"s3://{prefix}/housing-2.csv"
    assert find_newest_dataset.fn(f"s3://{prefix}") == f"s3://{prefix}/housing-2.csv"
    assert find_newest_dataset.fn(f"s3://{prefix}/housing-1") == f"s3://{prefix}/housing-1.csv"
    assert find_newest_dataset.fn(f"s3://{prefix}/*-1.csv") == f"s3://{prefix}/housing-1.csv"
    with pytest.raises(DataError, match="No dataset under"):
        find_newest_dataset.fn(f"s3://{prefix}/nothing/")
