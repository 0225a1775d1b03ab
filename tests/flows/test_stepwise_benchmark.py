"""benchmarks/stepwise.py runs end to end with tiny sizes and prints a usable report.

The figures themselves are for the closing note, not for asserting: this keeps
the script from rotting and pins down what its report says.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.prefect_server import base_env

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


@pytest.mark.slow
def test_quick_benchmark_reports_card_overhead_and_wall_time(tmp_path):
    env = base_env(PREFECT_HOME=str(tmp_path / "unused"))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, env=env, timeout=500,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # stdout is the JSON report and nothing else

    assert report["benchmark"] == "stepwise" and 0.9e6 < report["model_parameters"] < 1.1e6
    check_per_card(report["per_card"], threads=report["per_card"]["torch_threads"])
    check_per_card(report["per_card_one_thread"], threads=1)
    wall = report["wall"]
    # Both flows trained the same number of steps, so their times compare.
    assert wall["train_flow"]["steps"] == wall["stepwise_train_flow"]["steps"] > 0
    assert wall["stepwise_over_fast_training"] == pytest.approx(
        wall["stepwise_train_flow"]["train_s"] / wall["train_flow"]["train_s"]
    )
    # The benchmark's server kept its database in a temporary home of its own.
    assert not (tmp_path / "unused" / "prefect.db").exists()
