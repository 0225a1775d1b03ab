"""The fast-path flow end to end with the embedded Prefect."""

import pytest
import torch

from prefect_torch import load_model
from prefect_torch.errors import ConfigError, DataError
from prefect_torch.flows import TrainFlowResult, train_flow
from tests.datasets import noisy_linear, separable_classes

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_train_flow_reaches_the_stated_quality_and_saves_a_loadable_model(tmp_path):
    path = tmp_path / "linear.csv"
    frame = noisy_linear(1500)
    frame.to_csv(path, index=False)
    result = train_flow(
        dataset={"uri": str(path), "target": "y"},
        model={"hidden": [32, 32]},
        optimizer={"lr": 3e-3},
        training={"epochs": 12, "batch_size": 32, "device": "cpu"},
        output=str(tmp_path / "model"),
    )
    assert isinstance(result, TrainFlowResult)
    assert result.metrics["r2"] >= 0.95
    assert result.problem == "regression" and len(result.history) == 12
    assert result.model_uri == str(tmp_path / "model")
    model = load_model(result.model_uri)
    predictions = model.predict(frame.head(200))
    assert ((predictions - frame["y"].head(200)).abs().mean()) < 1.0
    assert model.metrics["r2"] == pytest.approx(result.metrics["r2"])


def test_train_flow_classifies_parquet_data(tmp_path):
    path = tmp_path / "classes.parquet"
    separable_classes(900, classes=3).to_parquet(path)
    result = train_flow(dataset={"uri": str(path), "target": "label"}, training={"epochs": 6, "device": "cpu"})
    assert result.problem == "multiclass" and result.metrics["accuracy"] >= 0.95


def test_same_parameters_same_weights(tmp_path):
    path = tmp_path / "linear.csv"
    noisy_linear(300).to_csv(path, index=False)
    params = dict(dataset={"uri": str(path), "target": "y"}, training={"epochs": 2, "device": "cpu", "seed": 3})
    a = load_model(train_flow(**params, output=str(tmp_path / "a")).model_uri)
    b = load_model(train_flow(**params, output=str(tmp_path / "b")).model_uri)
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name


def test_bad_data_fails_the_flow_with_the_data_error(tmp_path):
    path = tmp_path / "text.csv"
    frame = noisy_linear(50)
    frame["city"] = "Lyon"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match="city"):
        train_flow(dataset={"uri": str(path), "target": "y"}, training={"epochs": 1})


def test_bad_spec_is_a_config_error():
    with pytest.raises(ConfigError, match="name"):
        from prefect_torch.engine.optim import OptimizerSpec

        OptimizerSpec(name="adamx")
