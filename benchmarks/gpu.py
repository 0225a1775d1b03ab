"""How fast does prefect-torch train on one GPU, next to plain PyTorch and Lightning?

The same MLP on the same rows, for the same epochs and optimizer steps, in one process:

  train_flow   prefect-torch's Train flow (device cuda): load, split, Train card
               (its step captured once as CUDA graphs and replayed), evaluate, save.
               ``seconds``: its training loop; ``flow_seconds``: the whole flow.
  plain_loop   a hand-written eager loop over tensors resident on the GPU, with a
               fused Adam: what a careful engineer writes by hand.
  seed_loop    the seeds' DataLoader loop (seeds/004): TensorDataset + DataLoader
               (shuffle=True), .to(device) and loss.item() per batch, with bf16
               autocast so only the loop differs. It is slow, so it runs on
               ``--seed-rows`` rows for one epoch and is compared per sample.
  lightning    Lightning's Trainer.fit on GPU-resident batches (bf16-mixed), when
               ``lightning`` is importable; compared with the whole train_flow.

Cases (``--cases``):
  large    MLP 1024x3, batch 4096, all rows     target train_flow/plain_loop <= 1.0
  small    MLP 256x2, batch 256, --small-rows    target train_flow/plain_loop <= 0.5
  compute  MLP 8192x4, batch 8192, 1 epoch       share of the GPU's dense bf16 peak (aim >= 50 %)

Output: one JSON object per line on stdout, flushed as each case finishes (so a
run cut off by a time limit still reports what it measured), then a final line
``{"summary": ...}`` with the verdict against the targets. Progress goes to stderr.

    python benchmarks/gpu.py                        # on a GPU machine, < 3 minutes on an H200
    python benchmarks/gpu.py --quick --device cpu   # structure smoke test, seconds anywhere
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
import warnings
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

TARGETS = {
    "flow_over_plain_large_max": 1.0,
    "flow_over_plain_small_max": 0.5,
    "share_of_bf16_peak_compute_min": 0.5,
    "flow_over_lightning_large_max": 1.0,
}

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
# The first name fragment found in torch.cuda.get_device_name() wins, so the most
# specific come first.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H100", 989.0),  # SXM (reported as "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("H800", 989.0),
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
    rows: str        # which rows option sets its size: "rows" or "small_rows"
    epochs: str      # "epochs", or "one" for a single epoch
    loops: tuple[str, ...]


ALL_LOOPS = ("train_flow", "plain_loop", "seed_loop", "lightning")
CASES = (
    Case("large", (1024, 1024, 1024), 4096, "rows", "epochs", ALL_LOOPS),
    Case("small", (256, 256), 256, "small_rows", "epochs", ("train_flow", "plain_loop", "seed_loop")),
    Case("compute", (8192, 8192, 8192, 8192), 8192, "rows", "one", ("train_flow", "plain_loop")),
)
QUICK_CASES = (
    Case("large", (32, 32, 32), 64, "rows", "epochs", ALL_LOOPS),
    Case("small", (16, 16), 16, "small_rows", "epochs", ("train_flow", "plain_loop", "seed_loop")),
    Case("compute", (64, 64, 64, 64), 128, "rows", "one", ("train_flow", "plain_loop")),
)

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

    # Every row trains: no validation or test split, so all loops see the same rows.
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


def flops_per_sample(features: int, hidden: tuple[int, ...]) -> int:
    """Matrix FLOPs of one sample's forward and backward: 2 (forward) + 2 (weight grad)
    + 2 (input grad, not needed by the first layer) per weight."""
    widths = [features, *hidden, 1]
    return sum((4 if i == 0 else 6) * a * b for i, (a, b) in enumerate(zip(widths, widths[1:])))


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the loops ----------------------------------------------------------------------


def run_train_flow(uri: str, case: Case, args, epochs: int, output: str) -> dict:
    from prefect_torch.engine.loop import TrainSpec
    from prefect_torch.engine.models import ModelSpec
    from prefect_torch.engine.optim import OptimizerSpec
    from prefect_torch.flows import train_flow

    training = TrainSpec(
        epochs=epochs, batch_size=case.batch_size, device=args.device, precision=args.precision,
        compile=args.compile, data_placement=args.placement, cuda_graphs=args.cuda_graphs, seed=0,
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


def run_plain_loop(X: torch.Tensor, y: torch.Tensor, case: Case, args, epochs: int) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = mlp(X.shape[1], case.hidden).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    X, y = X.to(device), y.to(device)
    rows, batch = len(X), case.batch_size
    steps = 0
    synchronize(device)
    started = time.perf_counter()
    for _epoch in range(epochs):
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
        epoch_loss = loss_sum.item() / math.ceil(rows / batch)  # one read per epoch, as the Train card does
    synchronize(device)
    return {"seconds": time.perf_counter() - started, "steps": steps, "final_train_loss": epoch_loss}


def run_seed_loop(X: torch.Tensor, y: torch.Tensor, case: Case, args) -> dict:
    """seeds/004's train_epoch, one epoch on the first ``--seed-rows`` rows."""
    device = torch.device(args.device)
    X, y = X[:args.seed_rows], y[:args.seed_rows]
    torch.manual_seed(0)
    model = mlp(X.shape[1], case.hidden).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    criterion = nn.MSELoss()
    loader = DataLoader(TensorDataset(X, y), batch_size=case.batch_size, shuffle=True)

    # seeds/004, "Complete Training Loop": train_epoch, plus bf16 autocast so that the
    # loop, not the arithmetic, is what differs from the others.
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
    train_loss = train_epoch(model, loader, criterion, optimizer, device)
    synchronize(device)
    return {"seconds": time.perf_counter() - started, "rows": len(X), "epochs": 1, "steps": len(loader),
            "final_train_loss": train_loss}


def run_lightning(X: torch.Tensor, y: torch.Tensor, case: Case, args, epochs: int) -> dict:
    """Lightning's fit on batches sliced from tensors already on the device."""
    try:
        import lightning as L
    except ImportError:
        try:
            import pytorch_lightning as L  # the older package name
        except ImportError:
            return {"skipped": "lightning is not importable here"}
    device = torch.device(args.device)
    X, y = X.to(device), y.to(device)
    hidden, batch = case.hidden, case.batch_size

    class Resident:
        """Shuffled batches of resident tensors; what a Lightning user writes to skip the DataLoader."""

        def __init__(self):
            self.epoch = 0

        def __len__(self):
            return math.ceil(len(X) / batch)

        def __iter__(self):
            generator = torch.Generator(device=device).manual_seed(self.epoch)
            self.epoch += 1
            order = torch.randperm(len(X), device=device, generator=generator)
            features, target = X[order], y[order]
            for start in range(0, len(X), batch):
                yield features[start:start + batch], target[start:start + batch]

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = mlp(X.shape[1], hidden)

        def training_step(self, batch_data, batch_idx):
            xb, yb = batch_data
            return nn.functional.mse_loss(self.model(xb).float(), yb)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3, fused=device.type == "cuda")

    torch.manual_seed(0)
    module = Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers, loggers and sanity checks
        logging.getLogger("lightning").setLevel(logging.WARNING)
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=epochs,
            precision="bf16-mixed" if args.precision == "bf16" else "32-true",
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        synchronize(device)
        started = time.perf_counter()
        trainer.fit(module, train_dataloaders=Resident())
        synchronize(device)
    return {"seconds": time.perf_counter() - started, "steps": int(trainer.global_step),
            "lightning": L.__version__}


# -- putting it together ---------------------------------------------------------------


def start_prefect() -> float:
    """Run an empty flow, so that starting Prefect's temporary server (once per process,
    when no server is configured) stays out of the first case's flow_seconds."""
    from prefect import flow

    @flow(name="benchmark-warm-up", log_prints=False)
    def warm_up_flow() -> None:
        return None

    started = time.perf_counter()
    warm_up_flow()
    return time.perf_counter() - started


def warm_up(X: torch.Tensor, y: torch.Tensor, case: Case, args) -> None:
    """CUDA context, cuBLAS handles and kernel choices, outside every timing."""
    rows = min(len(X), case.batch_size * 20)
    run_plain_loop(X[:rows], y[:rows], case, args, epochs=1)


def peak_tflops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for fragment, peak in BF16_PEAK_TFLOPS:
        if fragment in name:
            return name, peak
    return name, None


def summarise_case(case: Case, rows: int, epochs: int, features: int, results: dict, args,
                   peak: float | None) -> dict:
    """Per-sample rates, the ratios against the targets, and FLOP rates of one case."""
    flop_per_sample = flops_per_sample(features, case.hidden)
    for result in results.values():
        if "seconds" not in result:
            continue
        samples = result.get("rows", rows) * result.get("epochs", epochs)
        result["samples_per_s"] = samples / result["seconds"] if result["seconds"] > 0 else None
        result["tflops"] = flop_per_sample * samples / result["seconds"] / 1e12 if result["seconds"] > 0 else None
    flow, plain = results.get("train_flow"), results.get("plain_loop")
    seed, lightning = results.get("seed_loop"), results.get("lightning")
    ok = lambda r: r is not None and "seconds" in r  # noqa: E731
    summary = {
        "case": case.name,
        "hidden": list(case.hidden),
        "batch_size": case.batch_size,
        "rows": rows,
        "epochs": epochs,
        "params": sum(p.numel() for p in mlp(features, case.hidden).parameters()),
        "flop_per_sample": flop_per_sample,
        "steps_per_epoch": math.ceil(rows / case.batch_size),
        **results,
        "flow_over_plain": flow["seconds"] / plain["seconds"] if ok(flow) and ok(plain) else None,
        # the seeds' loop ran on fewer rows: compared per sample
        "seed_over_flow_per_sample": (flow["samples_per_s"] / seed["samples_per_s"]
                                      if ok(flow) and ok(seed) else None),
        # the whole flow (load, split, train, save) against Lightning's whole fit
        "flow_over_lightning": (flow["flow_seconds"] / lightning["seconds"]
                                if ok(flow) and ok(lightning) else None),
        "flow_share_of_bf16_peak": (flow["tflops"] / peak
                                    if ok(flow) and peak and args.precision == "bf16" else None),
        "plain_share_of_bf16_peak": (plain["tflops"] / peak
                                     if ok(plain) and peak and args.precision == "bf16" else None),
    }
    return summary


def verdict(cases: dict) -> dict:
    large, small, compute = (cases.get(name, {}) for name in ("large", "small", "compute"))

    def within(value, limit, below=True):
        if value is None:
            return None
        return value <= limit if below else value >= limit

    checks = {
        "flow_over_plain_large": large.get("flow_over_plain"),
        "flow_over_plain_small": small.get("flow_over_plain"),
        "share_of_bf16_peak_compute": compute.get("flow_share_of_bf16_peak"),
        "tflops_compute": (compute.get("train_flow") or {}).get("tflops"),
        "flow_over_lightning_large": large.get("flow_over_lightning"),
        "seed_over_flow_per_sample_small": small.get("seed_over_flow_per_sample"),
    }
    checks["met"] = {
        "flow_over_plain_large": within(checks["flow_over_plain_large"], TARGETS["flow_over_plain_large_max"]),
        "flow_over_plain_small": within(checks["flow_over_plain_small"], TARGETS["flow_over_plain_small_max"]),
        "share_of_bf16_peak_compute": within(checks["share_of_bf16_peak_compute"],
                                             TARGETS["share_of_bf16_peak_compute_min"], below=False),
        "flow_over_lightning_large": within(checks["flow_over_lightning_large"],
                                            TARGETS["flow_over_lightning_large_max"]),
    }
    return checks


def emit(document: dict, out=None) -> None:
    """One JSON line, flushed at once: a run cut off later still leaves it behind."""
    print(json.dumps(document), file=out or sys.stdout, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu.")
    parser.add_argument("--rows", type=int, default=None,
                        help="Rows of the large and compute cases (default 1,000,000; --quick 1,000).")
    parser.add_argument("--small-rows", type=int, default=None,
                        help="Rows of the small case (default 200,000; --quick 400).")
    parser.add_argument("--seed-rows", type=int, default=None,
                        help="Rows the seeds' loop trains on, one epoch (default 50,000; --quick 200).")
    parser.add_argument("--features", type=int, default=64, help="Feature columns (default 64).")
    parser.add_argument("--epochs", type=int, default=None, help="Epochs of the large and small cases "
                        "(default 3; --quick 1); the compute case runs one.")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="Autocast precision.")
    parser.add_argument("--cases", default="large,small,compute", help="Comma-separated: large, small, compute.")
    parser.add_argument("--loops", default=",".join(ALL_LOOPS),
                        help="Comma-separated subset of train_flow, plain_loop, seed_loop, lightning "
                        "(each case runs those of them it lists).")
    parser.add_argument("--placement", choices=("auto", "resident", "stream"), default="auto",
                        help="The Train flow's data_placement (stream measures the streaming path).")
    parser.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                        help="The Train flow's cuda_graphs (off measures its eager step).")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in the Train flow.")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke test that runs anywhere.")
    args = parser.parse_args(argv)
    args.rows = args.rows or (1_000 if args.quick else 1_000_000)
    args.small_rows = args.small_rows or (400 if args.quick else 200_000)
    args.seed_rows = args.seed_rows or (200 if args.quick else 50_000)
    args.epochs = args.epochs or (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None, out=None) -> dict:
    """Run the benchmark; the JSON lines go to ``out`` (default stdout)."""
    args = parse_args(argv)
    if not log.handlers:  # progress on stderr; stdout carries only the JSON lines
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; use --device cpu for a smoke test.")
    loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    unknown = set(loops) - set(ALL_LOOPS)
    if unknown:
        raise SystemExit(f"Unknown loop(s) {sorted(unknown)}; use {', '.join(ALL_LOOPS)}.")
    chosen = {name.strip() for name in args.cases.split(",")}
    cases = [case for case in (QUICK_CASES if args.quick else CASES) if case.name in chosen]
    device_name, peak = peak_tflops(device)
    run_info = {
        "device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "precision": args.precision, "features": args.features, "placement": args.placement,
        "cuda_graphs": args.cuda_graphs, "compile": args.compile, "bf16_peak_tflops": peak,
    }
    started = time.perf_counter()
    if "train_flow" in loops:
        log.info("starting Prefect")
        run_info["prefect_start_seconds"] = start_prefect()
    report = {**run_info, "targets": TARGETS, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="prefect-torch-bench-") as scratch:
        log.info("writing %d x %d rows", args.rows, args.features)
        frame = make_frame(max(args.rows, args.small_rows), args.features)
        data: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}
        for option in {case.rows for case in cases}:
            rows = getattr(args, option)
            uri = os.path.join(scratch, f"data-{rows}.parquet")
            part = frame.iloc[:rows]
            part.to_parquet(uri)
            data[option] = (uri, *training_tensors(part, uri))
        del frame
        for case in cases:
            uri, X, y = data[case.rows]
            epochs = 1 if case.epochs == "one" else args.epochs
            warm_up(X, y, case, args)
            results = {}
            for loop in (name for name in loops if name in case.loops):
                log.info("%s case: %s", case.name, loop)
                if loop == "train_flow":
                    results[loop] = run_train_flow(uri, case, args, epochs, os.path.join(scratch, f"model-{case.name}"))
                elif loop == "plain_loop":
                    results[loop] = run_plain_loop(X, y, case, args, epochs)
                elif loop == "seed_loop":
                    results[loop] = run_seed_loop(X, y, case, args)
                else:
                    results[loop] = run_lightning(X, y, case, args, epochs)
                log.info("%s case: %s: %s", case.name, loop,
                         f"{results[loop]['seconds']:.3f} s" if "seconds" in results[loop] else results[loop])
            summary = summarise_case(case, len(X), epochs, X.shape[1], results, args, peak)
            report["cases"][case.name] = summary
            emit({**summary, "device": device_name}, out)
    report["verdict"] = verdict(report["cases"])
    report["seconds"] = time.perf_counter() - started
    emit({"summary": {**run_info, "targets": TARGETS, "verdict": report["verdict"], "seconds": report["seconds"]}}, out)
    return report


if __name__ == "__main__":
    main()
