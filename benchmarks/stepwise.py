"""Step-wise flow figures for issue 4, printed as JSON.

Run on the embedded default Prefect exactly as the ``prefect-torch`` command
runs it (a temporary server in a subprocess, the CLI's settings, a fresh
``PREFECT_HOME``), unless ``PREFECT_API_URL`` points at a server.

- per_card: what a step card costs on top of its own work, against an empty
  Prefect task timed in the same round. One epoch of the same ``StepwiseLoop``
  runs three ways on the same batches:

  * ``cards``: through the step cards (Prefect task runs named like the loop);
  * ``bare_tasks``: the cards' functions in bare tasks with the empty task's
    options (no run names, nothing of ours around them): the least any Prefect
    task can cost around the same torch work;
  * ``plain``: the cards' functions called directly.

  A card's overhead is (cards − plain) / card calls. It has two parts:

  * ``prefect_path``: the card's wall time less the time inside its function:
    what the task machinery costs around the card. This is the like-for-like
    comparison with the empty task, whose time is all task machinery.
  * ``slower_work``: the card functions' torch work running slower between
    Prefect calls than in the plain loop. Prefect records every task run in
    the background (the client's event and log threads, the server's recorder);
    on a machine where torch already uses every core, that work takes CPU from
    torch. An empty task leaves a core free for it, so it hardly shows there.
    ``bare_tasks`` shows how much of it any Prefect task around the same work
    pays.

  Before each contender the server is given time to finish recording the
  previous one's runs, so that no contender pays for another's. Ratios are
  taken within each round (contenders run back to back) and the median round
  is reported: load on a shared machine drifts between rounds.
- wall: ``stepwise_train_flow`` against ``train_flow`` for the same training
  (whole flow runs, and the training part alone).

The model is an MLP of about 1M parameters.

    python benchmarks/stepwise.py [--rows 8192] [--batch 256] [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import BaseAnnotation

from prefect_torch.engine.loop import Trainer, TrainSpec
from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec
from prefect_torch.flows.params import DatasetSpec
from prefect_torch.flows.stepwise import StepwiseLoop, UserSteps, _Cursor

# 32 → 1024 → 896 → 1: 0.96M parameters.
HIDDEN = [1024, 896]
FEATURES = 32
# The step cards one batch calls (accumulate=1): prepare, zero_grad, forward, loss, backward, step.
CARDS_PER_BATCH = 6
LOOP_CARDS = ("prepare_batch", "zero_grad", "forward", "loss", "backward", "optimizer_step",
              "lr_schedule", "epoch_end")
CONTENDERS = ("cards", "bare_tasks", "plain")
#: Options of the empty task, and of the bare tasks measured beside the cards.
BARE = dict(cache_policy=NO_CACHE, persist_result=False)


def make_csv(folder: str, rows: int) -> str:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(FEATURES)])
    frame["y"] = X @ rng.normal(size=FEATURES) + np.sin(X[:, 0]) + rng.normal(scale=0.1, size=rows)
    path = os.path.join(folder, "data.csv")
    frame.to_csv(path, index=False)
    return path


# -- the contenders ------------------------------------------------------------------


def _unwrapped(fn):
    """``fn`` called with Prefect's annotations unwrapped, as Prefect calls a task's function."""
    def call(*args, **kwargs):
        args = [a.unwrap() if isinstance(a, BaseAnnotation) else a for a in args]
        kwargs = {k: v.unwrap() if isinstance(v, BaseAnnotation) else v for k, v in kwargs.items()}
        return fn(*args, **kwargs)
    return call


class _BodyClock:
    """Seconds spent inside the card functions while Prefect runs them."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
        return timed


def _loop(splits, training: TrainSpec, contender: str, clock: _BodyClock) -> StepwiseLoop:
    from prefect_torch.tasks import model_define, training_init_optimizer

    handle = model_define.fn(ModelSpec(hidden=HIDDEN), splits)
    optimizer = training_init_optimizer.fn(handle, OptimizerSpec())
    trainer = Trainer(handle.model, optimizer.live, splits, training, [])
    loop = StepwiseLoop(trainer, splits, handle, optimizer, UserSteps(), _Cursor())
    for name in LOOP_CARDS:
        card = getattr(loop, name)
        if contender == "plain":
            replacement = _unwrapped(card.fn)
        elif contender == "bare_tasks":
            # Named apart from the cards: the step-wise loop's log settings are not for them.
            replacement = task(clock.timed(card.fn), name=f"bare-{card.name}", **BARE)
        else:
            replacement = card.with_options()
            replacement.fn = clock.timed(card.fn)
        setattr(loop, name, replacement)
    return loop


@task(name="empty", **BARE)
def empty() -> None:
    return None


@flow(name="bench-step-cards", persist_result=False)
def time_loop(splits, training: TrainSpec, contender: str) -> dict:
    """One epoch of the step-wise loop run one way: seconds, and seconds inside the card functions."""
    clock = _BodyClock()
    loop = _loop(splits, training, contender, clock)
    started = time.perf_counter()
    loop.run()
    seconds = time.perf_counter() - started
    batches = len(loop.trainer.plans)
    # Per batch: prepare, zero_grad, forward, loss, backward, step; once: the epoch end.
    return {"seconds": seconds, "inside_functions": clock.seconds, "batches": batches,
            "card_calls": batches * CARDS_PER_BATCH + 1}


@flow(name="bench-empty-task", persist_result=False)
def time_empty(calls: int) -> float:
    """Seconds per call of an empty task."""
    started = time.perf_counter()
    for _ in range(calls):
        empty()
    return (time.perf_counter() - started) / calls


# -- waiting for the server -----------------------------------------------------------


def _temporary_server_pid() -> int | None:
    """The process id of the temporary server Prefect started for this process, if any."""
    from prefect.server.api.server import SubprocessASGIServer

    for server in SubprocessASGIServer._instances.values():
        process = getattr(server, "server_process", None)
        if process is not None and process.poll() is None:
            return process.pid
    return None


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:  # not Linux, or the process is gone
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_quiet(timeout: float = 60.0, window: float = 0.5, busy_share: float = 0.05) -> float:
    """Wait until the temporary server has finished recording earlier runs (its CPU
    use falls under ``busy_share`` of a core); returns the seconds waited.

    A server elsewhere (``PREFECT_API_URL``) takes no CPU from this machine's
    contenders; with no /proc to read, a fixed pause stands in."""
    started = time.monotonic()
    pid = _temporary_server_pid()
    if pid is None:
        return 0.0
    while time.monotonic() - started < timeout:
        before = _cpu_seconds(pid)
        time.sleep(window)
        after = _cpu_seconds(pid)
        if before is None or after is None or after - before < busy_share * window:
            break
    return time.monotonic() - started


# -- the figures ----------------------------------------------------------------------


def one_round(splits, training: TrainSpec) -> dict:
    loops = {}
    for contender in CONTENDERS:
        server_quiet()
        loops[contender] = time_loop(splits, training, contender)
    calls = loops["cards"]["card_calls"]
    server_quiet()
    empty_s = time_empty(calls)
    plain = loops["plain"]["seconds"]

    def overhead(contender: str) -> dict:
        run = loops[contender]
        total = (run["seconds"] - plain) / calls
        path = (run["seconds"] - run["inside_functions"]) / calls
        return {"overhead_s": total, "prefect_path_s": path, "slower_work_s": total - path}

    cards, bare = overhead("cards"), overhead("bare_tasks")
    return {
        "seconds": {name: loops[name]["seconds"] for name in CONTENDERS},
        "batches": loops["cards"]["batches"],
        "card_calls": calls,
        "empty_task_s": empty_s,
        "cards": cards,
        "bare_tasks": bare,
        "prefect_path_over_empty_task": cards["prefect_path_s"] / empty_s,
        "overhead_over_empty_task": cards["overhead_s"] / empty_s,
        "bare_task_overhead_over_empty_task": bare["overhead_s"] / empty_s,
        "overhead_over_bare_task_overhead": cards["overhead_s"] / bare["overhead_s"],
    }


RATIOS = ("prefect_path_over_empty_task", "overhead_over_empty_task",
          "bare_task_overhead_over_empty_task", "overhead_over_bare_task_overhead")


def per_card(splits, batch: int, rounds: int) -> dict:
    training = TrainSpec(epochs=1, batch_size=batch, device="cpu", seed=0)
    time_empty(5)  # the first task run of a process imports and connects: not a per-card cost
    played = [one_round(splits, training) for _ in range(rounds)]
    median = {name: statistics.median(r[name] for r in played) for name in RATIOS}
    middle = min(played, key=lambda r: abs(r["overhead_over_empty_task"] - median["overhead_over_empty_task"]))
    return {
        "torch_threads": torch.get_num_threads(),
        "batches_per_round": played[0]["batches"],
        "card_calls_per_round": played[0]["card_calls"],
        "median": median,
        "median_round": middle,
        "rounds": {name: [round(r[name], 3) for r in played] for name in RATIOS},
        "target": 1.25,
    }


def one_thread(fn, *args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def wall(path: str, batch: int, epochs: int, rounds: int) -> dict:
    from prefect_torch.flows import stepwise_train_flow, train_flow

    best = {"train_flow": None, "stepwise_train_flow": None}
    for round_ in range(rounds):
        # A new seed each round: train_flow would otherwise return its cached result.
        request = dict(dataset=DatasetSpec(uri=path, target="y"), model=ModelSpec(hidden=HIDDEN),
                       training=TrainSpec(epochs=epochs, batch_size=batch, device="cpu", seed=round_))
        for name, run in (("train_flow", train_flow), ("stepwise_train_flow", stepwise_train_flow)):
            server_quiet()
            started = time.perf_counter()
            result = run(**request)
            figures = {"flow_s": time.perf_counter() - started, "train_s": result.train_seconds,
                       "steps": result.steps}
            if best[name] is None or figures["flow_s"] < best[name]["flow_s"]:
                best[name] = figures
    fast, stepwise = best["train_flow"], best["stepwise_train_flow"]
    return {
        **best,
        "stepwise_over_fast_flow": stepwise["flow_s"] / fast["flow_s"],
        "stepwise_over_fast_training": stepwise["train_s"] / fast["train_s"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the wall-time comparison")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs, measures nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.batch, args.epochs, args.rounds = 512, 128, 1, 1
    return args


def measure(args: argparse.Namespace, folder: str) -> dict:
    from prefect_torch.tasks import data_load, data_split

    path = make_csv(folder, args.rows)
    dataset = DatasetSpec(uri=path, target="y")
    splits = data_split.fn(data_load.fn(dataset.load_spec()), dataset.split_spec())
    parameters = sum(p.numel() for p in _loop(splits, TrainSpec(), "plain", _BodyClock()).model.model.parameters())
    return {
        "benchmark": "stepwise",
        "model_parameters": parameters,
        "rows_train": len(splits.train),
        "batch_size": args.batch,
        "cpu_cores": os.cpu_count(),
        "per_card": per_card(splits, args.batch, args.rounds),
        # One intra-op thread leaves a core to Prefect's recording, as the empty task does.
        "per_card_one_thread": one_thread(per_card, splits, args.batch, args.rounds),
        "wall": wall(path, args.batch, args.epochs, args.rounds),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from prefect_torch.runtime import quiet_embedded_prefect

    with tempfile.TemporaryDirectory() as folder:
        if not os.environ.get("PREFECT_API_URL"):
            # A fresh home: the figures do not depend on what earlier runs left in the database.
            os.environ["PREFECT_HOME"] = os.path.join(folder, "prefect")
        with quiet_embedded_prefect():
            report = measure(args, folder)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
