"""benchmarks/gpu.py runs end to end on CPU with tiny sizes and prints a usable report.

The real measurement needs a GPU (see the script's docstring); this keeps the
script from rotting between GPU runs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"
LOOPS = ("train_flow", "plain_loop", "seed_loop")


def load_script():
    if "benchmark_gpu" not in sys.modules:
        spec = importlib.util.spec_from_file_location("benchmark_gpu", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["benchmark_gpu"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["benchmark_gpu"]


def check_report(report: dict) -> None:
    assert report["device"] == "cpu" and report["bf16_peak_tflops"] is None
    assert set(report["cases"]) == {"large", "small"}
    for case in report["cases"].values():
        # Same data, model and number of optimizer steps in all three loops.
        steps = {case[loop]["steps"] for loop in LOOPS}
        assert steps == {case["steps_per_epoch"] * report["epochs"]}
        for loop in LOOPS:
            assert case[loop]["seconds"] > 0 and case[loop]["samples_per_s"] > 0
            assert math.isfinite(case[loop]["final_train_loss"])
        assert case["flow_over_plain"] > 0 and case["seed_over_flow"] > 0
        assert case["flow_share_of_bf16_peak"] is None  # no peak for a CPU
    verdict = report["verdict"]
    assert verdict["seed_over_flow_small"] == report["cases"]["small"]["seed_over_flow"]


def test_quick_benchmark_on_cpu_reports_all_three_loops(prefect_harness, capsys):
    report = load_script().main(["--quick", "--device", "cpu"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(report))
    check_report(printed)


def test_benchmark_options_set_the_sizes():
    args = load_script().parse_args(["--rows", "500", "--epochs", "2", "--quick"])
    assert (args.rows, args.epochs, args.device) == (500, 2, "cuda")
    args = load_script().parse_args([])
    assert (args.rows, args.epochs, args.precision) == (1_000_000, 3, "bf16")
