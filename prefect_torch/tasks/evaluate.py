"""The Evaluate card."""

from __future__ import annotations

import time

from prefect import task

from prefect_torch.engine.handles import ModelHandle
from prefect_torch.engine.metrics import evaluate_split
from prefect_torch.engine.split import Splits
from prefect_torch.reporting import publish_evaluation
from prefect_torch.tasks._common import coarse_card


@task(name="evaluate", task_run_name="evaluate[{split}]", **coarse_card("1"))
def evaluate(model: ModelHandle, splits: Splits, split: str = "test") -> dict[str, float]:
    """Evaluate: metrics on one split — regression mse/mae/rmse/r2; classification
    accuracy/f1_macro/log_loss (+ roc_auc for binary)."""
    started = time.perf_counter()
    data = splits[split]
    module = model.model
    device = next(module.parameters()).device
    metrics = evaluate_split(module, data.to(device), splits.info)
    publish_evaluation(model, splits, split, metrics, time.perf_counter() - started)
    return metrics
