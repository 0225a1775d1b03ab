"""The baseline of benchmarks/e2e.py: what a careful engineer writes by hand.

Read a Parquet file with pandas (pyarrow; a .csv file with ``pandas.read_csv``), split 70/15/15 with a seeded shuffle,
standardise with train statistics, train the MLP of ``ModelSpec(hidden=[64])``
(Linear → ReLU → Linear) for one epoch with Adam, evaluate on the test split and
save the weights as safetensors. No Prefect, no caching, no checks.

    python benchmarks/plain_script.py data.parquet --target y [--epochs 1]
        [--batch-size 4096] [--hidden 64] [--output model.safetensors]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--target", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output", default="model.safetensors")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)

    frame = pd.read_csv(args.data) if args.data.endswith(".csv") else pd.read_parquet(args.data)
    features = [c for c in frame.columns if c != args.target]
    X = frame[features].to_numpy(dtype=np.float32)
    y = frame[args.target].to_numpy(dtype=np.float32)
    del frame

    order = np.random.default_rng(0).permutation(len(X))
    n_train, n_val = int(len(X) * 0.70), int(len(X) * 0.15)
    parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    X_train = X[parts["train"]]
    mean, std = X_train.mean(axis=0), X_train.std(axis=0) + 1e-12
    y_mean, y_std = y[parts["train"]].mean(), y[parts["train"]].std()
    data = {}
    for name, rows in parts.items():
        Xs = X_train if name == "train" else X[rows]
        Xs -= mean
        Xs /= std
        data[name] = (torch.from_numpy(Xs), torch.from_numpy((y[rows] - y_mean) / y_std).reshape(-1, 1))
    del X, X_train

    model = nn.Sequential(nn.Linear(len(features), args.hidden), nn.ReLU(), nn.Linear(args.hidden, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.MSELoss()
    X_train, y_train = data["train"]
    train_started = time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(X_train))
        model.train()
        for start in range(0, len(X_train), args.batch_size):
            batch = perm[start : start + args.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(X_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
    train_seconds = time.perf_counter() - train_started

    model.eval()
    X_test, y_test = data["test"]
    with torch.no_grad():
        predictions = model(X_test) * float(y_std) + float(y_mean)
        truth = y_test * float(y_std) + float(y_mean)
        mse = float(((predictions - truth) ** 2).mean())
    save_file(model.state_dict(), args.output)
    print(json.dumps({"test_mse": mse, "train_seconds": train_seconds,
                      "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
