"""Run train_flow in this process and print, as JSON, each card's final state.

Used by the caching tests as a *fresh process*: argv[1] is a JSON object with
the flow parameters and, optionally, ``storage`` (TorchStorage fields) to save
as this Prefect home's default storage block.
"""

import json
import os
import sys
import time

from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter

from prefect_torch.blocks import TorchStorage
from prefect_torch.flows import train_flow


COARSE_CARDS = ("data_load", "data_split", "model_define", "train", "evaluate")


def card_states(flow_run_id, timeout: float = 120.0) -> dict[str, str]:
    """Final state name of each card of the flow run. Task run states reach the API
    as events, a moment after the run: wait until every coarse card's is final."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
            # Run names read "train[mlp-16 adam lr=0.01]" or "data_split-3f2": the card is the prefix.
            states = {_card(run.name): run.state.name for run in runs if run.state and run.state.is_final()}
            if all(card in states for card in COARSE_CARDS) or time.monotonic() > deadline:
                return states
            time.sleep(0.25)


def _card(run_name: str) -> str:
    return run_name.split("[")[0] if "[" in run_name else run_name.rsplit("-", 1)[0]


def main() -> None:
    request = json.loads(sys.argv[1])
    storage = request.pop("storage", None)
    if storage:
        TorchStorage(**storage).save("shared", overwrite=True)
        os.environ["PREFECT_TORCH_STORAGE_BLOCK"] = "shared"
    state = train_flow(**request, return_state=True)
    result = state.result()
    print(json.dumps({"cards": card_states(state.state_details.flow_run_id),
                      "metrics": result.metrics, "model_uri": result.model_uri}))


if __name__ == "__main__":
    main()
