"""20 train_flow runs at once against one long-lived Prefect server on
PostgreSQL with Redis messaging (the self-hosted production setup): every run
Completed, and the API records each run's six cards, with every shared card
computed once across all twenty.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.caching.run_train_flow import _card
from tests.datasets import noisy_linear
from tests.support.prefect_server import start_process

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
RUNS, PROCESSES = 20, 4
CARDS = ("data_load", "data_split", "model_define", "train", "evaluate", "model_save")
SHARED = ("data_load", "data_split", "model_define")  # same data and model in every run


def test_twenty_flow_runs_at_once_on_postgres(prefect_server_postgres, tmp_path):
    server = prefect_server_postgres
    data = tmp_path / "data.csv"
    noisy_linear(200).to_csv(data, index=False)
    # Same data and model, a different seed each: the shared cards are cached, training is not.
    requests = [
        {"dataset": {"uri": str(data), "target": "y"}, "model": {"hidden": [8]},
         "training": {"epochs": 2, "device": "cpu", "seed": seed}}
        for seed in range(RUNS)
    ]
    env = {**server.env, "PREFECT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1",
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    batches = [requests[i::PROCESSES] for i in range(PROCESSES)]
    processes = [
        start_process([sys.executable, "-m", "tests.hardening.run_many_flows", json.dumps(batch)],
                      env, tmp_path / f"batch-{i}.log", cwd=REPO)
        for i, batch in enumerate(batches)
    ]
    runs = []
    try:
        for process in processes:
            code = process.popen.wait(timeout=300)
            assert code == 0, f"batch exited {code}:\n{process.log_tail(80)}"
            runs += json.loads(process.log_path.read_text().strip().splitlines()[-1])
    finally:
        for process in processes:
            process.stop()

    ids = [run["id"] for run in runs]
    assert len(set(ids)) == RUNS and {run["state"] for run in runs} == {"Completed"}
    flow_runs = server.wait_for_flow_runs(ids, timeout=60)
    assert {run["state_type"] for run in flow_runs.values()} == {"COMPLETED"}

    # Task runs reach the API as events, a moment after the flow runs end (seconds,
    # more on a loaded machine).
    deadline = time.monotonic() + 120
    while True:
        task_runs = server.request("POST", "/task_runs/filter",
                                   json={"flow_runs": {"id": {"any_": ids}}, "limit": 200})
        final = [run for run in task_runs if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
        if len(final) >= RUNS * len(CARDS) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    by_flow: dict[str, list[str]] = {run_id: [] for run_id in ids}
    for run in task_runs:
        by_flow[run["flow_run_id"]].append(_card(run["name"]))
    assert all(sorted(cards) == sorted(CARDS) for cards in by_flow.values()), by_flow
    unfinished = [(run["name"], run["state_name"], run["flow_run_id"], run["id"]) for run in task_runs
                  if run["state_type"] != "COMPLETED"]
    assert not unfinished, json.dumps([(name, state, flow_run, _history(server, run_id))
                                       for name, state, flow_run, run_id in unfinished], indent=1)

    computed = Counter(_card(run["name"]) for run in task_runs if run["state_name"] == "Completed")
    cached = Counter(_card(run["name"]) for run in task_runs if run["state_name"] == "Cached")
    # Each shared card computed once in all twenty runs; the others waited and read it.
    assert {card: computed[card] for card in SHARED} == dict.fromkeys(SHARED, 1), computed
    assert {card: cached[card] for card in SHARED} == dict.fromkeys(SHARED, RUNS - 1), cached
    assert computed["train"] == computed["evaluate"] == computed["model_save"] == RUNS
    if server.redis_url is not None:  # the events went through Redis, as in production
        import redis

        with redis.Redis.from_url(server.redis_url) as client:
            assert client.xlen("events") > 0


def _history(server, task_run_id: str) -> dict:
    """What the API knows of a task run: its recorded states and the events it was built from."""
    states = server.request("GET", "/task_run_states/", params={"task_run_id": task_run_id})
    events = server.request("POST", "/events/filter", json={
        "filter": {"resource": {"id": [f"prefect.task-run.{task_run_id}"]}, "order": "ASC",
                   "occurred": {"since": "2000-01-01T00:00:00Z"}},
        "limit": 50,
    })
    return {
        "states": [(s["name"], s["timestamp"]) for s in states],
        "events": [(e["event"], e["occurred"], e["payload"].get("validated_state", {}).get("timestamp"),
                    e["id"], e.get("follows")) for e in events.get("events", [])],
    }
