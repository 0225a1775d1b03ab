"""Runs train_flow against the Prefect server in PREFECT_API_URL (once failing on bad
data, once well, and twice on a small dataset, the second time from the cache), the
step-wise flow once, and registers a deployment of train_flow (for its parameter
form); prints what the browser test needs as JSON.

Run as a subprocess by test_browser_ui.py: the flow must talk to the real server
the browser looks at, not to an in-process test harness.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect_torch.flows import stepwise_train_flow, train_flow
from tests.datasets import noisy_linear

EPOCHS = 6
STEPWISE_EPOCHS = 2


def failing_run(folder: Path) -> str:
    """A run that fails like real bad data does: targets near 1e30, not standardised, overflow
    the float32 loss to inf in the first batch."""
    data = folder / "overflow.csv"
    frame = noisy_linear(200, features=2)
    frame["y"] = frame["y"] * 1e30
    frame.to_csv(data, index=False)
    state = train_flow(
        dataset={"uri": str(data), "target": "y", "standardize": False},
        training={"epochs": 3, "device": "cpu"},
        return_state=True,
    )
    if not state.is_failed():
        raise SystemExit(f"the overflow run should have failed; it ended {state.type}")
    return str(state.state_details.flow_run_id)


def cached_rerun(folder: Path) -> str:
    """Trains on a small dataset twice: the second run reads the trained model from the
    cache. Returns that second run's id. Its own dataset, so its artifact keys are its own."""
    data = folder / "small.csv"
    noisy_linear(200, features=2, seed=3).to_csv(data, index=False)
    states = [
        train_flow(dataset={"uri": str(data), "target": "y"}, model={"hidden": [8]},
                   training={"epochs": 2, "device": "cpu"}, return_state=True)
        for _ in range(2)
    ]
    if not all(state.is_completed() for state in states):
        raise SystemExit(f"the small runs did not complete: {[state.message for state in states]}")
    return str(states[1].state_details.flow_run_id)


def stepwise_run(data: Path) -> str:
    """The step-wise flow, two epochs of 7 batches: the run a user inspects batch by batch."""
    state = stepwise_train_flow(
        dataset={"uri": str(data), "target": "y"},
        model={"hidden": [32, 32]},
        optimizer={"lr": 3e-3},
        training={"epochs": STEPWISE_EPOCHS, "batch_size": 64, "device": "cpu"},
        return_state=True,
    )
    if not state.is_completed():
        raise SystemExit(f"stepwise_train_flow did not complete: {state.message}")
    return str(state.state_details.flow_run_id)


def main(folder: Path) -> None:
    # The failing run goes first, so the latest version of every artifact key is the good run's.
    failed_flow_run_id = failing_run(folder)
    cached_flow_run_id = cached_rerun(folder)
    data = folder / "housing.csv"
    noisy_linear(600, features=4).to_csv(data, index=False)
    state = train_flow(
        dataset={"uri": str(data), "target": "y"},
        model={"hidden": [32, 32]},
        optimizer={"lr": 3e-3},
        training={"epochs": EPOCHS, "batch_size": 32, "device": "cpu", "progress_every": 5},
        output=str(folder / "model"),
        return_state=True,
    )
    if not state.is_completed():
        raise SystemExit(f"train_flow did not complete: {state.message}")
    result = state.result()
    stepwise_flow_run_id = stepwise_run(data)
    deployment_id = train_flow.to_deployment(name="browser-form").apply()
    print("RESULT " + json.dumps({
        "flow_run_id": str(state.state_details.flow_run_id),
        "failed_flow_run_id": failed_flow_run_id,
        "cached_flow_run_id": cached_flow_run_id,
        "stepwise_flow_run_id": stepwise_flow_run_id,
        "stepwise_epochs": STEPWISE_EPOCHS,
        "deployment_id": str(deployment_id),
        "model_uri": result.model_uri,
        "data": str(data),
        "epochs": EPOCHS,
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
