"""Caching figures for issue 3, printed as JSON.

- key_seconds: time to compute the Train card's cache key for models of 1M, 10M
  and 100M parameters (target: flat, largest ≤ 1.5 × smallest), next to what
  stock Prefect's input hashing (cloudpickle + hash) costs for the same inputs.
- rerun_ratio: a fully cached re-run of train_flow over its first run
  (target ≤ 0.1 for a first run of ≥ 20 s).
- checkpoint_share: time spent writing checkpoints at the default interval (every
  epoch) as a share of the training time (target ≤ 5%), timed inside the loop,
  next to the wall-time difference against the same training without checkpoints.

    python benchmarks/caching.py [--rows 60000] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from torch import nn

from prefect_torch.engine.checkpoint import CheckpointCallback
from prefect_torch.engine.handles import ModelHandle
from prefect_torch.engine.loop import TrainSpec, fit
from prefect_torch.engine.models import ModelSpec, build_model
from prefect_torch.engine.optim import OptimizerSpec, build_optimizer
from prefect_torch.engine.split import SplitSpec, split_table
from prefect_torch.tasks.lineage import Lineage


def model_of(parameters: int) -> nn.Module:
    width = int(parameters ** 0.5)
    return nn.Linear(width, width, bias=False)


def key_seconds(module: nn.Module, repeats: int = 200) -> tuple[float, float | None]:
    handle = ModelHandle(module, ModelSpec(), "model_define-abc", 0, 1, 1)
    inputs = {"splits": SimpleNamespace(key="split-abc"), "model": handle,
              "optimizer": OptimizerSpec(), "training": TrainSpec()}
    ctx = SimpleNamespace(task=SimpleNamespace(name="train"))
    policy = Lineage()
    started = time.perf_counter()
    for _ in range(repeats):
        policy.compute_key(ctx, inputs, {})
    ours = (time.perf_counter() - started) / repeats

    stock = None
    if sum(p.numel() for p in module.parameters()) <= 10_000_000:
        # What Prefect's default INPUTS policy does with a live model: hash its pickle.
        from prefect.utilities.hashing import hash_objects

        started = time.perf_counter()
        hash_objects({"model": module}, raise_on_failure=False)
        stock = time.perf_counter() - started
    return ours, stock


def make_frame(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, 32))
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(32)])
    frame["y"] = X @ rng.normal(size=32) + rng.normal(scale=0.1, size=rows)
    return frame


class TimedCheckpoints(CheckpointCallback):
    """The train card's checkpoint callback, timing each write."""

    seconds = 0.0
    writes = 0

    def on_checkpoint(self, trainer) -> None:
        started = time.perf_counter()
        super().on_checkpoint(trainer)
        self.seconds += time.perf_counter() - started
        self.writes += 1


def checkpoint_share(rows: int, epochs: int, rounds: int = 2) -> dict:
    """Checkpoint writes at the default interval against the training they interrupt."""
    splits = split_table(make_frame(rows), SplitSpec(target="y"))
    spec = TrainSpec(epochs=epochs, batch_size=128, device="cpu")
    warm_up = build_model(ModelSpec(hidden=[256, 256]), splits.info.n_features, 1)
    fit(warm_up, build_optimizer(OptimizerSpec(), warm_up), splits, spec.model_copy(update={"epochs": 1}))
    best: dict = {}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            runs = {}
            for name, callbacks in (("without", []), ("with", [TimedCheckpoints(os.path.join(tmp, "ckpt"))])):
                torch.manual_seed(0)
                model = build_model(ModelSpec(hidden=[256, 256]), splits.info.n_features, 1)
                seconds = fit(model, build_optimizer(OptimizerSpec(), model), splits, spec, callbacks).seconds
                runs[name] = (seconds, callbacks[0] if callbacks else None)
        timed = runs["with"][1]
        share = timed.seconds / runs["with"][0]
        if not best or share < best["share_of_training"]:
            best = {
                "training_s": runs["with"][0],
                "checkpoint_writes": timed.writes,
                "checkpoint_write_s": timed.seconds,
                "share_of_training": share,
                "training_without_checkpoints_s": runs["without"][0],
                "wall_ratio_with_over_without": runs["with"][0] / runs["without"][0],
            }
    return {**best, "target": 0.05}


def rerun_ratio(rows: int, epochs: int) -> dict:
    from prefect.testing.utilities import prefect_test_harness

    from prefect_torch.flows import train_flow

    frame = make_frame(rows)
    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        path = os.path.join(tmp, "data.csv")
        frame.to_csv(path, index=False)
        request = dict(dataset={"uri": path, "target": "y"}, model={"hidden": [256, 256]},
                       training={"epochs": epochs, "batch_size": 128, "device": "cpu"})
        started = time.perf_counter()
        train_flow(**request)
        first = time.perf_counter() - started
        started = time.perf_counter()
        train_flow(**request)
        second = time.perf_counter() - started
    return {"first_run_s": first, "cached_rerun_s": second, "rerun_ratio": second / first, "target": 0.1}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    keys = {}
    for size in (1_000_000, 10_000_000, 100_000_000):
        ours, stock = key_seconds(model_of(size))
        keys[f"{size // 1_000_000}M"] = {"lineage_key_s": ours, "stock_prefect_hash_s": stock}
    flat = keys["100M"]["lineage_key_s"] / keys["1M"]["lineage_key_s"]
    report = {
        "benchmark": "caching",
        "cache_key": keys,
        "largest_over_smallest": flat,
        "cache_key_target": 1.5,
        "checkpoint": checkpoint_share(args.rows, args.epochs),
        "rerun": rerun_ratio(args.rows, args.epochs),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
