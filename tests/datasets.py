"""Generated datasets with a known answer, shared by the tests."""

from __future__ import annotations

import numpy as np
import pandas as pd


def noisy_linear(rows: int = 1500, features: int = 6, noise: float = 0.3, seed: int = 0) -> pd.DataFrame:
    """y = X·w + noise: a model that learns must reach R² near 1 - noise²/var(y)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, features))
    weights = np.linspace(1.0, 3.0, features)
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(features)])
    frame["y"] = X @ weights + rng.normal(scale=noise, size=rows)
    return frame


def separable_classes(rows: int = 1200, classes: int = 3, seed: int = 0, labels=None) -> pd.DataFrame:
    """Well-separated Gaussian blobs, one per class."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=6.0, size=(classes, 4))
    which = rng.integers(0, classes, rows)
    X = centers[which] + rng.normal(size=(rows, 4))
    frame = pd.DataFrame(X, columns=["a", "b", "c", "d"])
    names = labels or [f"class_{i}" for i in range(classes)]
    frame["label"] = [names[i] for i in which]
    return frame


def signal_splits(problem: str, rows: int, features: int, seed: int = 0):
    """Split tensors of a table whose target follows x0·2 - x1 + 0.5·x2: noisy for
    regression, "yes"/"no" for binary, three classes (0, 1, 2) for multiclass."""
    from prefect_torch.engine.split import SplitSpec, split_table

    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(rows, features)), columns=[f"x{i}" for i in range(features)])
    signal = frame.x0 * 2 - frame.x1 + 0.5 * frame.x2
    if problem == "regression":
        frame["target"] = signal + rng.normal(scale=0.1, size=rows)
    elif problem == "binary":
        frame["target"] = np.where(signal > 0, "yes", "no")
    else:
        frame["target"] = np.digitize(signal, [-1.0, 1.0])
    return split_table(frame, SplitSpec(target="target", problem=problem))
