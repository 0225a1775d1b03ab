"""Run several train_flow runs at once, one per thread, in this process.

    python -m tests.hardening.run_many_flows '[{...flow parameters...}, ...]'

Prints, as the last line, a JSON list of {"id": flow run id, "state": state name}.
A fresh process per batch: the test starts several, against one Prefect API.
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

from prefect.events.worker import EventsWorker

from prefect_torch.flows import train_flow


def run(request: dict) -> dict:
    state = train_flow(**request, return_state=True)
    return {"id": str(state.state_details.flow_run_id), "state": state.name}


def main() -> None:
    requests = json.loads(sys.argv[1])
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        runs = list(pool.map(run, requests))
    # Task-run states reach the API as events: send every one before the process ends.
    EventsWorker.drain_all(timeout=60, at_exit=False)
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
