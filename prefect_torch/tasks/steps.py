"""The per-batch cards: Prepare Batch, Zero Gradients, Forward Pass, Calculate
Loss, Backward Pass, Optimizer Step.

Each is a thin task over ``engine.steps``. Model and optimizer travel as handles
(live objects, no re-serialisation); every card that changes one in place
returns a new handle, so passing an older one raises a clear StaleHandleError.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
from prefect import task

from prefect_torch.engine import steps
from prefect_torch.engine.batching import (
    Batch,
    check_batch_index,
    epoch_order,
    num_batches,
    plan_epoch,
    take_batch,
)
from prefect_torch.engine.handles import ModelHandle, OptimizerHandle, lineage_key
from prefect_torch.engine.problem import LossName, resolve_loss
from prefect_torch.engine.split import Splits
from prefect_torch.errors import ConfigError
from prefect_torch.tasks._common import STEP_CARD

_BATCH_NAME = "e{batch_data.epoch}-b{batch_data.index}"


class PreparedBatch(NamedTuple):
    batch_data: Batch
    batch_info: dict


class ForwardOutput(NamedTuple):
    predictions: torch.Tensor
    model: ModelHandle


class LossOutput(NamedTuple):
    loss: torch.Tensor
    # Read on demand (float(), f-strings, arithmetic): on CUDA reading it waits for the GPU.
    loss_value: steps.DeviceScalar


class BackwardOutput(NamedTuple):
    model: ModelHandle
    gradients_computed: dict


class StepOutput(NamedTuple):
    model: ModelHandle
    optimizer: OptimizerHandle
    step_info: dict


@lru_cache(maxsize=4)
def _order(rows: int, seed: int, epoch: int, shuffle: bool, device: torch.device) -> torch.Tensor:
    # Cached on the split's device: one copy per epoch, not one per Prepare Batch card.
    return epoch_order(rows, seed, epoch, shuffle).to(device)


@lru_cache(maxsize=16)
def _plans(rows: int, batch_size: int, accumulate: int):
    return plan_epoch(rows, batch_size, accumulate)


@task(name="training_prepare_batch", task_run_name="training_prepare_batch[e{epoch}-b{batch_index}]", **STEP_CARD)
def training_prepare_batch(
    splits: Splits,
    batch_index: int = 0,
    batch_size: int = 32,
    epoch: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    accumulate: int = 1,
) -> PreparedBatch:
    """Prepare Batch: rows ``batch_index`` of epoch ``epoch`` (1-based) of the train split.

    The epoch's row order is a pure function of (seed, epoch), the same order the
    fast Train card uses, so both drivers see identical batches.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer; got {batch_size}.")
    if accumulate < 1:
        raise ConfigError(f"accumulate must be a positive integer; got {accumulate}.")
    if epoch < 1:
        raise ConfigError(f"epoch counts from 1; got {epoch}.")
    train = splits.train
    rows = len(train)
    total = num_batches(rows, batch_size)
    check_batch_index(batch_index, total, rows, batch_size)
    plan = _plans(rows, batch_size, accumulate)[batch_index]
    order = _order(rows, seed, epoch - 1, shuffle, train.X.device)
    X, y = take_batch(train.X, train.y, plan, order)
    key = lineage_key("training_prepare_batch", [batch_index, batch_size, epoch, seed, shuffle, accumulate], splits.key)
    batch = Batch(X, y, epoch, batch_index, total, plan, splits.info.problem, key)
    return PreparedBatch(batch, batch.info())


@task(name="training_zero_grad", **STEP_CARD)
def training_zero_grad(optimizer: OptimizerHandle) -> OptimizerHandle:
    """Zero Gradients: clear the gradients left by the previous step."""
    steps.zero_grad(optimizer.live)
    return optimizer.advance("training_zero_grad")


@task(name="training_forward", task_run_name="training_forward[" + _BATCH_NAME + "]", **STEP_CARD)
def training_forward(model: ModelHandle, batch_data: Batch) -> ForwardOutput:
    """Forward Pass: predictions for the batch (the model stays in training mode)."""
    module = model.model
    module.train()
    predictions = steps.forward(module, batch_data.X)
    # Training-mode forward can update BatchNorm statistics: the model moved on.
    return ForwardOutput(predictions, model.advance("training_forward", None, batch_data.key))


@task(name="training_loss", task_run_name="training_loss[" + _BATCH_NAME + "]", **STEP_CARD)
def training_loss(predictions: torch.Tensor, batch_data: Batch, loss_type: LossName = "auto") -> LossOutput:
    """Calculate Loss: mse, mae, huber (regression), bce (binary), cross_entropy (multiclass)."""
    loss_fn = steps.make_loss(resolve_loss(loss_type, batch_data.problem))
    loss = steps.compute_loss(loss_fn, predictions, batch_data.y)
    return LossOutput(loss, steps.DeviceScalar(loss))


@task(name="training_backward", **STEP_CARD)
def training_backward(
    loss: torch.Tensor, model: ModelHandle, retain_graph: bool = False, loss_scale: float = 1.0
) -> BackwardOutput:
    """Backward Pass: gradients of ``loss * loss_scale`` added to the model's ``.grad``.

    Use ``loss_scale = 1/k`` (or ``batch_data.plan.loss_scale``) to accumulate k batches.
    """
    module = model.model
    steps.backward(loss, scale=loss_scale, retain_graph=retain_graph)
    with_grad = sum(1 for p in module.parameters() if p.grad is not None)
    return BackwardOutput(
        model.advance("training_backward", [retain_graph, loss_scale]),
        {"parameters_with_grad": with_grad, "loss_scale": loss_scale},
    )


@task(name="training_optimizer_step", **STEP_CARD)
def training_optimizer_step(
    optimizer: OptimizerHandle, model: ModelHandle, gradient_clip: float = 0.0, step: int = 0
) -> StepOutput:
    """Optimizer Step: update the weights (clipping the gradient norm first if > 0)."""
    optimizer.check_model(model)
    info = steps.optimizer_step(optimizer.live, model.model, gradient_clip or None, step)
    step_info = {"step": info.step, "lr": info.lr}
    if info.grad_norm is not None:
        step_info["grad_norm"] = steps.DeviceScalar(info.grad_norm)
    return StepOutput(
        model.advance("training_optimizer_step", [gradient_clip], optimizer.key),
        optimizer.advance("training_optimizer_step", model.key),
        step_info,
    )
