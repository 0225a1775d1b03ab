"""Choosing between the CUDA-graphed step and the eager one, checked on CPU.

Capture itself needs a GPU (tests/gpu/test_cudagraph_on_gpu.py). Here: which reason is
given for which situation, the fallback's single log line, what ``cuda_graphs='on'``
does when capture is impossible, and that the CPU step is exactly the loop's own
``train_batch`` (same weights, bitwise). ``blocker(trainer, device=CUDA)`` asks the
CUDA questions of a CPU trainer: nothing allocates on the device.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from prefect_torch.engine import cudagraph
from prefect_torch.engine.batching import plan_epoch
from prefect_torch.engine.cudagraph import EagerStep, GraphedStep, blocker, make_step
from prefect_torch.engine.loop import Callback, Trainer, TrainSpec
from prefect_torch.engine.models import ModelSpec, build_model
from prefect_torch.engine.optim import OptimizerSpec, optimizer_options
from prefect_torch.engine.split import SplitSpec, split_table
from prefect_torch.errors import DeviceError
from prefect_torch.reporting.training import TrainingReport

CUDA = torch.device("cuda")  # only a name here


@pytest.fixture(scope="module")
def splits():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(203, 5)), columns=[f"x{i}" for i in range(5)])
    frame["target"] = frame.x0 * 2 - frame.x1 + rng.normal(scale=0.1, size=203)
    return split_table(frame, SplitSpec(target="target", problem="regression"))


def trainer_for(splits, optimizer: str = "adam", fused: bool = True, callbacks=(), **spec) -> Trainer:
    """A CPU trainer whose optimizer has the options build_optimizer picks on CUDA (fused)."""
    model = build_model(ModelSpec(hidden=[8]), splits.info.n_features, splits.info.n_outputs)
    options = optimizer_options(OptimizerSpec(name=optimizer), "cuda" if fused else "cpu")
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
           "rmsprop": torch.optim.RMSprop}[optimizer]
    trainer = Trainer(model, cls(model.parameters(), **options), splits,
                      TrainSpec(**{"epochs": 1, "batch_size": 16, **spec}), list(callbacks))
    trainer.check_every_step = False  # as on CUDA
    return trainer


class ReadsLoss(Callback):
    def on_step_end(self, trainer):
        float(trainer.last_loss)  # a host read every step


class CountsSteps(Callback):
    cuda_graph_safe = True

    def __init__(self):
        self.steps = 0

    def on_step_end(self, trainer):
        self.steps += 1


class EpochsOnly(Callback):
    def on_epoch_end(self, trainer, record):
        pass


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_a_plain_cuda_run_with_a_fused_optimizer_can_be_captured(splits, optimizer):
    assert blocker(trainer_for(splits, optimizer), device=CUDA) is None


@pytest.mark.parametrize("situation,expected", [
    (dict(cuda_graphs="off"), "cuda_graphs='off'"),
    (dict(compile=True), "compile=True"),
    (dict(optimizer="rmsprop"), "optimizer RMSprop has no fused CUDA step"),
    (dict(fused=False), "optimizer Adam was built without fused=True"),
    (dict(callbacks=[ReadsLoss()]), "callback ReadsLoss runs after every step and may read the GPU"),
    (dict(batch_size=1000), "no batch is full: 143 training rows in batches of 1000"),
])
def test_each_situation_that_prevents_capture_is_named(splits, situation, expected):
    situation = dict(situation)
    kwargs = {k: situation.pop(k) for k in ("optimizer", "fused", "callbacks") if k in situation}
    trainer = trainer_for(splits, **kwargs)
    trainer.spec = trainer.spec.model_copy(update=situation)
    if "batch_size" in situation:
        trainer.plans = plan_epoch(len(trainer.train_data), situation["batch_size"], 1)
    assert expected in blocker(trainer, device=CUDA)


def test_the_cpu_device_and_a_per_step_loss_check_are_reasons(splits):
    trainer = trainer_for(splits)
    assert blocker(trainer) == "the device is cpu; CUDA graphs need a CUDA GPU"
    trainer.check_every_step = True
    assert "checks the loss on the host after every batch" in blocker(trainer, device=CUDA)


def test_callbacks_without_a_per_step_hook_or_declared_safe_keep_the_graphs(splits):
    callbacks = [EpochsOnly(), CountsSteps(), TrainingReport(ModelSpec(), OptimizerSpec())]
    assert blocker(trainer_for(splits, callbacks=callbacks), device=CUDA) is None
    unsafe = CountsSteps()
    unsafe.cuda_graph_safe = False  # a declaration wins over the override check
    assert "CountsSteps" in blocker(trainer_for(splits, callbacks=[EpochsOnly(), unsafe]), device=CUDA)


def test_distributed_data_parallel_keeps_the_eager_step(splits, monkeypatch):
    trainer = trainer_for(splits)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    assert "DistributedDataParallel" in blocker(trainer, device=CUDA)


def test_a_cuda_fallback_logs_one_line_naming_the_reason(splits, caplog):
    trainer = trainer_for(splits, "rmsprop")
    trainer.device = CUDA  # only read by the decision; the eager step is never called here
    with caplog.at_level(logging.DEBUG, logger=cudagraph.__name__):
        step = make_step(trainer)
    assert isinstance(step, EagerStep) and not step.graphed
    lines = [r for r in caplog.records if r.name == cudagraph.__name__]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert lines[0].getMessage() == (
        "CUDA graphs not used (the optimizer RMSprop has no fused CUDA step to capture (adam, adamw and "
        "sgd have one)); training with the eager step")


def test_a_capturable_cuda_run_gets_the_graphed_step(splits):
    trainer = trainer_for(splits)
    trainer.device = CUDA  # GraphedStep only captures at its first batch, which this never calls
    step = make_step(trainer)
    assert isinstance(step, GraphedStep) and step.graphed and step.reason == "captured at the first full batch"


def test_cuda_graphs_on_refuses_a_run_it_cannot_capture_before_training(splits):
    trainer = trainer_for(splits, cuda_graphs="on")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(DeviceError, match=r"cuda_graphs='on'.*the device is cpu.*cuda_graphs='auto'"):
        trainer.fit()
    assert trainer.state.step == 0
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_on_cpu_the_step_is_the_loops_own_train_batch_bitwise(splits, caplog):
    """fit() with the chosen step ≡ the loop driven through Trainer.train_batch directly."""
    spec = dict(accumulate=3, clip=0.5, batch_size=16)
    chosen = trainer_for(splits, fused=False, **spec)
    chosen.check_every_step = True  # the CPU default
    with caplog.at_level(logging.INFO, logger=cudagraph.__name__):
        chosen.fit()
    assert isinstance(chosen.step_fn, EagerStep) and "device is cpu" in chosen.step_fn.reason
    assert not [r for r in caplog.records if r.name == cudagraph.__name__]  # expected: no INFO line

    by_hand = trainer_for(splits, fused=False, **spec)
    by_hand.check_every_step = True
    by_hand.begin()
    loss_sum = torch.zeros((), dtype=torch.float64)
    by_hand.model.train()
    for plan, (xb, yb) in zip(by_hand.plans, by_hand.source.batches(0, by_hand.plans)):
        by_hand.train_batch(plan, xb, yb, loss_sum)
    assert by_hand.state.step == chosen.state.step == chosen.steps_per_epoch > 1
    for name, value in chosen.model.state_dict().items():
        assert torch.equal(value, by_hand.model.state_dict()[name]), name
