"""benchmarks/gpu.py runs end to end on CPU with tiny sizes and reports as it goes.

The real measurement needs a GPU (benchmarks/gpu_check.sh); this keeps the
script's structure and its incremental JSON output from rotting between GPU
runs. Not marked gpu: it runs in CI.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


def load_script():
    if "benchmark_gpu" not in sys.modules:
        spec = importlib.util.spec_from_file_location("benchmark_gpu", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["benchmark_gpu"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["benchmark_gpu"]


class Stdout(io.StringIO):
    """Stands in for stdout (capsys would leave Prefect's log handler on a closed stream);
    keeps what had been written at each flush."""

    def __init__(self):
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        super().flush()
        self.flushed.append(self.getvalue())

    def lines(self, text: str | None = None) -> list[dict]:
        return [json.loads(line) for line in (self.getvalue() if text is None else text).splitlines()]


def check_case(case: dict, seed_rows: int) -> None:
    flow, plain = case["train_flow"], case["plain_loop"]
    # Same rows, epochs and optimizer steps in the Train flow and the hand-written loop.
    assert flow["steps"] == plain["steps"] == case["steps_per_epoch"] * case["epochs"]
    for result in (flow, plain):
        assert result["seconds"] > 0 and result["samples_per_s"] > 0 and result["tflops"] > 0
        assert math.isfinite(result["final_train_loss"])
    assert flow["flow_seconds"] >= flow["seconds"]
    assert case["flow_over_plain"] == flow["seconds"] / plain["seconds"]
    assert case["flow_share_of_bf16_peak"] is None  # no peak for a CPU
    if "seed_loop" in case:  # fewer rows, one epoch: compared per sample
        seed = case["seed_loop"]
        assert seed["rows"] == seed_rows and seed["epochs"] == 1
        assert seed["samples_per_s"] == seed_rows / seed["seconds"]
        assert case["seed_over_flow_per_sample"] == flow["samples_per_s"] / seed["samples_per_s"]


def test_quick_benchmark_prints_one_json_line_per_case_then_a_summary(prefect_harness):
    out = Stdout()
    report = load_script().main(["--quick", "--device", "cpu"], out=out)
    lines = out.lines()
    assert len(out.flushed) == len(lines)  # each line flushed as it was written

    assert [line.get("case") for line in lines[:-1]] == ["large", "small", "compute"]
    for line in lines[:-1]:
        assert line["device"] == "cpu"
        check_case(line, seed_rows=200)
    assert lines[0]["epochs"] == 1 and lines[2]["epochs"] == 1 and lines[2]["rows"] == 1_000
    assert lines[1]["rows"] == 400  # the small case has its own size
    lightning = lines[0]["lightning"]  # optional: measured where importable, else says why not
    assert "seconds" in lightning or lightning == {"skipped": "lightning is not importable here"}

    summary = lines[-1]["summary"]
    assert summary["prefect_start_seconds"] > 0  # outside every case's timing
    assert summary["bf16_peak_tflops"] is None and summary["targets"]["flow_over_plain_small_max"] == 0.5
    verdict = summary["verdict"]
    assert verdict["flow_over_plain_small"] == lines[1]["flow_over_plain"]
    assert verdict["share_of_bf16_peak_compute"] is None and verdict["met"]["share_of_bf16_peak_compute"] is None
    assert verdict["met"]["flow_over_plain_large"] == (lines[0]["flow_over_plain"] <= 1.0)
    assert report["verdict"] == verdict


def test_a_run_cut_short_has_already_printed_the_cases_it_finished(monkeypatch):
    script = load_script()
    real_plain_loop = script.run_plain_loop

    def plain_loop_that_dies_on_the_small_case(X, y, case, args, epochs):
        if case.name == "small":
            raise KeyboardInterrupt  # as a time limit's kill would cut the run
        return real_plain_loop(X, y, case, args, epochs)

    monkeypatch.setattr(script, "run_plain_loop", plain_loop_that_dies_on_the_small_case)
    out = Stdout()
    with pytest.raises(KeyboardInterrupt):
        script.main(["--quick", "--device", "cpu", "--cases", "large,small", "--loops", "plain_loop"],
                    out=out)
    lines = out.lines(out.flushed[-1])  # what had reached stdout when the run was cut
    assert [line["case"] for line in lines] == ["large"]
    assert lines[0]["plain_loop"]["steps"] == lines[0]["steps_per_epoch"] and lines[0]["flow_over_plain"] is None


def test_benchmark_options_set_the_sizes():
    script = load_script()
    args = script.parse_args(["--rows", "500", "--epochs", "2", "--quick"])
    assert (args.rows, args.epochs, args.device, args.small_rows, args.seed_rows) == (500, 2, "cuda", 400, 200)
    args = script.parse_args([])
    assert (args.rows, args.small_rows, args.seed_rows, args.epochs, args.precision, args.cuda_graphs) == (
        1_000_000, 200_000, 50_000, 3, "bf16", "auto")
    assert [case.name for case in script.CASES] == ["large", "small", "compute"]
    compute = script.CASES[2]
    assert (compute.hidden, compute.batch_size) == ((8192,) * 4, 8192)


def test_flop_count_of_an_mlp_step():
    # 64 -> 8 -> 1: the first layer needs no input gradient (4 FLOPs a weight), the last 6.
    assert load_script().flops_per_sample(64, (8,)) == 4 * 64 * 8 + 6 * 8 * 1
