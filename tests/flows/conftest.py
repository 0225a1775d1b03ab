"""Fixtures of the flow tests: one shared temporary Prefect server and small datasets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.flows import harness


@pytest.fixture(scope="module", autouse=True)
def stepwise_prefect_server(prefect_harness):
    """A temporary Prefect server (and Prefect home) for the flow tests of a module.

    Module-scoped so its settings context closes before tests elsewhere run: a
    session-long second harness interleaved with tests/conftest.py's would leave
    Prefect's events client pointed at a server that has gone."""
    url = harness.acquire()
    yield url
    harness.release()


def _regression(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, 5))
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(5)])
    frame["y"] = X @ np.array([1.5, -2.0, 0.5, 0.0, 1.0]) + 0.3 * np.sin(3 * X[:, 0]) + 0.1 * rng.normal(size=rows)
    return frame


@pytest.fixture(scope="session")
def regression_csv(tmp_path_factory) -> str:
    """200 rows, 5 numeric features, a continuous target ``y``."""
    path = tmp_path_factory.mktemp("data") / "regression.csv"
    _regression(200, 0).to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="session")
def multiclass_csv(tmp_path_factory) -> str:
    """240 rows, 4 numeric features, a 3-class string target ``label``."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(240, 4))
    scores = X @ rng.normal(size=(4, 3))
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(4)])
    frame["label"] = np.array(["ant", "bee", "cat"])[scores.argmax(axis=1)]
    path = tmp_path_factory.mktemp("data") / "classes.csv"
    frame.to_csv(path, index=False)
    return str(path)
