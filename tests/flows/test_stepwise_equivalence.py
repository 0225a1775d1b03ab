"""One engine, two drivers: the step-wise flow ends bitwise-equal to the fast path."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from prefect_torch.engine.loop import TrainSpec
from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec, SchedulerSpec
from prefect_torch.flows import DatasetSpec, stepwise_train_flow, train_flow

# What differs between the drivers by design: wall time.
_TIMING = {"seconds", "samples_per_s"}


def saved_weights(model_uri: str) -> dict[str, torch.Tensor]:
    return load_file(f"{model_uri}/model.safetensors")


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"tensors differ: {different}"


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in _TIMING} for record in history]


def run_both(tmp_path, dataset, model, optimizer, training):
    fast = train_flow(dataset, model, optimizer, training, output=str(tmp_path / "fast"))
    step = stepwise_train_flow(
        dataset, model, optimizer, training,
        output=str(tmp_path / "step"), checkpoint_dir=str(tmp_path / "ckpt"),
    )
    return fast, step


def test_plain_epochs_end_bitwise_equal(tmp_path, regression_csv):
    dataset = DatasetSpec(uri=regression_csv, target="y")
    training = TrainSpec(epochs=2, batch_size=32, device="cpu")

    fast, step = run_both(tmp_path, dataset, ModelSpec(hidden=[16]), OptimizerSpec(name="sgd", lr=0.05), training)

    assert_bitwise_equal(saved_weights(fast.model_uri), saved_weights(step.model_uri))
    assert without_timing(step.history) == without_timing(fast.history)
    assert step.metrics == fast.metrics
    assert (step.steps, step.loss, step.stop_reason) == (fast.steps, fast.loss, fast.stop_reason)


def test_accumulation_clipping_step_schedule_and_dropout_end_bitwise_equal(tmp_path, multiclass_csv):
    # 168 training rows in batches of 20 make 9 batches: groups of 4 leave a final group of 1.
    dataset = DatasetSpec(uri=multiclass_csv, target="label")
    training = TrainSpec(
        epochs=2, batch_size=20, accumulate=4, clip=0.25, device="cpu", seed=7,
        scheduler=SchedulerSpec(name="cosine", interval="step"),
    )
    model = ModelSpec(hidden=[24, 24], dropout=0.2)

    fast, step = run_both(tmp_path, dataset, model, OptimizerSpec(name="adamw", lr=0.02, weight_decay=0.01), training)

    assert fast.loss == "cross_entropy"
    assert step.steps == fast.steps == 2 * 3  # ceil(9 / 4) optimizer steps per epoch
    assert_bitwise_equal(saved_weights(fast.model_uri), saved_weights(step.model_uri))
    assert without_timing(step.history) == without_timing(fast.history)


def test_early_stopping_with_plateau_schedule_and_batchnorm_end_bitwise_equal(tmp_path, regression_csv):
    # A high learning rate makes the validation loss bounce: the plateau schedule halves
    # the rate after a bad epoch and early stopping goes back to the best epoch.
    dataset = DatasetSpec(uri=regression_csv, target="y")
    training = TrainSpec(
        epochs=10, batch_size=70, device="cpu", early_stopping_patience=2, restore_best=True,
        scheduler=SchedulerSpec(name="plateau", patience=0, factor=0.5),
    )
    model = ModelSpec(hidden=[32, 32], norm="batch")

    fast, step = run_both(tmp_path, dataset, model, OptimizerSpec(lr=0.1), training)

    # The paths under test were taken: the rate was cut, training stopped early, and
    # the best epoch was not the last one.
    assert step.stop_reason.startswith("early stopping")
    assert len(step.history) < training.epochs
    assert step.history[-1]["lr"] < 0.1
    best = min(range(len(step.history)), key=lambda i: step.history[i]["val_loss"])
    assert best < len(step.history) - 1
    assert step.stop_reason == fast.stop_reason
    assert_bitwise_equal(saved_weights(fast.model_uri), saved_weights(step.model_uri))
    assert without_timing(step.history) == without_timing(fast.history)


@pytest.mark.parametrize("field", ["compile", "precision"])
def test_options_the_stepwise_flow_cannot_honour_are_refused(tmp_path, regression_csv, field):
    training = TrainSpec(epochs=1, **({"compile": True} if field == "compile" else {"precision": "bf16"}))
    from prefect_torch.errors import ConfigError

    with pytest.raises(ConfigError, match="train_flow"):
        stepwise_train_flow(DatasetSpec(uri=regression_csv, target="y"), training=training,
                            output=str(tmp_path / "out"), checkpoint_dir=str(tmp_path / "ckpt"))
