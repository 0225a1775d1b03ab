"""Sweep figures for issue 14, printed as JSON.

- overhead_ratio: a sweep of K trials in one process (parallel 1, no pruning: the
  study, its SQLite storage, heartbeats, the task runner, the trial bookkeeping,
  saving the best model and the artifacts) over the same K trainings as bare Train
  card runs after one Load and Split, with the very same parameters, each side on
  its own result storage and with its own checkpoints so neither gets the other's
  cache hits or resumes from the other's last checkpoint (target ≤ 1.2).
- parallel: wall time of 8 trials at parallelism 1 and at 2 (same space, sampler
  seed and training; a different training seed per sweep so no trial is a cache
  hit of the other sweep's), and the speed-up.

    python benchmarks/sweep.py [--rows 60000] [--epochs 4] [--trials 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-torch-bench-sweep-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from prefect import flow  # noqa: E402

from prefect_torch.blocks import TorchStorage  # noqa: E402
from prefect_torch.engine.loop import TrainSpec  # noqa: E402
from prefect_torch.engine.models import ModelSpec  # noqa: E402
from prefect_torch.engine.optim import OptimizerSpec  # noqa: E402
from prefect_torch.engine.search import apply_params  # noqa: E402
from prefect_torch.flows.params import DatasetSpec, PrunerSpec  # noqa: E402
from prefect_torch.flows.sweep import SweepSpec, sweep_flow  # noqa: E402
from prefect_torch.tasks import data_load, data_split, model_define, train  # noqa: E402
from prefect_torch.tasks._common import default_checkpoints_root, persisted_in  # noqa: E402

SPACE = {"lr": {"log_uniform": [1e-4, 3e-2]}, "dropout": {"uniform": [0.0, 0.3]}}


def make_data(path: str, rows: int) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, 16))
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(16)])
    frame["y"] = X @ rng.normal(size=16) + 0.5 * np.sin(X[:, 0]) + 0.1 * rng.normal(size=rows)
    frame.to_csv(path, index=False)


def forget_checkpoints() -> None:
    """Both sides write the Train card's checkpoints under the Prefect home, filed by
    lineage; the bare side would otherwise resume from the sweep's last checkpoint of
    the same parameters and train nothing."""
    shutil.rmtree(default_checkpoints_root(), ignore_errors=True)


@flow(name="bare-trainings")
def bare_trainings(
    dataset: DatasetSpec, trials: list[dict], model: ModelSpec, training: TrainSpec, basepath: str
) -> tuple[float, list[float]]:
    """Load and Split once, then one Train card run per parameter set: what a sweep saves a user writing.
    Returns the whole time and each Train card's."""
    load, split, define, fit = persisted_in(TorchStorage(basepath=basepath), data_load, data_split, model_define, train)
    started = time.perf_counter()
    splits = split(load(dataset.load_spec()), dataset.split_spec())
    each = []
    for params in trials:
        m, o, t = apply_params(params, model, OptimizerSpec(), training)
        handle = define(m, splits).fork()
        card_started = time.perf_counter()  # as a trial's time: from its Train card's start to its result
        fit(splits, handle, o, t)
        each.append(time.perf_counter() - card_started)
    return time.perf_counter() - started, each


def timed_sweep(dataset: DatasetSpec, trials: int, parallel: int, model: ModelSpec, training: TrainSpec, name: str):
    started = time.perf_counter()
    result = sweep_flow(dataset=dataset, space=SPACE, model=model, training=training,
                        sweep=SweepSpec(trials=trials, parallel=parallel, seed=0, pruner=PrunerSpec(name="none"),
                                        study_name=name))
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=60000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--trials", type=int, default=4, help="trials of the overhead comparison")
    parser.add_argument("--skip-parallel", action="store_true")
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    work = tempfile.mkdtemp(prefix="sweep-bench-")
    path = os.path.join(work, "data.csv")
    make_data(path, args.rows)
    dataset = DatasetSpec(uri=path, target="y")
    model = ModelSpec(hidden=[64, 64])
    training = TrainSpec(epochs=args.epochs, batch_size=128, device="cpu")
    out: dict = {"rows": args.rows, "epochs": args.epochs, "cpus": os.cpu_count()}
    with prefect_test_harness(server_startup_timeout=180):
        # Warm-up: first imports, first flow run, torch's first kernels, and a one-trial sweep
        # on other data (Optuna's storage imports alembic on first use, about a second once per
        # process; the measured sweep must neither pay that nor find its Split cached).
        bare_trainings(dataset, [{"lr": 1e-3}], model, training.model_copy(update={"epochs": 1}),
                       os.path.join(work, "warmup"))
        warm_path = os.path.join(work, "warmup.csv")
        make_data(warm_path, 2000)
        timed_sweep(DatasetSpec(uri=warm_path, target="y"), 1, 1, model, training.model_copy(update={"epochs": 1}),
                    "bench-warmup")

        forget_checkpoints()
        sweep_s, result = timed_sweep(dataset, args.trials, 1, model, training, "bench-overhead")
        params = [t.params for t in result.trials]
        forget_checkpoints()
        bare_s, bare_each = bare_trainings(dataset, params, model, training, os.path.join(work, "bare"))
        out["overhead"] = {
            "trials": args.trials, "sweep_seconds": round(sweep_s, 3), "bare_train_cards_seconds": round(bare_s, 3),
            "per_trial_sweep_seconds": round(sweep_s / args.trials, 3),
            "per_trial_bare_seconds": round(bare_s / args.trials, 3),
            # Each bare Train card alone, without the Load and Split.
            "per_card_bare_seconds": round(sum(bare_each) / args.trials, 3),
            "overhead_ratio": round(sweep_s / bare_s, 3), "target": 1.2,
            # Each trial from its submission to its result being told to the study, against a bare Train card.
            "per_trial_in_sweep_seconds": round(sum(t.seconds or 0 for t in result.trials) / args.trials, 3),
        }
        out["overhead"]["per_trial_ratio"] = round(
            out["overhead"]["per_trial_in_sweep_seconds"] / out["overhead"]["per_card_bare_seconds"], 3)
        if not args.skip_parallel:
            walls = {}
            for parallel in (1, 2):
                seeded = training.model_copy(update={"seed": 10 + parallel})
                walls[parallel], _ = timed_sweep(dataset, 8, parallel, model, seeded, f"bench-parallel-{parallel}")
            out["parallel"] = {"trials": 8, "wall_seconds_parallel_1": round(walls[1], 3),
                               "wall_seconds_parallel_2": round(walls[2], 3),
                               "speedup": round(walls[1] / walls[2], 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
