"""The LR Scheduler card: step a learning-rate schedule between training steps.

Build the schedule once with ``prefect_torch.engine.optim.build_scheduler`` (the
step-wise flow uses its Trainer's), then run this card after every optimizer step
or at every epoch end, as ``SchedulerSpec.interval`` says.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from prefect import task

from prefect_torch.engine.handles import OptimizerHandle
from prefect_torch.engine.optim import current_lr, step_scheduler
from prefect_torch.errors import ConfigError
from prefect_torch.tasks._common import STEP_CARD


class ScheduleOutput(NamedTuple):
    optimizer: OptimizerHandle
    schedule_info: dict


@task(name="training_lr_schedule", **STEP_CARD)
def training_lr_schedule(
    optimizer: OptimizerHandle, scheduler: Any, val_loss: float | None = None
) -> ScheduleOutput:
    """LR Scheduler: advance ``scheduler`` one step (step, cosine) or feed it the
    validation loss (plateau); returns the optimizer with its new learning rate."""
    live = optimizer.live
    if getattr(scheduler, "optimizer", None) is not live:
        raise ConfigError(
            "This LR scheduler was built for a different optimizer: pass the scheduler built from the "
            "optimizer handle you are training with (build_scheduler(spec, optimizer.live, ...))."
        )
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and val_loss is None:
        raise ConfigError(
            "The plateau scheduler follows the validation loss: pass val_loss (the epoch's validation "
            "loss) to training_lr_schedule."
        )
    lr_before = current_lr(live)
    step_scheduler(scheduler, val_loss)
    # The learning rate lives in the optimizer's param groups: the optimizer moved on.
    return ScheduleOutput(
        optimizer.advance("training_lr_schedule"),
        {"lr_before": lr_before, "lr": current_lr(live)},
    )
