"""Which rows form which batch, and which batches form an accumulation group.

Both the fast loop and the step-wise flow take their batches from here, so they
see the same rows in the same order for the same seed and epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefect_torch.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    index: int        # batch index within the epoch
    start: int        # row range in the epoch's shuffled order
    stop: int
    loss_scale: float  # rows of this batch / rows of its accumulation group
    opens_group: bool  # zero the gradients before this batch
    closes_group: bool  # take an optimizer step after this batch


def num_batches(rows: int, batch_size: int) -> int:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer; got {batch_size}.")
    return (rows + batch_size - 1) // batch_size


def plan_epoch(rows: int, batch_size: int, accumulate: int) -> list[BatchPlan]:
    """Batches of an epoch; a final partial accumulation group is still stepped.

    Each batch's loss is weighted by its share of the group's rows, so k
    accumulated batches give the gradient of one batch of their combined rows
    (for mean-reduced losses), ragged last batch included.
    """
    if accumulate < 1:
        raise ConfigError(f"accumulate must be a positive integer; got {accumulate}.")
    total = num_batches(rows, batch_size)
    plans = []
    for group_start in range(0, total, accumulate):
        members = range(group_start, min(group_start + accumulate, total))
        group_rows = min(members[-1] * batch_size + batch_size, rows) - group_start * batch_size
        for index in members:
            start, stop = index * batch_size, min(index * batch_size + batch_size, rows)
            plans.append(BatchPlan(index, start, stop, (stop - start) / group_rows,
                                   index == members[0], index == members[-1]))
    return plans


def epoch_order(rows: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """Row order of an epoch: a pure function of (seed, epoch), so a resumed run matches."""
    if not shuffle:
        return torch.arange(rows)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(rows, generator=generator)


@dataclass(frozen=True)
class Batch:
    """One batch of training rows and where it sits in the loop."""

    X: torch.Tensor
    y: torch.Tensor
    epoch: int          # 1-based, as shown to users
    index: int          # 0-based batch index within the epoch
    num_batches: int
    plan: BatchPlan
    problem: str
    key: str

    @property
    def rows(self) -> int:
        return self.plan.stop - self.plan.start

    def info(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch_index": self.index,
            "num_batches": self.num_batches,
            "rows": self.rows,
            "loss_scale": self.plan.loss_scale,
            "opens_group": self.plan.opens_group,
            "closes_group": self.plan.closes_group,
        }

    def __repr__(self) -> str:
        return f"Batch(e{self.epoch}-b{self.index}, rows={self.rows})"


def take_batch(X: torch.Tensor, y: torch.Tensor, plan: BatchPlan, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = order[plan.start:plan.stop]
    return X[rows], y[rows]


def check_batch_index(batch_index: int, total: int, rows: int, batch_size: int) -> None:
    if not 0 <= batch_index < total:
        raise ConfigError(
            f"batch_index {batch_index} is out of range: {rows} training rows in batches of {batch_size} "
            f"make {total} batches, numbered 0 to {total - 1}."
        )
