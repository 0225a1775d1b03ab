"""The cards wired by hand in a user's own flow, as in the seeds (examples/custom_loss.py)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from examples.custom_loss import add_l1_penalty, custom_loss_flow, main
from prefect_torch.engine.loop import TrainSpec
from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec
from prefect_torch.flows import DatasetSpec, stepwise_train_flow, train_flow

MODEL = ModelSpec(hidden=[16, 16], dropout=0.1)
OPTIMIZER = OptimizerSpec(name="adam", lr=0.01)
TRAINING = TrainSpec(epochs=2, batch_size=32, clip=0.5, device="cpu", seed=4)


def assert_same_weights(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_a_hand_wired_card_loop_reproduces_the_fast_path(tmp_path, regression_csv):
    dataset = DatasetSpec(uri=regression_csv, target="y")

    by_hand = custom_loss_flow(dataset, MODEL, OPTIMIZER, TRAINING, l1=0.0)
    fast = train_flow(dataset, MODEL, OPTIMIZER, TRAINING, output=str(tmp_path / "fast"))

    assert by_hand["steps"] == fast.steps
    assert_same_weights(load_file(f"{fast.model_uri}/model.safetensors"), by_hand["weights"])
    assert by_hand["metrics"] == fast.metrics


def test_the_l1_card_by_hand_and_as_an_after_loss_step_train_the_same_model(tmp_path, regression_csv):
    dataset = DatasetSpec(uri=regression_csv, target="y")

    by_hand = custom_loss_flow(dataset, MODEL, OPTIMIZER, TRAINING)
    built_in = stepwise_train_flow(
        dataset, MODEL, OPTIMIZER, TRAINING, output=str(tmp_path / "model"),
        checkpoint_dir=str(tmp_path / "ckpt"), after_loss=add_l1_penalty,
    )
    plain = train_flow(dataset, MODEL, OPTIMIZER, TRAINING, output=str(tmp_path / "plain"))

    regularised = load_file(f"{built_in.model_uri}/model.safetensors")
    assert_same_weights(regularised, by_hand["weights"])
    unregularised = load_file(f"{plain.model_uri}/model.safetensors")
    l1 = lambda weights: sum(float(w.abs().sum()) for w in weights.values())  # noqa: E731
    assert l1(regularised) < l1(unregularised)  # the penalty did pull the weights in


def test_the_example_runs_from_the_command_line(regression_csv, capsys):
    summary = main([regression_csv, "--target", "y", "--epochs", "1", "--batch-size", "70"])

    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(summary))
    assert summary["steps"] == 2 and set(summary["metrics"]) == {"mse", "mae", "rmse", "r2"}
