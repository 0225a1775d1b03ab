"""The Train card's step as CUDA graphs, on a real GPU.

Skipped without CUDA (see conftest.py). The graphed step must train like the
eager one (same steps, same lr schedule, weights within rounding), reproduce
itself bitwise run to run, run the ragged last batch eagerly, and fall back to
the eager step with one log line when capture fails.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from prefect_torch.engine import cudagraph
from prefect_torch.engine.loop import Trainer, TrainSpec
from prefect_torch.engine.models import ModelSpec, build_model
from prefect_torch.engine.optim import OptimizerSpec, SchedulerSpec, build_optimizer
from prefect_torch.errors import DeviceError
from tests.datasets import signal_splits

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def make_splits(problem: str, rows: int = 2_003):
    return signal_splits(problem, rows, features=6)


@pytest.fixture(scope="module")
def all_splits():
    return {problem: make_splits(problem) for problem in ("regression", "binary", "multiclass")}


def run(splits, spec: TrainSpec, optimizer=OptimizerSpec(), model_spec=ModelSpec(hidden=[64, 64]), module=None):
    model = module or build_model(model_spec, splits.info.n_features, splits.info.n_outputs)
    model = model.to(CUDA)
    trainer = Trainer(model, build_optimizer(optimizer, model), splits, spec)
    result = trainer.fit()
    torch.cuda.synchronize()
    return trainer, result


CASES = {
    # every case's training split (1,403 or 1,401 rows) leaves a ragged last batch
    "adam": ("regression", dict(epochs=3, batch_size=64), OptimizerSpec()),
    "adamw-accumulate-clip": ("binary", dict(epochs=2, batch_size=50, accumulate=3, clip=0.5),
                              OptimizerSpec(name="adamw", weight_decay=0.01)),
    "sgd-bf16-cosine-per-step": ("multiclass", dict(epochs=2, batch_size=64, precision="bf16", clip=1.0,
                                                    scheduler=SchedulerSpec(name="cosine", interval="step")),
                                 OptimizerSpec(name="sgd", lr=0.05, momentum=0.9)),
    "adam-step-schedule-per-epoch": ("regression", dict(epochs=4, batch_size=128,
                                                        scheduler=SchedulerSpec(name="step", step_size=1, gamma=0.5)),
                                     OptimizerSpec()),
}


@pytest.mark.parametrize("case", CASES)
def test_the_graphed_step_trains_like_the_eager_step(all_splits, case):
    problem, spec, optimizer = CASES[case]
    splits = all_splits[problem]
    assert len(splits.train) % spec["batch_size"]  # a ragged last batch, run eagerly
    graphed, g = run(splits, TrainSpec(device="cuda", cuda_graphs="on", **spec), optimizer)
    eager, e = run(splits, TrainSpec(device="cuda", cuda_graphs="off", **spec), optimizer)

    assert graphed.step_fn.graphed and not eager.step_fn.graphed
    assert g.state.step == e.state.step == spec["epochs"] * graphed.steps_per_epoch
    assert [r["lr"] for r in g.history] == [r["lr"] for r in e.history]  # the schedule ran the same
    bf16 = spec.get("precision") == "bf16"
    rtol, atol = (2e-2, 2e-3) if bf16 else (1e-3, 1e-4)
    np.testing.assert_allclose([r["train_loss"] for r in g.history], [r["train_loss"] for r in e.history],
                               rtol=rtol)
    for name, value in graphed.model.state_dict().items():
        torch.testing.assert_close(value, eager.model.state_dict()[name], rtol=rtol, atol=atol, msg=name)


def test_accumulation_captures_one_graph_per_kind_of_batch(all_splits):
    splits = all_splits["binary"]
    trainer, _ = run(splits, TrainSpec(device="cuda", epochs=1, batch_size=50, accumulate=3, clip=0.5))
    # 1,401 rows: 28 full batches of 50 in groups of 3; the 10th group is batch 27 (full) and
    # the ragged batch 28 (1 row), so batch 27 weighs 50/51 and the ragged one runs eagerly.
    assert len(splits.train) == 1_401
    assert sorted(trainer.step_fn.graphs) == [(False, False, 1 / 3), (False, True, 1 / 3), (True, False, 1 / 3),
                                              (True, False, 50 / 51)]


def test_graphed_runs_are_bitwise_reproducible(all_splits):
    splits = all_splits["multiclass"]
    spec = TrainSpec(device="cuda", epochs=2, batch_size=64, accumulate=2, clip=1.0, precision="bf16",
                     scheduler=SchedulerSpec(name="cosine", interval="step"))
    model_spec = ModelSpec(hidden=[64, 64], dropout=0.1)
    first, a = run(splits, spec, OptimizerSpec(name="adamw"), model_spec)
    second, b = run(splits, spec, OptimizerSpec(name="adamw"), model_spec)
    assert first.step_fn.graphed and second.step_fn.graphed
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name]), name


class SyncingModel(nn.Module):
    """A model whose forward reads a value back to the host: it cannot be captured."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.abs().sum().item() < 0:  # never true; the .item() is the point
            x = -x
        return self.inner(x)


def syncing_model(splits):
    torch.manual_seed(0)
    return SyncingModel(build_model(ModelSpec(hidden=[32]), splits.info.n_features, splits.info.n_outputs))


def test_a_failed_capture_falls_back_with_one_log_line_and_trains_as_eager(all_splits, caplog):
    splits = all_splits["regression"]
    spec = dict(device="cuda", epochs=2, batch_size=64)
    with caplog.at_level(logging.INFO, logger=cudagraph.__name__):
        fallen, f = run(splits, TrainSpec(**spec), module=syncing_model(splits))
    lines = [r for r in caplog.records if r.name == cudagraph.__name__]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "CUDA graphs not used (capture failed:" in lines[0].getMessage()
    assert not fallen.step_fn.graphed and fallen.step_fn.reason.startswith("capture failed:")

    # The warm-up trained a few steps before capture failed; all of it was put back.
    eager, e = run(splits, TrainSpec(**spec, cuda_graphs="off"), module=syncing_model(splits))
    assert f.history[-1]["train_loss"] == e.history[-1]["train_loss"]
    for name, value in fallen.model.state_dict().items():
        assert torch.equal(value, eager.model.state_dict()[name]), name


def test_cuda_graphs_on_raises_when_capture_fails(all_splits):
    splits = all_splits["regression"]
    with pytest.raises(DeviceError, match=r"cuda_graphs='on'.*capture failed"):
        run(splits, TrainSpec(device="cuda", epochs=1, batch_size=64, cuda_graphs="on"), module=syncing_model(splits))
