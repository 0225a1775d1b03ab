"""Data-parallel training on CPU (gloo): 2 processes through the elastic launcher.

Each launch starts two Python processes, so the launches are few and shared:
one per problem type, plus the killed run and its resume, plus a failing one.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefect_torch.engine.batching import plan_epoch
from prefect_torch.engine.checkpoint import read_checkpoint
from prefect_torch.engine.distributed import (
    ParallelTrainer,
    check_parallel,
    open_shared_splits,
    rank_zero_only,
    shard_plans,
    share_splits,
)
from prefect_torch.engine.loop import Callback, TrainSpec, fit
from prefect_torch.engine.models import ModelSpec, build_model
from prefect_torch.engine.optim import OptimizerSpec, SchedulerSpec, build_optimizer
from prefect_torch.engine.split import SplitSpec, split_table
from prefect_torch.errors import ConfigError, DeviceError, TrainingError
from tests.datasets import noisy_linear, separable_classes

MODEL = ModelSpec(hidden=[16])
OPTIMIZER = OptimizerSpec(name="adamw", lr=0.01)
# Per process batch 4 (2 processes: global batch 8), 2 batches a step, clipping on, a schedule;
# 30 epochs so that a worker killed at the first checkpoint is surely killed mid-run.
TRAINING = dict(device="cpu", batch_size=4, accumulate=2, clip=0.5, seed=3,
                scheduler=SchedulerSpec(name="cosine"), early_stopping_patience=50)
PROBLEMS = {
    # rows chosen so the last global batch is ragged (and, for binary, smaller than 2)
    "regression": (lambda: noisy_linear(253, features=4), "y", 30),
    "binary": (lambda: separable_classes(241, classes=2, labels=["no", "yes"]), "label", 3),
    "multiclass": (lambda: separable_classes(247, classes=3), "label", 3),
}


def _splits(problem):
    make, target, _ = PROBLEMS[problem]
    return split_table(make(), SplitSpec(target=target))


def _fresh_model(splits):
    return build_model(MODEL, splits.info.n_features, splits.info.n_outputs)


def _single(problem):
    """One process with the 2-process run's global batch (2 x 4)."""
    splits = _splits(problem)
    model = _fresh_model(splits)
    spec = TrainSpec(epochs=PROBLEMS[problem][2], **{**TRAINING, "batch_size": 8})
    result = fit(model, build_optimizer(OPTIMIZER, model), splits, spec)
    return model, result


def _parallel(problem, checkpoints, callbacks=(), **overrides):
    splits = _splits(problem)
    model = _fresh_model(splits)
    spec = TrainSpec(epochs=PROBLEMS[problem][2], **{**TRAINING, "processes": 2, **overrides})
    trainer = ParallelTrainer(model, MODEL, splits.info.n_features, splits.info.n_outputs, OPTIMIZER, splits,
                              spec, str(checkpoints), list(callbacks))
    return model, trainer, trainer.fit


class Events(Callback):
    def __init__(self):
        self.epochs, self.checkpoints = [], []

    def on_epoch_end(self, trainer, record):
        self.epochs.append(record)

    def on_checkpoint(self, trainer):
        self.checkpoints.append(trainer.state.step)


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory):
    """The 2-process run of each problem, with the events its callbacks saw."""
    runs = {}
    for problem in PROBLEMS:
        events = Events()
        folder = tmp_path_factory.mktemp(f"ckpt-{problem}")
        model, trainer, run = _parallel(problem, folder, [events])
        runs[problem] = (model, run(), events, folder)
    return runs


# -- sharding ----------------------------------------------------------------------


def test_the_ranks_shards_make_up_each_global_batch_and_their_loss_weights_add_up():
    plans = plan_epoch(rows=45, batch_size=8, accumulate=2)  # last batch ragged: 5 rows
    shards = [shard_plans(plans, rank, 2) for rank in range(2)]
    for index, plan in enumerate(plans):
        parts = [shard[index] for shard in shards]
        assert parts[0].start == plan.start and parts[0].stop == parts[1].start and parts[1].stop == plan.stop
        # DDP averages over 2 ranks: the weights, halved, must add up to the batch's own weight.
        assert sum(p.loss_scale for p in parts) / 2 == pytest.approx(plan.loss_scale)
        assert all((p.opens_group, p.closes_group) == (plan.opens_group, plan.closes_group) for p in parts)


def test_a_global_batch_smaller_than_the_world_leaves_a_rank_an_empty_shard():
    plans = plan_epoch(rows=9, batch_size=8, accumulate=1)  # the last batch has one row
    last = [shard_plans(plans, rank, 2)[-1] for rank in range(2)]
    assert (last[0].stop - last[0].start, last[1].stop - last[1].start) == (1, 0)
    assert last[0].loss_scale == 2.0 and last[1].loss_scale == 0.0


# -- equivalence with one process ---------------------------------------------------


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_two_processes_with_batch_b_train_like_one_process_with_batch_2b(problem, parallel_runs):
    single, single_result = _single(problem)
    parallel, result, events, _ = parallel_runs[problem]
    for (name, a), b in zip(single.state_dict().items(), parallel.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert result.state.step == single_result.state.step
    assert [h["val_loss"] for h in result.history] == pytest.approx([h["val_loss"] for h in single_result.history],
                                                                   rel=1e-4)
    assert [h["train_loss"] for h in result.history] == pytest.approx(
        [h["train_loss"] for h in single_result.history], rel=1e-4)
    # the card's callbacks saw every epoch once, as rank 0 reported it
    assert [record.epoch for record in events.epochs] == list(range(1, len(result.history) + 1))


def test_rank_zero_wrote_the_only_checkpoints(parallel_runs):
    _, result, events, folder = parallel_runs["regression"]
    names = sorted(p.name for p in Path(folder).iterdir())
    # the checkpoint module keeps the newest two; the last is the run's end
    assert len(names) == 4 and all(n.startswith("ckpt-") for n in names)
    assert read_checkpoint(str(folder)).loop_state.step == result.state.step
    assert events.checkpoints[-1] == result.state.step


def test_rank_zero_only_skips_other_ranks(monkeypatch):
    calls = []
    side_effect = rank_zero_only(calls.append)
    monkeypatch.setenv("RANK", "1")
    side_effect("rank 1")
    monkeypatch.setenv("RANK", "0")
    side_effect("rank 0")
    assert calls == ["rank 0"]


def test_the_shared_splits_are_the_training_tensors(tmp_path):
    splits = _splits("multiclass")
    shared = open_shared_splits(share_splits(splits, tmp_path))
    assert torch.equal(shared.train.X, splits.train.X) and torch.equal(shared.train.y, splits.train.y)
    assert torch.equal(shared.val.X, splits.val.X) and shared.info == splits.info and shared.key == splits.key


# -- a worker killed mid-run -----------------------------------------------------------


def _worker_pids(rank: int) -> list[int]:
    """This process's children that the launcher started as ``rank``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == os.getpid() and f"RANK={rank}".encode() in environ:
            pids.append(int(entry))
    return pids


class KillRankOne(Callback):
    """At rank 0's first mid-epoch checkpoint, SIGKILL rank 1."""

    def __init__(self):
        self.killed_at = None

    def on_checkpoint(self, trainer):
        if self.killed_at is None and trainer.state.batch > 0:
            pids = _worker_pids(1)
            assert len(pids) == 1, pids
            os.kill(pids[0], signal.SIGKILL)
            self.killed_at = trainer.state.step


def test_a_killed_worker_fails_the_run_and_the_rerun_resumes_to_the_same_weights(
    tmp_path, parallel_runs, caplog
):
    killer = KillRankOne()
    _, _, run = _parallel("regression", tmp_path, [killer], checkpoint_every=2)
    with pytest.raises(TrainingError, match=r"rank 1 .*killed by SIGKILL.*resume from the last checkpoint"):
        run()
    assert killer.killed_at is not None
    left = read_checkpoint(str(tmp_path)).loop_state
    assert 0 < left.step < parallel_runs["regression"][1].state.step

    caplog.set_level(logging.INFO, logger="prefect_torch.engine.distributed")
    model, _, rerun = _parallel("regression", tmp_path, checkpoint_every=2)
    result = rerun()
    assert any("resuming from the checkpoint" in r.getMessage() for r in caplog.records)
    uninterrupted, expected, _, _ = parallel_runs["regression"]
    for (name, a), b in zip(uninterrupted.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["val_loss"] for h in result.history] == [h["val_loss"] for h in expected.history]
    # rank 0's checkpoint held every rank's partial loss sum of the interrupted epoch
    assert [h["train_loss"] for h in result.history] == pytest.approx(
        [h["train_loss"] for h in expected.history], rel=1e-9)


# -- two nodes ----------------------------------------------------------------------


def test_two_nodes_meet_at_the_rendezvous_and_train_like_two_processes_on_one(tmp_path, parallel_runs):
    """Two launchers (as on two machines) of one process each, meeting at a rendezvous endpoint."""
    with socket.socket() as probe:  # a free port for the c10d rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.engine.parallel_node", f"127.0.0.1:{port}", str(tmp_path / "ckpt"),
             str(tmp_path / f"node{node}.safetensors")],
            cwd=Path(__file__).parents[2], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    one_node = parallel_runs["binary"][0].state_dict()
    for node in range(2):  # every node's card gets the trained weights
        weights = load_file(str(tmp_path / f"node{node}.safetensors"))
        for name, value in one_node.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-6, atol=1e-7, msg=name)


# -- errors --------------------------------------------------------------------------


def test_a_workers_exception_reaches_the_caller_with_its_traceback(tmp_path):
    # Unscaled features of 1e25 overflow the squared error at the first batch, on both ranks.
    frame = noisy_linear(64, features=4)
    frame["x0"] *= 1e25
    splits = split_table(frame, SplitSpec(target="y", standardize=False))
    model = _fresh_model(splits)
    spec = TrainSpec(epochs=1, processes=2, device="cpu", batch_size=4)
    trainer = ParallelTrainer(model, MODEL, splits.info.n_features, splits.info.n_outputs,
                              OPTIMIZER, splits, spec, str(tmp_path))
    with pytest.raises(TrainingError) as caught:
        trainer.fit()
    message = str(caught.value)
    assert "The training loss became" in message and "Lower the learning rate" in message
    assert "raised in training process rank" in message
    assert "Traceback (most recent call last)" in message and "check_finite" in message


@pytest.mark.parametrize(
    ("spec", "error", "fix"),
    [
        (dict(backend="nccl"), DeviceError, "backend='gloo'"),
        (dict(nodes=2), ConfigError, "rendezvous='host:port'"),
        (dict(nodes=2, rendezvous="head-node"), ConfigError, "Add the port"),
        (dict(global_batch="fixed", batch_size=1), ConfigError, "batch_size to at least 2"),
    ],
)
def test_bad_parallel_settings_fail_before_launching(spec, error, fix):
    with pytest.raises(error, match=fix.replace("(", r"\(").replace("'", "'")):
        check_parallel(TrainSpec(device="cpu", processes=2, **spec))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without GPUs")
def test_cuda_processes_without_a_gpu_name_the_fix():
    with pytest.raises(DeviceError, match="device='cpu' or 'auto'"):
        check_parallel(TrainSpec(device="cuda", processes=2))
