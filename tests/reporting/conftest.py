"""Fixtures for the reporting tests: a Prefect API to publish artifacts to."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def prefect_api(request):
    """An isolated Prefect server and database: the suite-wide one from tests/conftest.py
    when it has one (one server per session, not two), else our own."""
    try:
        request.getfixturevalue("prefect_harness")
    except pytest.FixtureLookupError:
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=120):
            yield
        return
    yield
