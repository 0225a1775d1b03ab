"""Every card as a Prefect task: on its own, and wired by hand in a flow."""

import pytest
import torch
from prefect import flow

from prefect_torch import tasks
from prefect_torch.engine.data import LoadSpec
from prefect_torch.engine.loop import TrainSpec
from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec
from prefect_torch.engine.split import SplitSpec
from tests.datasets import noisy_linear

pytestmark = pytest.mark.usefixtures("prefect_harness")

CARD_NAMES = [
    "data_load", "data_split", "model_define", "training_init_optimizer", "training_prepare_batch",
    "training_zero_grad", "training_forward", "training_loss", "training_backward",
    "training_optimizer_step", "train", "evaluate",
]


def test_every_card_is_a_task_named_by_its_card_type_with_a_docstring():
    for name in CARD_NAMES:
        card = getattr(tasks, name)
        assert card.name == name
        assert card.description and len(card.description) > 20, name


@pytest.fixture
def csv(tmp_path):
    path = tmp_path / "data.csv"
    noisy_linear(400).to_csv(path, index=False)
    return str(path)


def test_data_cards_on_their_own(csv):
    table = tasks.data_load(LoadSpec(uri=csv))
    splits = tasks.data_split(table, SplitSpec(target="y"))
    assert len(splits.train) + len(splits.val) + len(splits.test) == 400
    assert splits.info.data_key == table.key


def test_one_training_iteration_card_by_card_in_a_flow(csv):
    @flow
    def one_iteration():
        splits = tasks.data_split(tasks.data_load(LoadSpec(uri=csv)), SplitSpec(target="y"))
        model = tasks.model_define(ModelSpec(hidden=[8]), splits)
        before = model.model[0].weight.detach().clone()
        optimizer = tasks.training_init_optimizer(model, OptimizerSpec(lr=0.1))
        batch, info = tasks.training_prepare_batch(splits, batch_index=0, batch_size=16)
        optimizer = tasks.training_zero_grad(optimizer)
        predictions, model = tasks.training_forward(model, batch)
        loss, loss_value = tasks.training_loss(predictions, batch)
        model, grads = tasks.training_backward(loss, model)
        model, optimizer, step_info = tasks.training_optimizer_step(optimizer, model, gradient_clip=1.0, step=1)
        metrics = tasks.evaluate(model, splits, "val")
        return before, model, info, loss_value, grads, step_info, metrics

    before, model, info, loss_value, grads, step_info, metrics = one_iteration()
    assert info["rows"] == 16 and info["batch_index"] == 0 and info["num_batches"] == 18
    assert loss_value > 0 and grads["parameters_with_grad"] == 4
    assert step_info["step"] == 1 and "grad_norm" in step_info
    assert not torch.equal(before, model.model[0].weight)
    assert set(metrics) == {"mse", "mae", "rmse", "r2"}


def test_train_card_in_a_flow(csv):
    @flow
    def fast_path():
        splits = tasks.data_split(tasks.data_load(LoadSpec(uri=csv)), SplitSpec(target="y"))
        model = tasks.model_define(ModelSpec(hidden=[16]), splits)
        trained = tasks.train(splits, model, OptimizerSpec(lr=1e-2), TrainSpec(epochs=5, device="cpu"))
        return trained, tasks.evaluate(trained.model, splits)

    trained, metrics = fast_path()
    assert len(trained.history) == 5 and trained.steps == 5 * 5  # 280 rows / 64 → 5 batches
    assert metrics["r2"] > 0.9
