"""The model card: the one artifact that says what a training flow produced.

Published by the flow once the model is saved, so it can say where the model is
stored next to what it was trained on, how, and how well it does on the test split.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec
from prefect_torch.reporting.plot import loss_curves_markdown, loss_scale_note
from prefect_torch.reporting.publish import Publisher, artifact_key, artifact_scope, never_fails
from prefect_torch.reporting.summary import RunSummary
from prefect_torch.reporting.text import display_uri, md_code

MODEL_CARD_KEY = "model-card"


def model_card(
    *,
    title: str,
    dataset_uri: str,
    data_key: str,
    rows: dict[str, int] | None,
    problem: str,
    loss: str,
    model_spec: ModelSpec,
    parameters: int,
    optimizer: OptimizerSpec,
    device: str,
    history: list[dict[str, Any]],
    epochs: int,
    steps: int,
    stop_reason: str | None,
    metrics: dict[str, float],
    model_uri: str,
    seconds: float,
    train_seconds: float | None = None,
    cached: bool = False,
    target_std: float | None = None,
    extra_markdown: str | None = None,
) -> str:
    """Markdown: the summary, test metrics and the loss curves (then ``extra_markdown``).

    ``seconds`` is this run's wall time, ``train_seconds`` the training loop's; ``cached``
    says the model was read from the cache, so the card does not pass a rerun's seconds off
    as the training time."""
    summary = RunSummary(
        title=f"Model card — {title}",
        status="completed",
        outcome=stop_reason,
        problem=problem,
        loss=loss,
        dataset=dataset_uri,
        data_key=data_key,
        rows=rows,
        model=model_spec.short_name(),
        model_spec=model_spec.model_dump(mode="json"),
        parameters=parameters,
        optimizer=optimizer.short_name(),
        device=device,
        epochs=f"{len(history)} of {epochs}",
        steps=steps,
        seconds=seconds,
        train_seconds=train_seconds,
        cached=cached,
        model_location=model_uri,
        metrics_title="Metrics on the test split",
        metrics=dict(metrics),
        notes=[f"Load it with {md_code(f'prefect_torch.load_model({display_uri(model_uri, 400)!r})')}."],
    )
    markdown = summary.to_markdown()
    if history:
        markdown += "\n" + loss_curves_markdown(history, loss, scale_note=loss_scale_note(problem, target_std)) + "\n"
    if extra_markdown:
        markdown += "\n" + extra_markdown.rstrip() + "\n"
    return markdown


def publish_model_card(logger: logging.Logger | logging.LoggerAdapter | None = None, **facts: Any) -> str | None:
    """Publish the model card (key ``<flow>-<dataset>-<model>-model-card``); returns its markdown (None if it could
    not be built: a warning says why, and the flow goes on)."""
    with never_fails("model card", logger):
        markdown = model_card(**facts)
        key = artifact_key(artifact_scope(facts["model_spec"].short_name()), MODEL_CARD_KEY)
        Publisher(logger).markdown(
            key, markdown, f"The model trained by {facts['title']}: where it is stored and how well it does."
        )
        return markdown
    return None
