"""Creating Prefect artifacts without ever breaking the work they describe.

A report is a side concern: if the API hiccups while a ten-hour training run
publishes its progress, the run goes on and a warning says what was lost.
Outside a flow or task run there is nothing to attach artifacts to, so nothing
is published (Prefect deprecates run-less artifacts).
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Iterator
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext

from prefect_torch.errors import ConfigError
from prefect_torch.reporting.text import scrub_secrets

_KEY = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")

_fallback_logger = logging.getLogger("prefect_torch.reporting")


def in_run() -> bool:
    """Whether a flow or task run is active to attach artifacts to."""
    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


@contextlib.contextmanager
def never_fails(what: str, logger: logging.Logger | logging.LoggerAdapter | None = None) -> Iterator[None]:
    """Run a reporting step; if it raises, log a warning instead of failing the run it reports on."""
    try:
        yield
    except Exception as exc:
        (logger or _fallback_logger).warning(
            "Could not build the %s (%s: %s); the run's own result is unaffected. "
            "Please report this as a prefect-torch bug.", what, type(exc).__name__, exc,
        )


def current_run_name(default: str) -> str:
    """The current task run's name (e.g. ``train[mlp-64x64 adam lr=0.001]``), else the flow
    run's, else ``default``."""
    task_context = TaskRunContext.get()
    if task_context is not None:
        return task_context.task_run.name
    flow_context = FlowRunContext.get()
    if flow_context is not None and flow_context.flow_run is not None:
        return flow_context.flow_run.name
    return default


def artifact_key(*parts: str) -> str:
    """An artifact key from parts: lowercase letters, digits and dashes, as Prefect requires."""
    key = "-".join(re.sub(r"[^a-z0-9]+", "-", part.lower()).strip("-") for part in parts if part)
    if not _KEY.match(key):
        raise ConfigError(
            f"Cannot build an artifact key from {parts!r}; use lowercase letters, digits and dashes."
        )
    return key


# A scope's dataset part is at most this long: keys stay readable in the Artifacts list.
MAX_SCOPE_PART = 32


def artifact_scope(model: str | None = None, flow: str | None = None, dataset_uri: str | None = None) -> str:
    """What an artifact key starts with so the Artifacts page groups one model trained on one
    dataset by one flow: ``train-housing-csv-mlp-32x32``. Flow and dataset default to the
    current flow run's name and its ``dataset``/``data`` parameter; parts that are unknown
    are left out (outside a flow run the key is the bare kind, e.g. ``model-card``)."""
    context = FlowRunContext.get()
    if flow is None and context is not None and context.flow is not None:
        flow = context.flow.name
    if dataset_uri is None and context is not None:
        dataset_uri = _dataset_parameter(context.parameters or {})
    dataset = None
    if dataset_uri:
        dataset = scrub_secrets(str(dataset_uri)).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        dataset = re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-")[:MAX_SCOPE_PART].strip("-")
    return "-".join(
        re.sub(r"[^a-z0-9]+", "-", part.lower()).strip("-") for part in (flow, dataset, model) if part
    )


def _dataset_parameter(parameters: dict[str, Any]) -> str | None:
    for name in ("dataset", "data"):
        value = parameters.get(name)
        uri = value.get("uri") if isinstance(value, dict) else getattr(value, "uri", None)
        if isinstance(uri, str) and uri:
            return uri
    return None


class Publisher:
    """Creates artifacts in the current run; failures become one warning each."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter | None = None):
        self.logger = logger or _fallback_logger
        self.enabled = in_run()

    def markdown(self, key: str, markdown: str, description: str | None = None) -> UUID | None:
        return self._call("markdown", key, create_markdown_artifact, markdown=markdown, key=key, description=description)

    def table(self, key: str, rows: list[dict[str, Any]], description: str | None = None) -> UUID | None:
        return self._call("table", key, create_table_artifact, table=rows, key=key, description=description)

    def progress(self, key: str, percent: float, description: str | None = None) -> UUID | None:
        return self._call(
            "progress", key, create_progress_artifact, progress=_clamp(percent), key=key, description=description
        )

    def update_progress(self, artifact_id: UUID | None, percent: float, description: str | None = None) -> None:
        if artifact_id is None:
            return
        self._call(
            "progress", str(artifact_id), update_progress_artifact,
            artifact_id=artifact_id, progress=_clamp(percent), description=description,
        )

    def _call(self, kind: str, label: str, create, **kwargs: Any):
        if not self.enabled:
            return None
        try:
            return create(**kwargs)
        except Exception as exc:  # the report must never end the run it reports on
            self.logger.warning(
                "Could not publish the %s artifact %r (%s: %s); the run continues without it. "
                "Check that the Prefect API is reachable.",
                kind, label, type(exc).__name__, exc,
            )
            return None


def _clamp(percent: float) -> float:
    # Prefect warns (twice) for values outside 0..100; never send one.
    return min(100.0, max(0.0, float(percent)))
