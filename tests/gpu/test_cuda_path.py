"""The CUDA path on a real GPU: no host syncs, streaming = resident, cards stay on the GPU.

Skipped without CUDA (see conftest.py). On a GPU machine:
``pytest tests/gpu -m gpu`` (add ``-m "gpu and slow"`` for the compile test).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from prefect_torch.engine.batching import plan_epoch
from prefect_torch.engine.loop import Callback, Trainer, TrainSpec
from prefect_torch.engine.models import ModelSpec, build_model
from prefect_torch.engine.optim import OptimizerSpec, build_optimizer
from prefect_torch.engine.steps import DeviceScalar
from prefect_torch.engine.streaming import ResidentSource, StreamingSource
from tests.datasets import signal_splits

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def make_splits(problem: str, rows: int = 2_003, seed: int = 0):
    return signal_splits(problem, rows, features=6, seed=seed)


def make_trainer(splits, spec: TrainSpec, optimizer: OptimizerSpec = OptimizerSpec(), callbacks=()) -> Trainer:
    model = build_model(ModelSpec(hidden=[64, 64]), splits.info.n_features, splits.info.n_outputs).to(CUDA)
    return Trainer(model, build_optimizer(optimizer, model), splits, spec, list(callbacks))


class SyncWindow(Callback):
    """Any host sync raises from after an epoch's first optimizer step to after its last."""

    cuda_graph_safe = True  # it only flips a host-side debug switch: the graphed step stays on

    def __init__(self, switch):
        self.switch = switch
        self.windows = 0

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.batch < len(trainer.plans):
            self.windows += 1
            self.switch.on()
        else:
            self.switch.off()


@pytest.mark.parametrize("cuda_graphs", ["auto", "off"])
@pytest.mark.parametrize("placement", ["resident", "stream"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("optimizer,problem", [("adam", "regression"), ("adamw", "binary"), ("sgd", "multiclass")])
def test_the_step_loop_never_syncs_the_host(cuda_graphs, placement, precision, optimizer, problem, sync_debug_error):
    window = SyncWindow(sync_debug_error)
    spec = TrainSpec(epochs=2, batch_size=64, accumulate=2, clip=1.0, precision=precision,
                     data_placement=placement, device="cuda", cuda_graphs=cuda_graphs)
    trainer = make_trainer(make_splits(problem), spec, OptimizerSpec(name=optimizer, momentum=0.9), [window])
    assert not trainer.check_every_step

    result = trainer.fit()  # raises "called a synchronizing CUDA operation" on any sync in the window

    assert trainer.step_fn.graphed == (cuda_graphs == "auto"), trainer.step_fn.reason
    assert window.windows > 10
    assert all(np.isfinite(record["train_loss"]) for record in result.history)


@pytest.mark.parametrize("problem", ["regression", "binary", "multiclass"])
def test_streaming_and_resident_give_identical_weights_on_cuda(problem):
    splits = make_splits(problem)
    spec = dict(epochs=2, batch_size=50, accumulate=2, clip=0.5, precision="bf16", device="cuda")
    resident = make_trainer(splits, TrainSpec(**spec, data_placement="resident"))
    streamed = make_trainer(splits, TrainSpec(**spec, data_placement="stream"))
    resident.fit()
    streamed.fit()
    for name, value in resident.model.state_dict().items():
        assert torch.equal(value, streamed.model.state_dict()[name]), name


def test_streaming_copies_batches_from_pinned_buffers_on_a_side_stream():
    splits = make_splits("multiclass")
    plans = plan_epoch(len(splits.train), 100, 1)
    streamed = StreamingSource(splits.train, CUDA, batch_size=100, seed=3, shuffle=True)
    resident = ResidentSource(splits.train, CUDA, seed=3, shuffle=True)
    assert streamed.data.X.device.type == "cpu"  # the rows stay in host memory
    assert all(staging.X.is_pinned() and staging.y.is_pinned() for staging in streamed._staging)
    assert streamed._copy_stream != torch.cuda.current_stream()
    with streamed.batches(0, plans) as batches:
        got = list(batches)
    want = list(resident.batches(0, plans))
    assert len(got) == len(want) == len(plans)
    for (xa, ya), (xb, yb) in zip(got, want):
        assert xa.device.type == "cuda" and torch.equal(xa, xb) and torch.equal(ya, yb)


def test_auto_placement_streams_when_the_gpu_is_short_of_memory(monkeypatch):
    splits = make_splits("regression")
    roomy = make_trainer(splits, TrainSpec(epochs=1, device="cuda"))
    assert roomy.placement.kind == "resident" and roomy.train_data.X.is_cuda

    free, total = torch.cuda.mem_get_info()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (64 * 1024, total))
    tight = make_trainer(splits, TrainSpec(epochs=1, device="cuda"))
    assert tight.placement.kind == "stream" and not tight.train_data.X.is_cuda
    assert "streaming" in tight.placement.reason
    tight.fit()


def test_cuda_optimizers_are_fused_or_multi_tensor():
    model = torch.nn.Linear(4, 1).to(CUDA)
    for name in ("adam", "adamw", "sgd"):
        assert build_optimizer(OptimizerSpec(name=name), model).defaults["fused"] is True
    assert build_optimizer(OptimizerSpec(name="rmsprop"), model).defaults["foreach"] is True


def test_step_cards_keep_the_state_on_the_gpu(sync_debug_error):
    from prefect_torch.tasks import (
        model_define,
        training_backward,
        training_forward,
        training_init_optimizer,
        training_loss,
        training_optimizer_step,
        training_prepare_batch,
        training_zero_grad,
    )

    splits = make_splits("regression")
    on_gpu = dataclasses.replace(splits, train=splits.train.to(CUDA))
    model = model_define.fn(ModelSpec(hidden=[32, 32]), splits)
    model.module.to(CUDA)
    optimizer = training_init_optimizer.fn(model, OptimizerSpec())

    def one_batch(index, model, optimizer):
        prepared = training_prepare_batch.fn(on_gpu, batch_index=index, batch_size=32, epoch=1)
        optimizer = training_zero_grad.fn(optimizer)
        forward = training_forward.fn(model, prepared.batch_data)
        loss = training_loss.fn(forward.predictions, prepared.batch_data)
        backward = training_backward.fn(loss.loss, forward.model)
        step = training_optimizer_step.fn(optimizer, backward.model, gradient_clip=1.0, step=index + 1)
        return step.model, step.optimizer, loss.loss_value, step.step_info

    # The first batch copies the epoch order to the GPU and creates Adam's state: allowed once.
    model, optimizer, _, _ = one_batch(0, model, optimizer)
    values = []
    sync_debug_error.on()
    for index in range(1, 6):
        model, optimizer, loss_value, info = one_batch(index, model, optimizer)
        values.append((loss_value, info["grad_norm"]))
    sync_debug_error.off()

    assert all(isinstance(v, DeviceScalar) and isinstance(g, DeviceScalar) for v, g in values)
    assert all(np.isfinite(float(v)) and float(g) >= 0 for v, g in values)


def test_train_flow_trains_on_cuda_and_saves_a_loadable_model(tmp_path, prefect_harness):
    from prefect_torch import load_model
    from prefect_torch.flows import DatasetSpec, train_flow

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(3000, 8)), columns=[f"f{i}" for i in range(8)])
    frame["y"] = frame.f0 - 2 * frame.f1 + rng.normal(scale=0.1, size=3000)
    frame.to_csv(tmp_path / "data.csv", index=False)

    result = train_flow(
        dataset=DatasetSpec(uri=str(tmp_path / "data.csv"), target="y"),
        model=ModelSpec(hidden=[64, 64]),
        training=TrainSpec(epochs=3, batch_size=128, device="cuda", precision="bf16"),
        output=str(tmp_path / "model"),
    )

    assert result.device.startswith("cuda")
    assert result.metrics["r2"] > 0.5
    loaded = load_model(result.model_uri)
    assert len(loaded.predict(frame.drop(columns="y").head(5))) == 5


@pytest.mark.slow
def test_compiled_training_on_cuda_saves_weights_that_load(tmp_path):
    from prefect_torch.engine.persist import load_model, save_model

    torch._dynamo.reset()
    splits = make_splits("binary")
    trainer = make_trainer(splits, TrainSpec(epochs=2, batch_size=64, device="cuda", precision="bf16", compile=True))
    trainer.fit()
    uri = save_model(trainer.model, ModelSpec(hidden=[64, 64]), splits.info, str(tmp_path / "model"))
    loaded = load_model(uri)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value.cpu(), loaded.model.state_dict()[name]), name
    torch._dynamo.reset()
