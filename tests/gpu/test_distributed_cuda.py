"""Data-parallel settings on a CUDA machine (skipped without a GPU, see conftest.py).

``pytest tests/gpu -m gpu``. processes=1 must be today's single-GPU path; more CUDA
processes than GPUs must fail before anything is launched.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from prefect import flow

from prefect_torch import tasks
from prefect_torch.engine.distributed import DistributedTrainer, check_parallel, is_parallel
from prefect_torch.engine.loop import TrainSpec, Trainer
from prefect_torch.engine.models import ModelSpec, build_model
from prefect_torch.engine.optim import OptimizerSpec, build_optimizer
from prefect_torch.engine.split import SplitSpec, split_table
from prefect_torch.errors import DeviceError

pytestmark = pytest.mark.gpu

MODEL = ModelSpec(hidden=[64, 64])
OPTIMIZER = OptimizerSpec(lr=3e-3)


def make_splits(rows: int = 1_003):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(rows, 6)), columns=[f"x{i}" for i in range(6)])
    frame["y"] = frame.x0 * 2 - frame.x1 + rng.normal(scale=0.1, size=rows)
    return split_table(frame, SplitSpec(target="y"))


def engine_weights(splits, spec: TrainSpec, distributed: bool = False) -> dict[str, torch.Tensor]:
    model = build_model(MODEL, splits.info.n_features, 1).cuda()
    optimizer = build_optimizer(OPTIMIZER, model)
    if distributed:
        DistributedTrainer(model, optimizer, splits, spec, rank=0, world=1).fit()
    else:
        Trainer(model, optimizer, splits, spec).fit()
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


@pytest.mark.usefixtures("prefect_harness")
def test_one_gpu_with_one_process_is_the_single_process_path():
    splits = make_splits()
    spec = TrainSpec(epochs=2, batch_size=32, device="cuda", processes=1)
    assert not is_parallel(spec)

    @flow
    def train_card():
        model = tasks.model_define(MODEL, splits)
        return tasks.train(splits, model, OPTIMIZER, spec)

    output = train_card()
    assert output.device.startswith("cuda")
    expected = engine_weights(splits, spec)
    for name, value in output.model.model.state_dict().items():
        assert torch.equal(value.detach().cpu(), expected[name]), name


def test_more_cuda_processes_than_gpus_fail_before_launching_and_name_the_fix():
    gpus = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=rf"it has {gpus} GPU.*Set processes to at most {gpus}"):
        check_parallel(TrainSpec(device="cuda", processes=gpus + 1))


def test_ddp_over_nccl_on_a_group_of_one_trains_like_the_plain_trainer():
    splits = make_splits()
    spec = TrainSpec(epochs=2, batch_size=32, accumulate=2, clip=1.0, device="cuda")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parallel = engine_weights(splits, spec, distributed=True)
    finally:
        dist.destroy_process_group()
    plain = engine_weights(splits, spec)
    for name, value in plain.items():
        torch.testing.assert_close(parallel[name], value, rtol=1e-4, atol=1e-5, msg=name)
