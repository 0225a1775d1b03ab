"""benchmarks/e2e.py keeps running: its --quick mode, checked for what it reports (not for speed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.server
def test_the_quick_e2e_benchmark_reports_every_run_and_card():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    out = subprocess.run([sys.executable, "benchmarks/e2e.py", "--quick"], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout)
    runs = figures["runs"]
    assert set(runs) == {"plain", "first", "cached", "model_only", "first_warm"}
    assert len(runs["plain"]["all_seconds"]) == 3 and runs["plain"]["seconds"] == sorted(runs["plain"]["all_seconds"])[1]
    # The first command runs in its own process and leaves a warm process for the others.
    assert [runs[name]["warm"] for name in ("first", "cached", "model_only", "first_warm")] == [False, True, True, True]
    assert figures["warm_process_rss_mb"] > 0 and figures["warm_process_ready_after_s"] >= 0
    cards = {"data_load", "data_split", "model_define", "train", "evaluate", "model_save"}
    for name in ("first", "cached", "model_only", "first_warm"):
        assert set(runs[name]["cards"]) == cards, name
        assert runs[name]["peak_rss_mb"] > 0 and runs[name]["flow_run_seconds"] > 0
    states = {name: {card: v["state"] for card, v in runs[name]["cards"].items()} for name in runs if name != "plain"}
    assert all(state != "Cached" for state in states["first"].values())
    assert {c for c, s in states["cached"].items() if s == "Cached"} == cards - {"model_save"}
    assert {c for c, s in states["model_only"].items() if s == "Cached"} == {"data_load", "data_split"}
    assert all(state != "Cached" for state in states["first_warm"].values())  # other data: nothing to reuse
    assert "loop_seconds" in runs["first"]["cards"]["train"]
    assert runs["first"]["test_metrics"] == runs["cached"]["test_metrics"] != runs["model_only"]["test_metrics"]
    assert set(figures["ratios"]) == set(figures["targets"])
