"""The step cards one by one, as a user's own flow calls them, and what they refuse."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from prefect import flow

from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec, SchedulerSpec, build_scheduler
from prefect_torch.engine.split import SplitSpec
from prefect_torch.errors import ConfigError, StaleHandleError
from prefect_torch.tasks import (
    data_split,
    model_define,
    training_backward,
    training_forward,
    training_init_optimizer,
    training_loss,
    training_lr_schedule,
    training_optimizer_step,
    training_prepare_batch,
    training_zero_grad,
)
from tests.flows import harness


@pytest.fixture(scope="module", autouse=True)
def stepwise_prefect_server(prefect_harness):
    """The step-wise tests' shared temporary Prefect server."""
    harness.acquire()
    yield
    harness.release()


def setup(rows: int = 100, seed: int = 0):
    """Splits (70 training rows of 3 features), a small MLP and its Adam optimizer."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(rows, 3)), columns=["a", "b", "c"])
    frame["y"] = frame["a"] - 2 * frame["b"]
    splits = data_split(frame, SplitSpec(target="y"))
    model = model_define(ModelSpec(hidden=[8], seed=seed), splits)
    return splits, model, training_init_optimizer(model, OptimizerSpec(lr=0.01))


def train_one_batch(splits, model, optimizer):
    """Prepare, zero, forward, loss, backward, step: one batch through the cards."""
    batch, _ = training_prepare_batch(splits, batch_index=0, batch_size=16)
    optimizer = training_zero_grad(optimizer)
    predictions, model = training_forward(model, batch)
    loss, _ = training_loss(predictions, batch)
    model, _ = training_backward(loss, model)
    model, optimizer, _ = training_optimizer_step(optimizer, model)
    return model, optimizer


def test_one_training_step_through_the_cards_updates_the_weights():
    @flow
    def one_step():
        splits, model, optimizer = setup()
        before = {k: v.clone() for k, v in model.model.state_dict().items()}
        batch, batch_info = training_prepare_batch(splits, batch_index=1, batch_size=16, epoch=1)
        optimizer = training_zero_grad(optimizer)
        predictions, model = training_forward(model, batch)
        loss, loss_value = training_loss(predictions, batch, "mse")
        model, gradients = training_backward(loss, model)
        model, optimizer, step_info = training_optimizer_step(optimizer, model, gradient_clip=1.0, step=1)
        after = model.model.state_dict()
        return batch_info, loss_value, gradients, step_info, any(not torch.equal(before[k], after[k]) for k in after)

    batch_info, loss_value, gradients, step_info, changed = one_step()

    assert batch_info == {"epoch": 1, "batch_index": 1, "num_batches": 5, "rows": 16, "loss_scale": 1.0,
                          "opens_group": True, "closes_group": True}
    assert loss_value > 0
    assert gradients["parameters_with_grad"] == 4  # two linear layers: weights and biases
    assert step_info["step"] == 1 and step_info["lr"] == 0.01 and step_info["grad_norm"] > 0
    assert changed


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"batch_index": 5, "batch_size": 16},
         r"batch_index 5 is out of range: 70 training rows in batches of 16 make 5 batches, numbered 0 to 4"),
        ({"batch_index": -1, "batch_size": 16}, r"batch_index -1 is out of range"),
        ({"batch_index": 0, "batch_size": 0}, r"batch_size must be a positive integer; got 0"),
        ({"batch_index": 0, "batch_size": 16, "accumulate": 0}, r"accumulate must be a positive integer; got 0"),
    ],
)
def test_prepare_batch_refuses_impossible_batches(arguments, message):
    @flow
    def prepare():
        splits, _, _ = setup()
        return training_prepare_batch(splits, **arguments)

    with pytest.raises(ConfigError, match=message):
        prepare()


def test_loss_names_both_shapes_when_predictions_and_targets_disagree():
    @flow
    def mismatched_loss():
        splits, _, _ = setup()
        batch, _ = training_prepare_batch(splits, batch_index=0, batch_size=16)
        return training_loss(torch.zeros(16, 2), batch, "mse")

    with pytest.raises(ConfigError, match=r"got predictions \(16, 2\) and targets \(16, 1\)"):
        mismatched_loss()


def test_optimizer_step_refuses_an_optimizer_built_for_another_model():
    @flow
    def crossed():
        splits, model, _ = setup()
        _, other_model, other_optimizer = setup(seed=1)
        batch, _ = training_prepare_batch(splits, batch_index=0, batch_size=16)
        predictions, model = training_forward(model, batch)
        loss, _ = training_loss(predictions, batch)
        model, _ = training_backward(loss, model)
        return training_optimizer_step(other_optimizer, model)

    with pytest.raises(ConfigError, match=r"optimizer was built for a different model.*training_init_optimizer"):
        crossed()


def test_a_card_given_a_stale_model_handle_says_how_to_fork():
    @flow
    def stale_model():
        splits, model, _ = setup()
        batch, _ = training_prepare_batch(splits, batch_index=0, batch_size=16)
        predictions, newer = training_forward(model, batch)
        loss, _ = training_loss(predictions, batch)
        return training_backward(loss, model)  # `model` is the handle from before the forward pass

    with pytest.raises(StaleHandleError, match=r"stale.*handle\.fork\(\)"):
        stale_model()


def test_a_card_given_a_stale_optimizer_handle_refuses_it():
    @flow
    def stale_optimizer():
        _, model, optimizer = setup()
        training_zero_grad(optimizer)
        return training_zero_grad(optimizer)

    with pytest.raises(StaleHandleError, match="optimizer handle .* is stale"):
        stale_optimizer()


def test_a_forked_model_trains_without_touching_the_original():
    @flow
    def branch():
        splits, model, _ = setup()
        fork = model.fork()
        optimizer = training_init_optimizer(fork, OptimizerSpec(name="sgd", lr=0.5))
        fork, optimizer = train_one_batch(splits, fork, optimizer)
        original, trained = model.model.state_dict(), fork.model.state_dict()
        return all(torch.equal(original[k], trained[k]) for k in original)

    assert branch() is False  # the fork moved on; `model` stayed valid and unchanged


def test_lr_schedule_steps_the_schedule_and_moves_the_optimizer_on():
    @flow
    def schedule():
        splits, model, optimizer = setup()
        scheduler = build_scheduler(SchedulerSpec(name="step", step_size=1, gamma=0.5), optimizer.live, 3, 1)
        model, optimizer = train_one_batch(splits, model, optimizer)
        newer, info = training_lr_schedule(optimizer, scheduler)
        try:
            training_zero_grad(optimizer)
        except StaleHandleError:
            stale = True
        else:
            stale = False
        return info, stale

    info, stale = schedule()
    assert info == {"lr_before": 0.01, "lr": 0.005}
    assert stale


def test_lr_schedule_refuses_a_schedule_of_another_optimizer():
    @flow
    def crossed():
        _, _, optimizer = setup()
        _, _, other = setup(seed=1)
        scheduler = build_scheduler(SchedulerSpec(name="cosine"), other.live, 3, 1)
        return training_lr_schedule(optimizer, scheduler)

    with pytest.raises(ConfigError, match="built for a different optimizer"):
        crossed()


def test_lr_schedule_asks_for_the_validation_loss_of_a_plateau_schedule():
    @flow
    def plateau():
        _, _, optimizer = setup()
        scheduler = build_scheduler(SchedulerSpec(name="plateau"), optimizer.live, 3, 1)
        return training_lr_schedule(optimizer, scheduler)

    with pytest.raises(ConfigError, match="pass val_loss"):
        plateau()
