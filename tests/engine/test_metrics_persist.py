import math

import pandas as pd
import pytest
import torch

from prefect_torch.engine.loop import TrainSpec, fit
from prefect_torch.engine.metrics import binary_metrics, multiclass_metrics, regression_metrics
from prefect_torch.engine.models import ModelSpec, build_model
from prefect_torch.engine.optim import OptimizerSpec, build_optimizer
from prefect_torch.engine.persist import WEIGHTS_FILE, load_model, save_model
from prefect_torch.engine.split import SplitSpec, split_table
from prefect_torch.errors import DataError, IntegrityError
from tests.datasets import separable_classes


def test_regression_metrics_by_hand():
    m = regression_metrics(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64), torch.tensor([1.0, 3.0, 3.0], dtype=torch.float64))
    assert m["mse"] == pytest.approx(2 / 3) and m["mae"] == pytest.approx(2 / 3)
    assert m["rmse"] == pytest.approx(math.sqrt(2 / 3))
    assert m["r2"] == pytest.approx(1 - 2 / (8 / 3))


def test_binary_metrics_by_hand():
    prob = torch.tensor([0.1, 0.4, 0.35, 0.8], dtype=torch.float64)
    true = torch.tensor([0, 0, 1, 1])
    m = binary_metrics(prob, true)
    assert m["accuracy"] == 0.75
    assert m["roc_auc"] == pytest.approx(0.75)  # the classic sklearn example
    assert m["log_loss"] == pytest.approx(-(math.log(0.9) + math.log(0.6) + math.log(0.35) + math.log(0.8)) / 4)


def test_roc_auc_with_ties_counts_half():
    m = binary_metrics(torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0, 1]))
    assert m["roc_auc"] == pytest.approx(0.5)


def test_multiclass_metrics_by_hand():
    prob = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]], dtype=torch.float64)
    true = torch.tensor([0, 1, 2, 1])
    m = multiclass_metrics(prob, true, 3)
    assert m["accuracy"] == 0.75
    # per class F1: c0 = 2/3 (tp1 fp1), c1 = 2/3 (tp1 fn1), c2 = 1
    assert m["f1_macro"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


@pytest.fixture
def trained(tmp_path):
    frame = separable_classes(300, classes=3)
    splits = split_table(frame, SplitSpec(target="label"))
    spec = ModelSpec(hidden=[16])
    net = build_model(spec, 4, 3)
    fit(net, build_optimizer(OptimizerSpec(lr=1e-2), net), splits, TrainSpec(epochs=3, device="cpu"))
    uri = save_model(net, spec, splits.info, str(tmp_path / "model"), extra={"metrics": {"accuracy": 1.0}})
    return frame, net, uri


def test_a_saved_model_loads_and_predicts_labels_like_the_original(trained):
    frame, net, uri = trained
    loaded = load_model(uri)
    for (name, a), (_, b) in zip(net.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    predictions = loaded.predict(frame)
    assert set(predictions) <= {"class_0", "class_1", "class_2"}
    assert (predictions == frame["label"]).mean() > 0.9
    proba = loaded.predict_proba(frame)
    assert list(proba.columns) == ["p_class_0", "p_class_1", "p_class_2"]
    assert ((proba.sum(axis=1) - 1).abs() < 1e-5).all()
    assert loaded.metrics == {"accuracy": 1.0}


def test_altered_weights_are_refused(trained):
    _, _, uri = trained
    path = f"{uri}/{WEIGHTS_FILE}"
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(IntegrityError, match="checksum"):
        load_model(uri)


def test_prediction_data_missing_a_feature(trained):
    frame, _, uri = trained
    with pytest.raises(DataError, match=r"lacks feature columns.*\['b'\]"):
        load_model(uri).predict(frame.drop(columns=["b"]))


def test_unseen_label_at_evaluation_is_named(trained):
    frame, _, uri = trained
    info = load_model(uri).info
    with pytest.raises(DataError, match="never saw in training: \\['class_9'\\]"):
        info.encode_target(pd.Series(["class_0", "class_9"], name="label"))
