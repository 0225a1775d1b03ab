"""The server and worker fixtures run real flow runs, and clean up after."""

from __future__ import annotations

import re
import secrets
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.prefect_server import (
    PrefectServer,
    _alive,
    _descendants,
    prefect_server,
    prefect_worker,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]

FLOW_SOURCE = textwrap.dedent(
    """
    import time

    from prefect import flow, get_run_logger


    @flow
    def tiny(x: int = 1, sleep: float = 0.0) -> int:
        time.sleep(sleep)
        get_run_logger().info("tiny got %s", x)
        return x * 2
    """
)

DEPLOY = textwrap.dedent(
    """
    import sys

    from prefect import flow

    source, pool = sys.argv[1], sys.argv[2]
    deployment_id = flow.from_source(source=source, entrypoint="tiny_flow.py:tiny").deploy(
        name="tiny-deploy", work_pool_name=pool, print_next_steps=False
    )
    print(deployment_id)
    """
)

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def deploy_tiny_flow(server: PrefectServer, tmp_path: Path, pool: str) -> str:
    """Deploy ``tiny`` from a flow file in ``tmp_path``; return the deployment id."""
    source = tmp_path / "flows"
    source.mkdir()
    (source / "tiny_flow.py").write_text(FLOW_SOURCE)
    output = server.python(DEPLOY, str(source), pool).stdout
    return UUID.findall(output)[-1]


def wait_for_log(server: PrefectServer, flow_run_id: str, text: str) -> list[str]:
    """The flow run's log messages once one contains ``text`` (they arrive late:
    the run's process ships its logs after it reports its final state)."""
    deadline = time.monotonic() + 30
    while True:
        logs = server.request(
            "POST",
            "/logs/filter",
            json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200},
        )
        messages = [entry["message"] for entry in logs]
        if any(text in message for message in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(0.5)


def test_worker_runs_a_deployment_from_the_cli(prefect_server: PrefectServer, tmp_path):
    pool = f"pool-{secrets.token_hex(3)}"
    with prefect_worker(prefect_server, pool):
        deploy_tiny_flow(prefect_server, tmp_path, pool)
        output = prefect_server.prefect(
            "deployment", "run", "tiny/tiny-deploy", "--param", "x=21"
        ).stdout
        flow_run_id = UUID.findall(output)[-1]

        run = prefect_server.wait_for_flow_runs([flow_run_id], timeout=180)[flow_run_id]
        # Inside the block: stopping the worker stops the run's process too.
        messages = wait_for_log(prefect_server, flow_run_id, "tiny got")

    assert run["state_type"] == "COMPLETED", run["state"]
    assert run["parameters"]["x"] == 21
    assert "tiny got 21" in messages


def test_everything_started_is_stopped_when_the_test_fails(tmp_path):
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="test failed"):
        with prefect_server(tmp_path / "server") as server:
            with prefect_worker(server, "cleanup-pool") as worker:
                pids = [server.process.pid, worker.process.pid]
                pids += _descendants(server.process.pid)
                pids += _descendants(worker.process.pid)
                assert all(_alive(pid) for pid in pids)
                raise RuntimeError("test failed")

    assert len(pids) >= 2
    assert [pid for pid in pids if _alive(pid)] == []
