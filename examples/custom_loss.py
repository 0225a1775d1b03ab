"""Custom loss with regularization: the seeds' example pipeline, card by card.

    Forward Pass → Calculate Loss (MSE) → [your card: add L1 penalty] → Backward Pass → Optimizer Step

Two ways to run the same training:

* ``custom_loss_flow`` wires the cards one by one in your own flow, as in the
  seeds: you own the loop and can put any task between any two cards.
* ``stepwise_train_flow(..., after_loss=add_l1_penalty)`` lets prefect-torch run
  the loop (epochs, shuffling, validation, checkpoints, resume) and calls your
  card at the same point. With the same specs both end with identical weights.

Run it::

    PYTHONPATH=. python examples/custom_loss.py data.csv --target y --epochs 5 --l1 1e-4
    PYTHONPATH=. python examples/custom_loss.py data.csv --target y --builtin-loop
"""

from __future__ import annotations

import argparse
import json

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from prefect_torch.engine.batching import num_batches
from prefect_torch.engine.handles import ModelHandle
from prefect_torch.engine.loop import TrainSpec
from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec
from prefect_torch.flows import DatasetSpec, stepwise_train_flow
from prefect_torch.tasks import (
    data_load,
    data_split,
    evaluate,
    model_define,
    training_backward,
    training_forward,
    training_init_optimizer,
    training_loss,
    training_optimizer_step,
    training_prepare_batch,
    training_zero_grad,
)

L1_WEIGHT = 1e-4


@task(name="add_l1_penalty", cache_policy=NO_CACHE, persist_result=False)
def add_l1_penalty(loss: torch.Tensor, model: ModelHandle, batch_data, weight: float = L1_WEIGHT) -> torch.Tensor:
    """Custom card: the loss plus ``weight`` x the sum of absolute weights (L1 regularization).

    Its signature (loss, model, batch_data) is the after_loss contract of
    stepwise_train_flow, so the same card serves both ways of running.
    """
    penalty = sum(parameter.abs().sum() for parameter in model.model.parameters())
    return loss + weight * penalty


@flow(name="custom-loss")
def custom_loss_flow(
    dataset: DatasetSpec,
    model: ModelSpec = ModelSpec(),
    optimizer: OptimizerSpec = OptimizerSpec(),
    training: TrainSpec = TrainSpec(epochs=5, batch_size=32),
    l1: float = L1_WEIGHT,
) -> dict:
    """Train with the step cards wired by hand, adding an L1 penalty to the MSE loss
    (no penalty card when ``l1`` is 0); returns the test metrics and the weights.

    The loop is the seeds' basic one: a step every batch, with gradient clipping if
    ``training.clip`` is set. Accumulation, schedules, validation, early stopping
    and checkpoints are what stepwise_train_flow adds around the same cards.
    """
    splits = data_split(data_load(dataset.load_spec()), dataset.split_spec())
    handle = model_define(model, splits)
    opt = training_init_optimizer(handle, optimizer)
    torch.manual_seed(training.seed)  # dropout draws from torch's global RNG, as in the fast path
    batches = num_batches(len(splits.train), training.batch_size)
    step = 0
    for epoch in range(1, training.epochs + 1):
        for batch_index in range(batches):
            batch, _ = training_prepare_batch(
                splits, batch_index=batch_index, batch_size=training.batch_size, epoch=epoch,
                seed=training.seed, shuffle=training.shuffle,
            )
            opt = training_zero_grad(opt)
            predictions, handle = training_forward(handle, batch)
            loss, _ = training_loss(predictions, batch, "mse")
            if l1 > 0:
                loss = add_l1_penalty(loss, handle, batch, weight=l1)
            handle, _ = training_backward(loss, handle)
            step += 1
            handle, opt, _ = training_optimizer_step(opt, handle, gradient_clip=training.clip or 0.0, step=step)
    metrics = evaluate(handle, splits, "test")
    return {"metrics": metrics, "steps": step, "weights": handle.model.state_dict()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Train with an L1-regularised MSE loss, card by card.")
    parser.add_argument("csv", help="CSV or Parquet file (local path or s3:// URL).")
    parser.add_argument("--target", required=True, help="Column to predict (a regression target).")
    parser.add_argument("--epochs", type=int, default=5, help="Passes over the training split.")
    parser.add_argument("--batch-size", type=int, default=32, help="Rows per batch.")
    parser.add_argument("--l1", type=float, default=L1_WEIGHT, help="Weight of the L1 penalty (0: none).")
    parser.add_argument("--builtin-loop", action="store_true",
                        help="Let stepwise_train_flow run the loop and call add_l1_penalty after each loss.")
    args = parser.parse_args(argv)

    dataset = DatasetSpec(uri=args.csv, target=args.target, problem="regression")
    training = TrainSpec(epochs=args.epochs, batch_size=args.batch_size)
    if args.builtin_loop:
        if args.l1 != L1_WEIGHT:
            parser.error("--builtin-loop calls add_l1_penalty with its default weight; drop --l1.")
        result = stepwise_train_flow(dataset, training=training, after_loss=add_l1_penalty)
        summary = {"metrics": result.metrics, "steps": result.steps, "model_uri": result.model_uri}
    else:
        result = custom_loss_flow(dataset, training=training, l1=args.l1)
        summary = {"metrics": result["metrics"], "steps": result["steps"]}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
