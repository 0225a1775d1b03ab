"""train_flow vs the engine loop vs the seeds' DataLoader loop, side by side.

Same data (50k rows × 32 features), model (MLP 256-256), batch size (256),
optimizer (Adam) and number of optimizer steps. Prints one JSON object:

    python benchmarks/train_speed.py [--rows 50000] [--epochs 3] [--rounds 2]

Targets (issue 2): train_flow ≤ 1.05 × engine on the training part; engine ≤ 0.7 × seeds loop.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prefect_torch.engine.loop import TrainSpec, fit
from prefect_torch.engine.models import ModelSpec, build_model
from prefect_torch.engine.optim import OptimizerSpec, build_optimizer
from prefect_torch.engine.split import SplitSpec, split_table

HIDDEN = [256, 256]


def make_frame(rows: int, features: int = 32) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, features)).astype(np.float32)
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(features)])
    frame["y"] = X @ rng.normal(size=features) + np.sin(X[:, 0]) + rng.normal(scale=0.1, size=rows)
    return frame


def engine_loop(splits, epochs: int, batch: int) -> float:
    model = build_model(ModelSpec(hidden=HIDDEN), splits.info.n_features, 1)
    optimizer = build_optimizer(OptimizerSpec(), model)
    spec = TrainSpec(epochs=epochs, batch_size=batch, device="cpu")
    return fit(model, optimizer, splits, spec).seconds


def seeds_loop(splits, epochs: int, batch: int) -> float:
    """The seeds' loop (004_c4a2b922f8478578.txt): DataLoader over a TensorDataset, per-epoch validation."""
    model = build_model(ModelSpec(hidden=HIDDEN), splits.info.n_features, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.MSELoss()
    train_loader = DataLoader(TensorDataset(splits.train.X, splits.train.y), batch_size=batch, shuffle=True)
    val_loader = DataLoader(TensorDataset(splits.val.X, splits.val.y), batch_size=batch)
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        total = 0.0
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item()
        model.eval()
        with torch.no_grad():
            sum(criterion(model(x), y).item() for x, y in val_loader)
    return time.perf_counter() - started


def flow_run(path: str, epochs: int, batch: int) -> tuple[float, float]:
    from prefect_torch.flows import train_flow

    started = time.perf_counter()
    result = train_flow(
        dataset={"uri": path, "target": "y"},
        model={"hidden": HIDDEN},
        training={"epochs": epochs, "batch_size": batch, "device": "cpu"},
    )
    return result.train_seconds, time.perf_counter() - started


def in_worker_thread(fn, *args):
    """Run ``fn`` in a fresh thread, as Prefect runs a task, so every contender
    gets the same OpenMP thread team (on a loaded machine the main thread's team
    can be many times slower, which would flatter the flow)."""
    import threading

    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)))
    thread.start()
    thread.join()
    return out[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    frame = make_frame(args.rows)
    splits = split_table(frame, SplitSpec(target="y"))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.csv")
        frame.to_csv(path, index=False)
        from prefect.testing.utilities import prefect_test_harness

        times: dict[str, list[float]] = {"engine": [], "seeds": [], "flow_train": [], "flow_total": []}
        with prefect_test_harness(server_startup_timeout=120):
            flow_run(path, 1, args.batch)  # warm-up: imports, server connection
            for _ in range(args.rounds):
                # Interleaved so machine noise hits all three alike.
                times["engine"].append(in_worker_thread(engine_loop, splits, args.epochs, args.batch))
                times["seeds"].append(in_worker_thread(seeds_loop, splits, args.epochs, args.batch))
                train_s, total_s = flow_run(path, args.epochs, args.batch)
                times["flow_train"].append(train_s)
                times["flow_total"].append(total_s)

    best = {k: min(v) for k, v in times.items()}
    steps = args.epochs * -(-len(splits.train) // args.batch)
    print(json.dumps({
        "benchmark": "train_speed",
        "rows": args.rows, "features": 32, "hidden": HIDDEN, "batch": args.batch,
        "epochs": args.epochs, "optimizer_steps": steps, "threads": torch.get_num_threads(),
        "seconds_best_of_rounds": best,
        "flow_train_over_engine": best["flow_train"] / best["engine"],
        "flow_total_over_engine": best["flow_total"] / best["engine"],
        "engine_over_seeds_loop": best["engine"] / best["seeds"],
        "targets": {"flow_train_over_engine": 1.05, "engine_over_seeds_loop": 0.7},
    }, indent=2))


if __name__ == "__main__":
    main()
