"""Identical cards started at once in separate processes compute once; a lock
holder killed with SIGKILL on the same host is taken over at once, its lease
not waited out.

Each test starts real ``train_flow`` runs in fresh processes that share one
Prefect API (the session harness), one Prefect home (so one result storage and
its ``locks`` folder) and one dataset, as two workers of one deployment would.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from prefect_torch import load_model
from tests.datasets import noisy_linear
from tests.support.prefect_server import ManagedProcess, base_env, start_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
COARSE = ("data_load", "data_split", "model_define", "train", "evaluate")
# Long enough (a few seconds of training on an idle machine) that the second run
# reaches the Train card while the first is still training.
TRAINING = {"epochs": 40, "batch_size": 8, "device": "cpu", "checkpoint_every": 50}


# Long enough (tens of seconds on a loaded machine) that the first run is still
# training when the second, started then, has reached the Train card.
LONG_EPOCHS = 150


def params(data: Path, output: Path, epochs: int = TRAINING["epochs"]) -> dict:
    return {
        "dataset": {"uri": str(data), "target": "y"},
        "model": {"hidden": [32, 32]},
        "optimizer": {"lr": 0.005},
        "training": {**TRAINING, "epochs": epochs},
        "output": str(output),
    }


@pytest.fixture
def shared(tmp_path, prefect_harness):
    """A dataset, and the environment of runs sharing one API and one Prefect home."""
    from prefect.settings import PREFECT_API_URL

    data = tmp_path / "data.csv"
    noisy_linear(1200).to_csv(data, index=False)
    env = base_env(
        PREFECT_API_URL=PREFECT_API_URL.value(),
        PREFECT_HOME=str(tmp_path / "home"),
        PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW="ignore",
        OMP_NUM_THREADS="1",  # two trainings on a small machine: no thread oversubscription
    )
    return data, env, tmp_path


def start_run(request: dict, env: dict, log: Path) -> ManagedProcess:
    args = [sys.executable, "-m", "tests.caching.run_train_flow", json.dumps(request)]
    return start_process(args, env, log, cwd=REPO)


def outcome(process: ManagedProcess, timeout: float) -> dict:
    """Wait for a run process; return the JSON it prints (card states, metrics)."""
    try:
        code = process.popen.wait(timeout=timeout)
    finally:
        process.stop()
    log = process.log_path.read_text(errors="replace")
    assert code == 0, f"run exited {code}:\n{process.log_tail(80)}"
    lines = [line for line in log.splitlines() if line.startswith('{"cards"')]
    assert lines, f"no result printed:\n{process.log_tail(80)}"
    return json.loads(lines[-1])


def waited_for_a_lock(process: ManagedProcess, card: str = "") -> bool:
    """Whether the run logged that it waited on another run's lock (of ``card``, if given)."""
    return f"Waiting for the lock of {card}" in process.log_path.read_text(errors="replace")


def train_lease(home: Path) -> dict | None:
    for path in (home / "prefect-torch" / "locks").glob("train-*.lock"):
        try:
            return json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
    return None


def holder_pid(lease: dict) -> int:
    return int(lease["pid"])


def weights(uri: str) -> dict[str, torch.Tensor]:
    return load_model(uri).model.state_dict()


def test_identical_runs_started_together_train_once(shared):
    data, env, tmp = shared
    runs = [start_run(params(data, tmp / f"model-{i}"), env, tmp / f"run-{i}.log") for i in range(2)]
    first, second = (outcome(run, timeout=300) for run in runs)

    # Every coarse card computed in exactly one of the two runs; the other read its result.
    for card in COARSE:
        assert sorted([first["cards"][card], second["cards"][card]]) == ["Cached", "Completed"], (card, first, second)
    # And they overlapped: the run that did not train waited on the other's Train lock
    # (without the locks, both would have missed the cache and trained). The earlier
    # cards may split either way between the runs, so only the Train lock is telling.
    trained, waited = (0, 1) if first["cards"]["train"] == "Completed" else (1, 0)
    assert waited_for_a_lock(runs[waited], "train-") and not waited_for_a_lock(runs[trained], "train-")

    assert first["metrics"] == second["metrics"]
    a, b = weights(first["model_uri"]), weights(second["model_uri"])
    assert first["model_uri"] != second["model_uri"] and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# The longest lease allowed (a day): one no step of the test can wait out.
HOLD_SECONDS = 86_400.0


def test_a_killed_lock_holder_on_this_host_is_taken_over_at_once(shared):
    data, env, tmp = shared
    env = {**env, "PREFECT_TORCH_LOCK_HOLD_SECONDS": str(HOLD_SECONDS)}
    # The second run starts once the first trains (holds the Train card's lock), so that
    # it meets that lock however slowly either process starts on a loaded machine.
    holder = start_run(params(data, tmp / "model-0", epochs=LONG_EPOCHS), env, tmp / "run-0.log")
    runs = [holder]
    try:
        deadline = time.monotonic() + 240
        while (lease := train_lease(tmp / "home")) is None:
            assert holder.popen.poll() is None, holder.log_tail()
            assert time.monotonic() < deadline, "the first run never held the Train lock"
            time.sleep(0.05)
        assert holder_pid(lease) == holder.pid
        waiter = start_run(params(data, tmp / "model-1", epochs=LONG_EPOCHS), env, tmp / "run-1.log")
        runs.append(waiter)
        while not waited_for_a_lock(waiter, "train-"):
            assert all(run.popen.poll() is None for run in runs), [run.log_tail() for run in runs]
            assert time.monotonic() < deadline, "the second run did not wait on the first's Train lock"
            time.sleep(0.05)
        assert holder_pid(train_lease(tmp / "home")) == holder.pid

        os.killpg(holder.pid, signal.SIGKILL)  # mid-training: no cleanup, the lock file stays
        holder.popen.wait(timeout=30)

        # The waiter sees the holder's process is gone and takes the lease over, long
        # before the dead holder's day-long lease could have run out.
        deadline = time.monotonic() + 240
        while (current := train_lease(tmp / "home")) is None or holder_pid(current) != waiter.pid:
            assert waiter.popen.poll() is None, waiter.log_tail()
            assert time.monotonic() < deadline, "the waiter did not take over the dead holder's lease"
            time.sleep(0.05)

        result = outcome(waiter, timeout=240)
    finally:
        for run in runs:
            run.stop()
    # The survivor trained itself (nothing was cached by the killed run) and finished.
    assert result["cards"]["train"] == "Completed" and result["cards"]["evaluate"] == "Completed"
    assert "no longer runs on this host" in waiter.log_path.read_text(errors="replace")
    assert not list((tmp / "home" / "prefect-torch" / "locks").glob("train-*.lock"))  # released
