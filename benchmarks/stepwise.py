"""Step-wise flow figures for issue 4, printed as JSON.

- per_card: what a step card costs on top of its own work, against an empty
  Prefect task timed in the same run. The same ``StepwiseLoop`` runs the same
  batches twice inside a flow: once through the cards (Prefect task runs) and
  once through the cards' plain functions. The difference, per card call, is
  the cards' overhead; the target is ≤ 1.25 × the empty task's time per call.
  It is split in two: Prefect's path around each card (card wall time less the
  time inside its function) and the card functions' work running slower inside
  Prefect than in the plain loop.
- wall: ``stepwise_train_flow`` against ``train_flow`` for the same training
  (whole flow runs, and the training part alone).

The model is an MLP of about 1M parameters. Rounds interleave the contenders
so that load on the machine hits all of them alike; the best round counts.

    python benchmarks/stepwise.py [--rows 8192] [--batch 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
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


def make_csv(folder: str, rows: int) -> str:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(FEATURES)])
    frame["y"] = X @ rng.normal(size=FEATURES) + np.sin(X[:, 0]) + rng.normal(scale=0.1, size=rows)
    path = os.path.join(folder, "data.csv")
    frame.to_csv(path, index=False)
    return path


def _plain(card):
    """The card's own function, called with Prefect's annotations unwrapped as Prefect would."""
    def call(*args, **kwargs):
        args = [a.unwrap() if isinstance(a, BaseAnnotation) else a for a in args]
        kwargs = {k: v.unwrap() if isinstance(v, BaseAnnotation) else v for k, v in kwargs.items()}
        return card.fn(*args, **kwargs)
    return call


class _BodyClock:
    """Seconds spent inside the cards' own functions while Prefect runs them."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, card) -> None:
        inner = card.fn

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        card.fn = timed


def _loop(splits, training: TrainSpec, through_prefect: bool, clock: _BodyClock | None = None) -> StepwiseLoop:
    from prefect_torch.tasks import model_define, training_init_optimizer

    handle = model_define.fn(ModelSpec(hidden=HIDDEN), splits)
    optimizer = training_init_optimizer.fn(handle, OptimizerSpec())
    trainer = Trainer(handle.model, optimizer.live, splits, training, [])
    loop = StepwiseLoop(trainer, splits, handle, optimizer, UserSteps(), _Cursor())
    for name in LOOP_CARDS:
        if not through_prefect:
            setattr(loop, name, _plain(getattr(loop, name)))
        elif clock is not None:
            clock.wrap(getattr(loop, name))
    return loop


@task(cache_policy=NO_CACHE, persist_result=False)
def empty() -> None:
    return None


@flow(name="bench-step-cards", persist_result=False)
def time_loop(splits, training: TrainSpec, through_prefect: bool) -> dict:
    """Seconds of one epoch of the step-wise loop, through the cards or their plain functions."""
    clock = _BodyClock()
    loop = _loop(splits, training, through_prefect, clock)
    started = time.perf_counter()
    loop.run()
    seconds = time.perf_counter() - started
    batches = len(loop.trainer.plans)
    # Per batch: prepare, zero_grad, forward, loss, backward, step; once: the epoch end.
    return {"seconds": seconds, "bodies": clock.seconds, "batches": batches,
            "cards": batches * CARDS_PER_BATCH + 1}


@flow(name="bench-empty-task", persist_result=False)
def time_empty(calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        empty()
    return (time.perf_counter() - started) / calls


def per_card(splits, batch: int, rounds: int) -> dict:
    training = TrainSpec(epochs=1, batch_size=batch, device="cpu", seed=0)
    best = {"cards": None, "plain": float("inf"), "empty": float("inf")}
    for _ in range(rounds):
        cards = time_loop(splits, training, True)
        plain = time_loop(splits, training, False)
        if best["cards"] is None or cards["seconds"] < best["cards"]["seconds"]:
            best["cards"] = cards
        best["plain"] = min(best["plain"], plain["seconds"])
        best["empty"] = min(best["empty"], time_empty(cards["cards"]))
    cards, calls = best["cards"], best["cards"]["cards"]
    overhead = (cards["seconds"] - best["plain"]) / calls
    # The overhead, split: Prefect's own path around each card (the card's wall time
    # less its function's), and the card functions' torch work running slower between
    # Prefect calls than in a plain loop (Prefect's event and log threads, and the
    # server, take CPU from it).
    prefect_path = (cards["seconds"] - cards["bodies"]) / calls
    slower_work = (cards["bodies"] - best["plain"]) / calls
    return {
        "batches_per_round": cards["batches"],
        "card_calls_per_round": calls,
        "epoch_through_cards_s": cards["seconds"],
        "card_functions_inside_prefect_s": cards["bodies"],
        "epoch_plain_functions_s": best["plain"],
        "card_overhead_s": overhead,
        "of_which_prefect_path_s": prefect_path,
        "of_which_slower_work_s": slower_work,
        "empty_task_s": best["empty"],
        "overhead_over_empty_task": overhead / best["empty"],
        "prefect_path_over_empty_task": prefect_path / best["empty"],
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the wall-time comparison")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from prefect.testing.utilities import prefect_test_harness

    from prefect_torch.tasks import data_load, data_split

    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=180):
        from prefect.settings import PREFECT_HOME, temporary_settings

        with temporary_settings({PREFECT_HOME: tmp}):
            path = make_csv(tmp, args.rows)
            dataset = DatasetSpec(uri=path, target="y")
            splits = data_split.fn(data_load.fn(dataset.load_spec()), dataset.split_spec())
            parameters = sum(p.numel() for p in _loop(splits, TrainSpec(), False).model.model.parameters())
            report = {
                "benchmark": "stepwise",
                "model_parameters": parameters,
                "rows_train": len(splits.train),
                "batch_size": args.batch,
                "torch_threads": torch.get_num_threads(),
                "per_card": per_card(splits, args.batch, args.rounds),
                # One intra-op thread: no OpenMP team to hand the cores to and from
                # Prefect's event and log threads between cards.
                "per_card_one_thread": one_thread(per_card, splits, args.batch, args.rounds),
                "wall": wall(path, args.batch, args.epochs, args.rounds),
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
