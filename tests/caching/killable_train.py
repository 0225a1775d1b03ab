"""The fast-path cards in a flow; SIGKILLs its own process at the Nth forward pass.

    python -m tests.caching.killable_train CSV WEIGHTS_OUT KILL_AT_FORWARD

0 as KILL_AT_FORWARD runs to the end and writes the final weights (safetensors).
An odd N with accumulate=2 dies inside an accumulation window.
"""

from __future__ import annotations

import os
import signal
import sys

from prefect import flow
from safetensors.torch import save_file

from prefect_torch.engine.data import LoadSpec
from prefect_torch.engine.loop import TrainSpec
from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec, SchedulerSpec
from prefect_torch.engine.split import SplitSpec
from prefect_torch.tasks import data_load, data_split, model_define, train
from prefect_torch.tasks._common import persisted_in

# 140 training rows in batches of 20 = 7 batches, groups of 2: 4 steps an epoch.
TRAINING = TrainSpec(epochs=3, batch_size=20, accumulate=2, checkpoint_every=2, seed=5, device="cpu",
                     scheduler=SchedulerSpec(name="cosine", interval="step"))


def killer(at: int):
    calls = {"n": 0}

    def hook(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash: no cleanup, no final state

    return hook


@flow
def fast_path(csv: str, kill_at: int):
    load, split, define, fit = persisted_in(None, data_load, data_split, model_define, train)
    splits = split(load(LoadSpec(uri=csv)), SplitSpec(target="y"))
    handle = define(ModelSpec(hidden=[16, 16], dropout=0.2), splits)
    if kill_at:
        handle.model.register_forward_hook(killer(kill_at))
    return fit(splits, handle, OptimizerSpec(lr=0.02), TRAINING)


if __name__ == "__main__":
    csv, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    result = fast_path(csv, kill_at)
    save_file({k: v.contiguous() for k, v in result.model.model.state_dict().items()}, out)
    print(f"steps={result.steps}")
