"""Tests of the CUDA path.

Tests marked ``gpu`` need a CUDA GPU and are skipped without one, so CI (no GPU)
stays green; run them on a GPU machine with ``pytest tests/gpu -m gpu``. The
benchmark smoke test here runs anywhere.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def pytest_runtest_setup(item):
    # A hook, not an autouse fixture: it runs before any fixture, so a skipped GPU test
    # does not first start the session's Prefect server (prefect_harness).
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")


@pytest.fixture
def sync_debug_error():
    """Make any CUDA host sync raise while the returned switch is on."""

    class Switch:
        def on(self) -> None:
            _set_sync_debug_mode("error")

        def off(self) -> None:
            _set_sync_debug_mode("default")

    switch = Switch()
    try:
        yield switch
    finally:
        switch.off()


def _set_sync_debug_mode(mode: str) -> None:
    # torch warns once per process, on the first call whatever the mode, that this debug
    # mode is a prototype (TORCH_WARN_ONCE in THCPModule_cudaSetSyncDebugMode); the suite's
    # filterwarnings = error would turn that notice into a failure of whichever GPU test
    # runs first. Only that notice is ignored: a sync in "error" mode still raises.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Synchronization debug mode is a prototype feature",
                                category=UserWarning)
        torch.cuda.set_sync_debug_mode(mode)
