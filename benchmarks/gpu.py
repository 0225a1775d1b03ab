"""How fast does prefect-torch train on one GPU, next to plain PyTorch?

Three ways to train the same MLP on the same rows, for the same epochs and
optimizer steps, in one process:

  (a) train_flow       prefect-torch's Train flow (device cuda): load, split,
                       Train card, evaluate, save. Timed: its training loop.
  (b) plain_loop       a hand-written loop over tensors resident on the GPU:
                       what a careful engineer writes by hand.
  (c) seed_loop        the seeds' DataLoader loop (seeds/004): TensorDataset +
                       DataLoader(shuffle=True), .to(device) and loss.item()
                       per batch; with bf16 autocast, so only the loop differs.

Two cases: "large" (MLP 1024-1024-1024, batch 4096) and "small" (MLP 256-256,
batch 256), on 1M rows x 64 features by default. Prints one JSON document on
stdout: seconds and samples/s of each, the ratios (a)/(b) (target <= 1.05) and
(c)/(a) (target >= 5 on the small case), and the share of the GPU's dense bf16
peak reached by (a) on the large case (6 x params x rows FLOPs per epoch).

    python benchmarks/gpu.py                      # on a GPU machine
    python benchmarks/gpu.py --quick --device cpu # smoke test, seconds on a laptop
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

TARGET_FLOW_OVER_PLAIN = 1.05
TARGET_SEED_OVER_FLOW_SMALL = 5.0

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
# The first name fragment found in torch.cuda.get_device_name() wins, so the most
# specific come first.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (reported as "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
)


@dataclass(frozen=True)
class Case:
    name: str
    hidden: tuple[int, ...]
    batch_size: int


CASES = (Case("large", (1024, 1024, 1024), 4096), Case("small", (256, 256), 256))
QUICK_CASES = (Case("large", (64, 64, 64), 128), Case("small", (16, 16), 16))

log = logging.getLogger("benchmarks.gpu")


# -- data -------------------------------------------------------------------------


def make_frame(rows: int, features: int, seed: int = 0) -> pd.DataFrame:
    """A regression table: a noisy linear target over Gaussian features."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, features), dtype=np.float32)
    weights = rng.standard_normal(features, dtype=np.float32) / math.sqrt(features)
    frame = pd.DataFrame(values, columns=[f"f{i}" for i in range(features)])
    frame["target"] = values @ weights + 0.1 * rng.standard_normal(rows, dtype=np.float32)
    return frame


def dataset_spec(uri: str):
    from prefect_torch.flows import DatasetSpec

    # Every row trains: no validation or test split, so all three loops see the same rows.
    return DatasetSpec(uri=uri, target="target", problem="regression", val_fraction=0.0, test_fraction=0.0)


def training_tensors(frame: pd.DataFrame, uri: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact tensors the flow trains on (same split and standardisation)."""
    from prefect_torch.engine.split import split_table

    splits = split_table(frame, dataset_spec(uri).split_spec())
    return splits.train.X, splits.train.y


def mlp(features: int, hidden: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, 1))


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- (a) the Train flow --------------------------------------------------------------


def run_train_flow(uri: str, case: Case, args, output: str) -> dict:
    from prefect_torch.engine.loop import TrainSpec
    from prefect_torch.engine.models import ModelSpec
    from prefect_torch.engine.optim import OptimizerSpec
    from prefect_torch.flows import train_flow

    training = TrainSpec(
        epochs=args.epochs, batch_size=case.batch_size, device=args.device, precision=args.precision,
        compile=args.compile, data_placement=args.placement, seed=0,
    )
    started = time.perf_counter()
    result = train_flow(
        dataset=dataset_spec(uri),
        model=ModelSpec(hidden=list(case.hidden)),
        optimizer=OptimizerSpec(name="adam", lr=1e-3),
        training=training,
        output=output,
    )
    flow_seconds = time.perf_counter() - started
    return {
        "seconds": result.train_seconds,
        "flow_seconds": flow_seconds,
        "steps": result.steps,
        "device": result.device,
        "final_train_loss": result.history[-1]["train_loss"],
    }


# -- (b) a hand-written loop over resident tensors ---------------------------------------


def run_plain_loop(X: torch.Tensor, y: torch.Tensor, case: Case, args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = mlp(X.shape[1], case.hidden).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    X, y = X.to(device), y.to(device)
    rows, batch = len(X), case.batch_size
    steps = 0
    synchronize(device)
    started = time.perf_counter()
    for _epoch in range(args.epochs):
        order = torch.randperm(rows, device=device)
        features, target = X[order], y[order]
        loss_sum = torch.zeros((), device=device)
        for start in range(0, rows, batch):
            xb, yb = features[start:start + batch], target[start:start + batch]
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, args.precision):
                loss = nn.functional.mse_loss(model(xb).float(), yb)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            steps += 1
        epoch_loss = loss_sum.item() / math.ceil(rows / batch)  # one read per epoch, as (a) does
    synchronize(device)
    return {"seconds": time.perf_counter() - started, "steps": steps, "final_train_loss": epoch_loss}


# -- (c) the seeds' DataLoader loop ------------------------------------------------------


def run_seed_loop(X: torch.Tensor, y: torch.Tensor, case: Case, args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = mlp(X.shape[1], case.hidden).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    criterion = nn.MSELoss()
    loader = DataLoader(TensorDataset(X, y), batch_size=case.batch_size, shuffle=True)

    # seeds/004, "Complete Training Loop": train_epoch, plus bf16 autocast so that the
    # loop, not the arithmetic, is what differs from (a) and (b).
    def train_epoch(model, loader, criterion, optimizer, device):
        model.train()
        total_loss = 0.0
        for batch_idx, (x, y) in enumerate(loader):
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            with autocast(device, args.precision):
                output = model(x)
                loss = criterion(output.float(), y)
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
        return total_loss / len(loader)

    synchronize(device)
    started = time.perf_counter()
    for _epoch in range(args.epochs):
        train_loss = train_epoch(model, loader, criterion, optimizer, device)
    synchronize(device)
    return {"seconds": time.perf_counter() - started, "steps": args.epochs * len(loader),
            "final_train_loss": train_loss}


# -- putting it together ---------------------------------------------------------------


def warm_up(X: torch.Tensor, y: torch.Tensor, case: Case, args) -> None:
    """CUDA context, cuBLAS handles and kernel choices, outside every timing."""
    quick = argparse.Namespace(**{**vars(args), "epochs": 1})
    rows = min(len(X), case.batch_size * 20)
    run_plain_loop(X[:rows], y[:rows], case, quick)


def peak_tflops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for fragment, peak in BF16_PEAK_TFLOPS:
        if fragment in name:
            return name, peak
    return name, None


def summarise(case: Case, rows: int, features: int, results: dict, args, peak: float | None) -> dict:
    params = sum(p.numel() for p in mlp(features, case.hidden).parameters())
    samples = rows * args.epochs
    for result in results.values():
        result["samples_per_s"] = samples / result["seconds"] if result["seconds"] > 0 else None
    flow, plain, seed = results.get("train_flow"), results.get("plain_loop"), results.get("seed_loop")
    summary = {
        "hidden": list(case.hidden),
        "batch_size": case.batch_size,
        "params": params,
        "steps_per_epoch": math.ceil(rows / case.batch_size),
        **results,
        "flow_over_plain": flow["seconds"] / plain["seconds"] if flow and plain else None,
        "seed_over_flow": seed["seconds"] / flow["seconds"] if flow and seed else None,
    }
    if flow:
        # fwd + bwd of a dense layer: 6 FLOPs per weight per sample (2 forward, 4 backward).
        achieved = 6.0 * params * samples / flow["seconds"] / 1e12
        summary["flow_tflops"] = achieved
        summary["flow_share_of_bf16_peak"] = achieved / peak if peak and args.precision == "bf16" else None
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu.")
    parser.add_argument("--rows", type=int, default=None, help="Training rows (default 1,000,000; --quick 2,000).")
    parser.add_argument("--features", type=int, default=64, help="Feature columns (default 64).")
    parser.add_argument("--epochs", type=int, default=None, help="Epochs of every loop (default 3; --quick 1).")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="Autocast precision.")
    parser.add_argument("--cases", default="large,small", help="Comma-separated: large, small.")
    parser.add_argument("--loops", default="train_flow,plain_loop,seed_loop",
                        help="Comma-separated subset of train_flow, plain_loop, seed_loop.")
    parser.add_argument("--placement", choices=("auto", "resident", "stream"), default="auto",
                        help="The Train flow's data_placement (stream measures the streaming path).")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in the Train flow.")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke test that runs anywhere.")
    args = parser.parse_args(argv)
    args.rows = args.rows or (2_000 if args.quick else 1_000_000)
    args.epochs = args.epochs or (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not log.handlers:  # progress on stderr; stdout carries only the JSON report
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; use --device cpu for a smoke test.")
    loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    chosen = {name.strip() for name in args.cases.split(",")}
    cases = [case for case in (QUICK_CASES if args.quick else CASES) if case.name in chosen]
    device_name, peak = peak_tflops(device)
    report = {
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "precision": args.precision,
        "rows": args.rows,
        "features": args.features,
        "epochs": args.epochs,
        "placement": args.placement,
        "compile": args.compile,
        "bf16_peak_tflops": peak,
        "targets": {"flow_over_plain_max": TARGET_FLOW_OVER_PLAIN,
                    "seed_over_flow_small_min": TARGET_SEED_OVER_FLOW_SMALL},
        "cases": {},
    }
    with tempfile.TemporaryDirectory(prefix="prefect-torch-bench-") as scratch:
        log.info("writing %d x %d rows", args.rows, args.features)
        frame = make_frame(args.rows, args.features)
        uri = os.path.join(scratch, "data.parquet")
        frame.to_parquet(uri)
        X, y = training_tensors(frame, uri)
        del frame
        for case in cases:
            warm_up(X, y, case, args)
            results = {}
            for loop in loops:
                log.info("%s case: %s", case.name, loop)
                if loop == "train_flow":
                    results[loop] = run_train_flow(uri, case, args, os.path.join(scratch, f"model-{case.name}"))
                elif loop == "plain_loop":
                    results[loop] = run_plain_loop(X, y, case, args)
                elif loop == "seed_loop":
                    results[loop] = run_seed_loop(X, y, case, args)
                else:
                    raise SystemExit(f"Unknown loop {loop!r}; use train_flow, plain_loop, seed_loop.")
                log.info("%s case: %s took %.3f s", case.name, loop, results[loop]["seconds"])
            report["cases"][case.name] = summarise(case, len(X), X.shape[1], results, args, peak)
    large, small = report["cases"].get("large", {}), report["cases"].get("small", {})
    report["verdict"] = {
        "flow_over_plain_large": large.get("flow_over_plain"),
        "flow_over_plain_small": small.get("flow_over_plain"),
        "seed_over_flow_small": small.get("seed_over_flow"),
        "share_of_bf16_peak_large": large.get("flow_share_of_bf16_peak"),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
