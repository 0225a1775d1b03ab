"""Metrics by problem type, computed from model outputs and encoded targets.

Regression metrics are in the target's original units; classification metrics
use class indices. Everything stays a tensor until the final float conversion.
"""

from __future__ import annotations

import torch
from torch import nn

from prefect_torch.engine.split import DatasetInfo, TensorSplit

REGRESSION_METRICS = ("mse", "mae", "rmse", "r2")
CLASSIFICATION_METRICS = ("accuracy", "f1_macro", "log_loss")
PRIMARY_METRIC = {"regression": "r2", "binary": "accuracy", "multiclass": "accuracy"}
_EPS = 1e-7


@torch.no_grad()
def predict_outputs(model: nn.Module, features: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """Raw model outputs in eval mode, in chunks to bound memory."""
    was_training = model.training
    model.eval()
    try:
        chunks = [model(features[i:i + batch_size]).float() for i in range(0, len(features), batch_size)]
    finally:
        model.train(was_training)
    if not chunks:
        return torch.empty(0)
    return torch.cat(chunks)


def compute_metrics(outputs: torch.Tensor, target: torch.Tensor, info: DatasetInfo) -> dict[str, float]:
    if info.problem == "regression":
        return regression_metrics(info.decode_regression(outputs), info.decode_regression(target))
    if info.problem == "binary":
        prob = torch.sigmoid(outputs.reshape(-1).double())
        return binary_metrics(prob, target.reshape(-1).long())
    return multiclass_metrics(torch.softmax(outputs.double(), dim=1), target.long(), info.n_outputs)


def evaluate_split(model: nn.Module, split: TensorSplit, info: DatasetInfo) -> dict[str, float]:
    if len(split) == 0:
        return {}
    return compute_metrics(predict_outputs(model, split.X), split.y, info)


def regression_metrics(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    err = pred - true
    mse = (err ** 2).mean()
    total = ((true - true.mean()) ** 2).sum()
    r2 = 1.0 - (err ** 2).sum() / total if total > 0 else torch.tensor(0.0)
    return {"mse": float(mse), "mae": float(err.abs().mean()), "rmse": float(mse.sqrt()), "r2": float(r2)}


def binary_metrics(prob: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    pred = (prob >= 0.5).long()
    clipped = prob.clamp(_EPS, 1 - _EPS)
    log_loss = -(true * clipped.log() + (1 - true) * (1 - clipped).log()).mean()
    return {
        "accuracy": float((pred == true).double().mean()),
        "f1_macro": _f1_macro(pred, true, 2),
        "log_loss": float(log_loss),
        "roc_auc": _roc_auc(prob, true),
    }


def multiclass_metrics(prob: torch.Tensor, true: torch.Tensor, n_classes: int) -> dict[str, float]:
    pred = prob.argmax(dim=1)
    picked = prob.gather(1, true.reshape(-1, 1)).clamp(_EPS, 1.0)
    return {
        "accuracy": float((pred == true).double().mean()),
        "f1_macro": _f1_macro(pred, true, n_classes),
        "log_loss": float(-picked.log().mean()),
    }


def _f1_macro(pred: torch.Tensor, true: torch.Tensor, n_classes: int) -> float:
    scores = []
    for cls in range(n_classes):
        tp = ((pred == cls) & (true == cls)).sum().double()
        fp = ((pred == cls) & (true != cls)).sum().double()
        fn = ((pred != cls) & (true == cls)).sum().double()
        if tp + fp + fn == 0:
            continue  # class absent from both: it neither helps nor hurts
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(torch.stack(scores).mean()) if scores else 0.0


def _roc_auc(score: torch.Tensor, true: torch.Tensor) -> float:
    """Mann–Whitney U statistic with average ranks for ties."""
    positives = int(true.sum())
    negatives = len(true) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = torch.argsort(score)
    sorted_scores = score[order]
    ranks = torch.empty_like(score)
    # Average rank over each run of tied scores.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    rank_sum = ranks[true == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))
