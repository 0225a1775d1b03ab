"""Running a deployment from inside a flow and waiting for it, failing fast.

``run_deployment`` alone waits as long as it is told, even when no worker will
ever pick the run up. ``check_deployment_available`` asks the server first
(does the deployment exist, its work pool, a worker that is online?), and
``run_and_wait`` gives a run a deadline to *start* as well as one to finish:
a run no worker started in time is cancelled, so it cannot start hours later
behind the caller's back.

This module imports Prefect but not torch.
"""

from __future__ import annotations

import time
from typing import Any

from prefect_torch.errors import DeviceError, TrainingError

_WAITING = {"SCHEDULED", "PENDING", "PAUSED"}
_FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def check_deployment_available(name: str) -> str | None:
    """Why runs of deployment ``name`` cannot start now, or ``None`` if they can.

    Checks that the deployment exists, that its work pool exists and is not
    paused, and that at least one worker of the pool is online.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkerStatus
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            return (
                f"There is no deployment {name!r} on the Prefect server at {client.api_url}. "
                "Create the work pools and deployments with `prefect-torch pools create` "
                "and `prefect deploy --all` (from the project folder)."
            )
        pool = deployment.work_pool_name
        if not pool:
            return f"Deployment {name!r} has no work pool, so no worker will run it. Redeploy it to a pool."
        try:
            work_pool = client.read_work_pool(pool)
        except ObjectNotFound:
            return (
                f"Work pool {pool!r} of deployment {name!r} does not exist. "
                "Create it with `prefect-torch pools create`."
            )
        if work_pool.is_paused:
            return f"Work pool {pool!r} is paused. Resume it with `prefect work-pool resume {pool}`."
        workers = client.read_workers_for_work_pool(pool)
        if not any(worker.status == WorkerStatus.ONLINE for worker in workers):
            return (
                f"No worker is online for work pool {pool!r} (deployment {name!r}). Start one "
                f"on a machine that fits the pool: `prefect worker start --pool {pool}`."
            )
    return None


def run_and_wait(
    name: str,
    parameters: dict[str, Any],
    *,
    start_timeout_s: float,
    timeout_s: float,
    poll_s: float = 1.0,
    flow_run_name: str | None = None,
) -> Any:
    """Start a run of deployment ``name`` (as a subflow of the current flow run)
    and wait for it to finish; returns the completed flow run.

    Raises ``DeviceError`` if no worker started it within ``start_timeout_s``
    and ``TrainingError`` if it did not complete (failed, crashed, cancelled, or
    still running after ``timeout_s``). A run given up on is cancelled.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    submitted = run_deployment(
        name, parameters=parameters, timeout=0, as_subflow=True, flow_run_name=flow_run_name
    )
    started = time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(submitted.id)
            state = run.state.type.value if run.state else "SCHEDULED"
            waited = time.monotonic() - started
            if state in _FINAL:
                break
            if state in _WAITING and waited > start_timeout_s:
                _cancel(client, run.id, f"no worker started it within {start_timeout_s:.0f} s")
                raise DeviceError(
                    f"No worker of work pool {run.work_pool_name!r} started the run {run.name!r} of "
                    f"{name!r} within {start_timeout_s:.0f} s, so it was cancelled. Check that a worker "
                    f"is running: `prefect worker start --pool {run.work_pool_name}`."
                )
            if waited > timeout_s:
                _cancel(client, run.id, f"it did not finish within {timeout_s:.0f} s")
                raise TrainingError(
                    f"The run {run.name!r} of {name!r} did not finish within {timeout_s:.0f} s and was "
                    "cancelled. Raise the timeout or train less."
                )
            time.sleep(poll_s)
    if state != "COMPLETED":
        message = (run.state.message or "").strip() if run.state else ""
        raise TrainingError(
            f"The run {run.name!r} of {name!r} on work pool {run.work_pool_name!r} ended "
            f"{state}: {message or 'no message'}. See its logs in the Prefect UI."
        )
    return run


def _cancel(client: Any, flow_run_id: Any, why: str) -> None:
    from prefect.states import Cancelled

    client.set_flow_run_state(flow_run_id, Cancelled(message=f"Cancelled by its caller: {why}."), force=True)


__all__ = ["check_deployment_available", "run_and_wait"]
