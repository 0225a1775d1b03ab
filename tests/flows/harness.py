"""One temporary Prefect server per test process, shared by the step-wise tests.

Starting ``prefect_test_harness`` costs tens of seconds on a busy machine, so the
flow tests (a session fixture in ``tests/flows/conftest.py``) and the step-card
tests (``tests/tasks/test_step_cards.py``) share one: each fixture acquires it,
and the last one to release it shuts it down. PREFECT_HOME points at a temporary
folder too, so default model and checkpoint folders never touch the user's home.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

_stack: contextlib.ExitStack | None = None
_users = 0


def acquire() -> str:
    """Start the shared server if needed; returns its API URL."""
    global _stack, _users
    if _stack is None:
        from prefect.settings import PREFECT_HOME, temporary_settings
        from prefect.testing.utilities import prefect_test_harness

        stack = contextlib.ExitStack()
        home = stack.enter_context(tempfile.TemporaryDirectory(prefix="prefect-torch-home-"))
        stack.enter_context(temporary_settings(updates={PREFECT_HOME: home}))
        from prefect.settings import PREFECT_API_URL

        # Reuse the session's server (tests/conftest.py's prefect_harness) when one is up:
        # a second, nested harness leaves Prefect's events client pointed at a dead server.
        if not PREFECT_API_URL.value():
            # The default 30 s start-up limit is too tight on a loaded 2-core machine.
            stack.enter_context(prefect_test_harness(server_startup_timeout=180))
        _stack = stack
    _users += 1
    return api_url()


def release() -> None:
    global _stack, _users
    _users -= 1
    if _users == 0 and _stack is not None:
        stack, _stack = _stack, None
        stack.close()


def api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def home() -> str:
    from prefect.settings import PREFECT_HOME

    return str(PREFECT_HOME.value())


def task_runs(flow_run_id, at_least: int, timeout: float = 180.0) -> list:
    """The flow run's task runs as the API records them, with those of the flow runs
    nested in it (the step-wise flow runs each epoch as one); the placeholder task runs
    Prefect makes for the nested flow runs themselves are left out.

    Task runs reach the server as events and are written by a background
    service, so wait until at least ``at_least`` of them (in a final state) are in.
    """
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            flow_runs, placeholders, todo = [flow_run_id], set(), [flow_run_id]
            while todo:
                children = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=todo)),
                    limit=200,
                )
                placeholders |= {child.parent_task_run_id for child in children}
                todo = [child.id for child in children]
                flow_runs += todo
            runs, offset = [], 0
            while True:
                page = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_runs)),
                    limit=200, offset=offset,
                )
                runs += page
                offset += len(page)
                if len(page) < 200:
                    break
            done = [run for run in runs
                    if run.state is not None and run.state.is_final() and run.id not in placeholders]
            if len(done) >= at_least or time.monotonic() > deadline:
                return done
            time.sleep(0.5)
