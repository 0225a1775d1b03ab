"""What the Evaluate card leaves behind: a metrics table and a short summary."""

from __future__ import annotations

import logging

from prefect_torch.engine.handles import ModelHandle
from prefect_torch.engine.models import count_parameters
from prefect_torch.engine.split import Splits
from prefect_torch.reporting.publish import Publisher, artifact_key, artifact_scope, current_run_name, never_fails
from prefect_torch.reporting.summary import RunSummary
from prefect_torch.reporting.tables import metrics_rows


def publish_evaluation(
    model: ModelHandle,
    splits: Splits,
    split: str,
    metrics: dict[str, float],
    seconds: float,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> RunSummary | None:
    """Publish ``evaluate-<split>-metrics`` (table) and ``evaluate-<split>-summary`` (markdown).

    Returns the summary, or None when it could not be built (a warning says why).
    """
    with never_fails("evaluation report", logger):
        return _publish(model, splits, split, metrics, seconds, logger)
    return None


def _publish(
    model: ModelHandle,
    splits: Splits,
    split: str,
    metrics: dict[str, float],
    seconds: float,
    logger: logging.Logger | logging.LoggerAdapter | None,
) -> RunSummary:
    publisher = Publisher(logger)
    title = current_run_name(f"evaluate[{split}]")
    module = model.module
    rows = len(splits[split])
    device = next(module.parameters()).device if any(True for _ in module.parameters()) else "cpu"
    summary = RunSummary(
        title=f"Evaluation — {title}",
        status="completed",
        outcome=f"{rows:,} rows of the {split} split" if rows else f"the {split} split is empty: no metrics",
        problem=splits.info.problem,
        data_key=splits.info.data_key,
        rows=dict(splits.info.rows) or None,
        model=model.spec.short_name(),
        model_spec=model.spec.model_dump(mode="json"),
        parameters=count_parameters(module),
        device=str(device),
        seconds=seconds,
        metrics_title=f"Metrics on the {split} split",
        metrics=dict(metrics),
    )
    scope = artifact_scope(model.spec.short_name())
    if metrics:
        publisher.table(
            artifact_key(scope, "evaluate", split, "metrics"), metrics_rows(metrics),
            f"Metrics of {model.spec.short_name()} on the {split} split ({rows:,} rows).",
        )
    publisher.markdown(artifact_key(scope, "evaluate", split, "summary"), summary.to_markdown(), f"Summary of {title}.")
    return summary
