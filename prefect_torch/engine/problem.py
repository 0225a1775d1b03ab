"""What kind of learning problem a target column poses, and what follows from it.

The seeds' table (binary: 1 output + BCE-with-logits; multiclass: N outputs +
cross-entropy; regression: 1 output + MSE) is encoded here once.
"""

from __future__ import annotations

from typing import Literal

import pandas as pd

from prefect_torch.errors import ConfigError

ProblemType = Literal["regression", "binary", "multiclass"]
ProblemChoice = Literal["auto", "regression", "binary", "multiclass"]
LossName = Literal["auto", "mse", "mae", "huber", "bce", "cross_entropy"]

PROBLEM_TYPES: tuple[str, ...] = ("regression", "binary", "multiclass")

# An integer target with at most this many distinct values is read as class labels.
MAX_AUTO_CLASSES = 20

DEFAULT_LOSS: dict[str, str] = {
    "regression": "mse",
    "binary": "bce",
    "multiclass": "cross_entropy",
}

COMPATIBLE_LOSSES: dict[str, tuple[str, ...]] = {
    "regression": ("mse", "mae", "huber"),
    "binary": ("bce",),
    "multiclass": ("cross_entropy",),
}


def infer_problem(target: pd.Series) -> ProblemType:
    """Guess regression / binary / multiclass from a target column's values."""
    values = target.dropna()
    n_unique = values.nunique()
    if pd.api.types.is_bool_dtype(values) or n_unique == 2:
        return "binary"
    if not pd.api.types.is_numeric_dtype(values):
        return "multiclass"
    if pd.api.types.is_integer_dtype(values) or (values == values.round()).all():
        if 2 < n_unique <= MAX_AUTO_CLASSES:
            return "multiclass"
    return "regression"


def resolve_problem(choice: str, target: pd.Series) -> ProblemType:
    if choice == "auto":
        return infer_problem(target)
    if choice not in PROBLEM_TYPES:
        raise ConfigError(
            f"Unknown problem type {choice!r}. Use one of: auto, {', '.join(PROBLEM_TYPES)}."
        )
    return choice  # type: ignore[return-value]


def resolve_loss(choice: str, problem: str) -> str:
    """The loss to use for ``problem``; rejects a loss that cannot train it."""
    if choice == "auto":
        return DEFAULT_LOSS[problem]
    known = sorted({name for names in COMPATIBLE_LOSSES.values() for name in names})
    if choice not in known:
        raise ConfigError(f"Unknown loss {choice!r}. Use one of: auto, {', '.join(known)}.")
    if choice not in COMPATIBLE_LOSSES[problem]:
        fits = ", ".join(COMPATIBLE_LOSSES[problem])
        raise ConfigError(
            f"Loss {choice!r} cannot train a {problem} problem. Use {fits} "
            f"(or loss='auto'), or set the problem type that matches your target."
        )
    return choice


def output_size(problem: str, n_classes: int) -> int:
    return n_classes if problem == "multiclass" else 1
