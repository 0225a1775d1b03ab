"""A step-wise training run that SIGKILLs its own process after a given optimizer step.

    python tests/flows/killable_run.py CSV OUTPUT CHECKPOINTS KILL_AT_STEP

Run by test_stepwise_resume.py against the test session's Prefect server; 0 as
KILL_AT_STEP runs to the end. Both runs pass the same after_step task, so they
share one checkpoint lineage.
"""

from __future__ import annotations

import os
import signal
import sys

from prefect import task

from prefect_torch.engine.loop import TrainSpec
from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec, SchedulerSpec
from prefect_torch.flows import DatasetSpec, stepwise_train_flow

# 140 training rows in batches of 35: 4 steps an epoch; checkpoints after steps 3, 4
# (epoch end), 6, 8 (epoch end), 9, 12.
TRAINING = TrainSpec(
    epochs=3, batch_size=35, device="cpu", seed=5, checkpoint_every=3,
    scheduler=SchedulerSpec(name="cosine", interval="step"),
)
MODEL = ModelSpec(hidden=[16, 16], dropout=0.2)
OPTIMIZER = OptimizerSpec(name="adam", lr=0.02)


@task
def die_after_step(model, optimizer, step_info: dict) -> None:
    """Stand-in for a crash: the process disappears without cleaning up."""
    if step_info["step"] == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)


def main(csv: str, output: str, checkpoints: str) -> None:
    result = stepwise_train_flow(
        DatasetSpec(uri=csv, target="y"), MODEL, OPTIMIZER, TRAINING,
        output=output, checkpoint_dir=checkpoints, after_step=die_after_step,
    )
    print(f"steps={result.steps}")


if __name__ == "__main__":
    csv, output, checkpoints, kill_at = sys.argv[1:5]
    os.environ["KILL_AT_STEP"] = kill_at
    main(csv, output, checkpoints)
