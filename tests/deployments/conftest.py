"""The deployed project, shared by the server tests of this folder.

``project`` runs what a user runs, as subprocesses against a real
``prefect server start``: ``prefect-torch pools create`` (twice: it must be
idempotent), saves a Torch Storage block on the real S3 server (SeaweedFS) that
every worker shares, and applies ``prefect.yaml`` with ``prefect deploy --all``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from prefect_torch.blocks import TorchStorage
from tests.datasets import noisy_linear
from tests.support.prefect_server import PrefectServer, prefect_executable
from tests.support.s3 import S3Server

REPO_ROOT = Path(__file__).resolve().parents[2]
STORAGE_BLOCK = "shared-models"
RETRAIN_MODEL = "houses"


@dataclass
class Project:
    server: PrefectServer
    s3: S3Server
    storage_fields: dict
    data_dir: Path
    pools_output: list[str]

    @property
    def storage(self) -> TorchStorage:
        """The shared storage, as this (parent) process sees it."""
        return TorchStorage(**self.storage_fields)

    @property
    def worker_env(self) -> dict[str, str]:
        return {"PREFECT_TORCH_STORAGE_BLOCK": STORAGE_BLOCK}

    def deployment(self, full_name: str) -> dict:
        return self.server.request("GET", f"/deployments/name/{full_name}")

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``prefect-torch`` against the server."""
        result = subprocess.run(
            [sys.executable, "-m", "prefect_torch.cli", *args],
            env=self.server.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"prefect-torch {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def run_python(self, code: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``code`` against the server; the last stdout line is returned parsed as JSON."""
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            env={**self.server.env, **self.s3.client_env()}, cwd=self.server.workdir,
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def project(prefect_server: PrefectServer, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    data_dir = tmp_path_factory.mktemp("retrain-data")
    noisy_linear(400, noise=0.5, seed=1).to_csv(data_dir / "2026-01.csv", index=False)
    fields = s3_server.block_fields(f"project-{uuid.uuid4().hex[:8]}")
    project = Project(prefect_server, s3_server, fields, data_dir, [])
    for _ in range(2):
        project.pools_output.append(project.cli("pools", "create").stdout)

    saved = project.run_python(
        f"""
        import os
        from prefect_torch.blocks import TorchStorage
        TorchStorage(
            basepath={fields['basepath']!r},
            endpoint_url=os.environ["TEST_S3_ENDPOINT_URL"],
            region=os.environ["AWS_DEFAULT_REGION"],
            aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        ).save({STORAGE_BLOCK!r}, overwrite=True)
        """
    )
    assert saved.returncode == 0, saved.stderr

    deploy_env = {
        **prefect_server.env,
        "PREFECT_TORCH_RETRAIN_DATA": str(data_dir),
        "PREFECT_TORCH_RETRAIN_TARGET": "y",
        "PREFECT_TORCH_MODEL_NAME": RETRAIN_MODEL,
    }
    deployed = subprocess.run(
        [prefect_executable(), "--no-prompt", "deploy", "--all"],
        env=deploy_env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert deployed.returncode == 0, f"prefect deploy --all failed:\n{deployed.stdout}\n{deployed.stderr}"
    yield project


UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def subflow_runs(server: PrefectServer, flow_run_id: str) -> list[dict]:
    """Every flow run below ``flow_run_id`` (subflows, their subflows, ...)."""
    found, todo = [], [flow_run_id]
    while todo:
        children = server.request("POST", "/flow_runs/filter", json={
            "flow_runs": {"parent_flow_run_id": {"any_": todo}}, "limit": 200,
        })
        found += children
        todo = [child["id"] for child in children]
    return found


def task_runs(server: PrefectServer, flow_run_ids: list[str]) -> list[dict]:
    return server.request("POST", "/task_runs/filter", json={
        "flow_runs": {"id": {"any_": flow_run_ids}}, "limit": 200,
    })
