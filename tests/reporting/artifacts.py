"""Reading back what a run published, through the real Prefect API."""

from __future__ import annotations

import json
import time
from typing import Any
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.sorting import ArtifactSort


def run_artifacts(flow_run_id: UUID, scope: str | None = None) -> dict[str, Any]:
    """The flow run's keyed artifacts by key (the latest of each key). Unkeyed ones are
    Prefect's own "result" artifacts describing where persisted card results went.

    With ``scope`` (the ``<flow>-<dataset>-<model>`` every key starts with), by kind:
    ``train-history`` for ``train-prices-csv-mlp-16-train-history``; a key without the
    scope fails the test."""
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])),
            sort=ArtifactSort.CREATED_DESC,
        )
    latest: dict[str, Any] = {}
    for artifact in artifacts:
        if artifact.key is not None:
            latest.setdefault(artifact.key, artifact)
    if scope is None:
        return latest
    unscoped = [key for key in latest if not key.startswith(scope + "-")]
    assert not unscoped, f"artifact keys not scoped by {scope!r}: {unscoped}"
    return {key.removeprefix(scope + "-"): artifact for key, artifact in latest.items()}


def table_data(artifact) -> list[dict[str, Any]]:
    return json.loads(artifact.data)


def task_run_names(flow_run_id: UUID) -> list[str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(run.name for run in runs)


def asset_events(flow_run_id: UUID, expected: int = 2, timeout_s: float = 60.0) -> list:
    """The asset events of a flow run; the server persists events in batches, so poll."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    event_filter = EventFilter(
        event=EventNameFilter(prefix=["prefect.asset."]),
        related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
    )
    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            events = client.read_events(filter=event_filter, limit=50).events
        if len(events) >= expected or time.monotonic() > deadline:
            return events
        time.sleep(1.0)
