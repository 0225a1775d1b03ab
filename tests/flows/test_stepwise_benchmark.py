"""benchmarks/stepwise.py runs end to end with tiny sizes and prints a usable report.

The figures themselves are for the closing note, not for asserting: this keeps
the script from rotting and pins down what its report says.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "stepwise.py"
CONTENDERS = ("cards", "bare_tasks", "plain")


def check_per_card(figures: dict, threads: int) -> None:
    assert figures["torch_threads"] == threads
    # One epoch: six step cards per batch and the epoch end.
    assert figures["card_calls_per_round"] == 6 * figures["batches_per_round"] + 1
    middle = figures["median_round"]
    assert all(middle["seconds"][name] > 0 for name in CONTENDERS)
    assert middle["empty_task_s"] > 0
    for contender in ("cards", "bare_tasks"):
        parts = middle[contender]
        # The overhead splits into Prefect's path around the card and slower work inside it.
        assert math.isclose(parts["prefect_path_s"] + parts["slower_work_s"], parts["overhead_s"], rel_tol=1e-9)
        assert parts["prefect_path_s"] > 0  # a task run costs something
    assert math.isclose(
        middle["overhead_over_empty_task"], middle["cards"]["overhead_s"] / middle["empty_task_s"], rel_tol=1e-9
    )
    for name, value in figures["median"].items():
        assert math.isfinite(value)
        assert min(figures["rounds"][name]) - 1e-3 <= value <= max(figures["rounds"][name]) + 1e-3
    assert figures["target"] == 1.25


def load_script():
    if "benchmark_stepwise" not in sys.modules:
        spec = importlib.util.spec_from_file_location("benchmark_stepwise", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["benchmark_stepwise"] = module
        spec.loader.exec_module(module)
    return sys.modules["benchmark_stepwise"]


@pytest.mark.slow
def test_quick_benchmark_reports_card_overhead_and_wall_time(tmp_path):
    script = load_script()
    # measure() is what main() runs inside the CLI's embedded Prefect; here the tests' server serves it.
    report = json.loads(json.dumps(script.measure(script.parse_args(["--quick"]), str(tmp_path))))

    assert report["benchmark"] == "stepwise" and 0.9e6 < report["model_parameters"] < 1.1e6
    # Read after the run: the one-thread round must have restored the thread count.
    check_per_card(report["per_card"], threads=torch.get_num_threads())
    check_per_card(report["per_card_one_thread"], threads=1)
    wall = report["wall"]
    # Both flows trained the same number of steps, so their times compare.
    assert wall["train_flow"]["steps"] == wall["stepwise_train_flow"]["steps"] > 0
    assert wall["stepwise_over_fast_training"] == pytest.approx(
        wall["stepwise_train_flow"]["train_s"] / wall["train_flow"]["train_s"]
    )


def test_benchmark_options_set_the_sizes():
    args = load_script().parse_args([])
    assert (args.rows, args.batch, args.rounds) == (8192, 256, 5)
    args = load_script().parse_args(["--quick"])
    assert (args.rows, args.batch, args.epochs, args.rounds) == (512, 128, 1, 1)
