"""Data-parallel training on CPU: 2 processes vs 1, and what DDP costs on its own.

Prints one JSON object:

    python benchmarks/ddp.py [--rows 16384] [--epochs 3] [--rounds 3]

- scaling: a compute-bound MLP (64 features, hidden 512-512) trained on 1 process
  with the global batch vs 2 processes (gloo) with half of it each, same number of
  optimizer steps. Training seconds are the workers' own (the launch, about the
  start of two Python processes with torch, is reported apart). Scaling efficiency
  = 2-process throughput / (2 × 1-process-on-one-core throughput); the speedup
  against 1 process on every core is what a user of this 2-core machine gets.
- overhead: the per-step time of ``DistributedTrainer`` on a process group of size
  1 (DDP's hooks, bucketing and collectives, all local) against the plain Trainer.
  Target: ≤ 5 %.

Each figure is the best of ``--rounds`` (the machine is shared; the minimum is the
least disturbed run).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from prefect_torch.engine.distributed import DistributedTrainer, ParallelTrainer
from prefect_torch.engine.loop import Trainer, TrainSpec
from prefect_torch.engine.models import ModelSpec, build_model
from prefect_torch.engine.optim import OptimizerSpec, build_optimizer
from prefect_torch.engine.split import SplitSpec, split_table

MODEL = ModelSpec(hidden=[512, 512])
OPTIMIZER = OptimizerSpec(lr=1e-3)


def make_splits(rows: int, features: int = 64):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, features)).astype(np.float32)
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(features)])
    frame["y"] = X @ rng.normal(size=features) + np.sin(X[:, 0])
    return split_table(frame, SplitSpec(target="y", val_fraction=0.02, test_fraction=0.0))


def train_seconds(history) -> float:
    return sum(h["seconds"] for h in history)


def one_process(splits, spec: TrainSpec, threads: int) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = build_model(MODEL, splits.info.n_features, 1)
        trainer = Trainer(model, build_optimizer(OPTIMIZER, model), splits, spec)
        return train_seconds(trainer.fit().history)
    finally:
        torch.set_num_threads(previous)


def two_processes(splits, spec: TrainSpec) -> tuple[float, float]:
    model = build_model(MODEL, splits.info.n_features, 1)
    with tempfile.TemporaryDirectory() as checkpoints:
        trainer = ParallelTrainer(model, MODEL, splits.info.n_features, 1, OPTIMIZER, splits, spec, checkpoints)
        result = trainer.fit()
    return train_seconds(result.history), result.seconds


def per_step(splits, spec: TrainSpec, distributed: bool) -> float:
    torch.set_num_threads(1)  # one core each, as in a worker: thread contention is not DDP's cost
    model = build_model(MODEL, splits.info.n_features, 1)
    optimizer = build_optimizer(OPTIMIZER, model)
    if distributed:
        trainer = DistributedTrainer(model, optimizer, splits, spec, rank=0, world=1)
    else:
        trainer = Trainer(model, optimizer, splits, spec)
    result = trainer.fit()
    return train_seconds(result.history) / result.state.step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=512, help="global batch")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    splits = make_splits(args.rows)
    base = dict(epochs=args.epochs, device="cpu", shuffle=True, seed=0)
    single = TrainSpec(batch_size=args.batch, **base)
    double = TrainSpec(batch_size=args.batch // 2, processes=2, **base)
    cores = os.cpu_count() or 1

    one_core, all_cores, two, two_wall = [], [], [], []
    for _ in range(args.rounds):
        one_core.append(one_process(splits, single, threads=1))
        all_cores.append(one_process(splits, single, threads=cores))
        seconds, wall = two_processes(splits, double)
        two.append(seconds)
        two_wall.append(wall)
    rows = len(splits.train) * args.epochs

    # A process group of one, in this process.
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        plain, ddp = [], []
        for _ in range(2 * args.rounds):  # cheap, and the noisiest figure: more rounds
            plain.append(per_step(splits, single, distributed=False))
            ddp.append(per_step(splits, single, distributed=True))
    finally:
        dist.destroy_process_group()

    report = {
        "machine": {"cores": cores, "torch": torch.__version__},
        "scaling": {
            "model": f"MLP 64-512-512-1, {len(splits.train)} rows, global batch {args.batch}, {args.epochs} epochs",
            "one_process_one_core_samples_per_s": rows / min(one_core),
            "one_process_all_cores_samples_per_s": rows / min(all_cores),
            "two_processes_samples_per_s": rows / min(two),
            "scaling_efficiency": (rows / min(two)) / (2 * rows / min(one_core)),
            "speedup_vs_one_process_all_cores": min(all_cores) / min(two),
            "two_processes_wall_s_with_launch": min(two_wall),
            "two_processes_training_s": min(two),
        },
        "overhead_world_of_one": {
            "plain_ms_per_step": 1000 * min(plain),
            "ddp_ms_per_step": 1000 * min(ddp),
            "ddp_over_plain": min(ddp) / min(plain),
            "target": "<= 1.05",
        },
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
