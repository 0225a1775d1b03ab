"""Real workers on the ``cpu`` and ``cuda`` pools run the deployments of
prefect.yaml: training lands on the intended pool, GPU training is routed to the
``cuda`` pool and its model comes back through shared S3 storage, and the
scheduled retrain deployment promotes (or keeps) the champion.

No GPU here: the ``cuda`` worker is started with PREFECT_TORCH_ALLOW_CPU_FALLBACK=1,
as the device rule requires for training there on CPU.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from prefect_torch.blocks import ModelRegistry
from prefect_torch.blocks.registry import load_stored_model
from prefect_torch.deployments import ALLOW_CPU_FALLBACK_ENV
from tests.datasets import noisy_linear
from tests.deployments.conftest import (
    RETRAIN_MODEL,
    STORAGE_BLOCK,
    UUID_PATTERN,
    Project,
    last_json,
    subflow_runs,
    task_runs,
)
from tests.support.prefect_server import prefect_worker

pytestmark = [pytest.mark.server, pytest.mark.s3, pytest.mark.slow]

QUICK = {"epochs": 4, "batch_size": 32}


@pytest.fixture(scope="module")
def workers(project: Project) -> Iterator[Project]:
    with ExitStack() as stack:
        stack.enter_context(prefect_worker(project.server, "cpu", extra_env=project.worker_env))
        stack.enter_context(prefect_worker(
            project.server, "cuda", extra_env={**project.worker_env, ALLOW_CPU_FALLBACK_ENV: "1"},
        ))
        yield project


@pytest.fixture
def dataset(tmp_path: Path) -> dict:
    path = tmp_path / "houses.csv"
    noisy_linear(400, noise=0.3, seed=7).to_csv(path, index=False)
    return {"uri": str(path), "target": "y"}


def test_training_runs_complete_on_their_pools(workers: Project, dataset: dict) -> None:
    server = workers.server
    # train-cpu from the command line ...
    output = server.prefect(
        "deployment", "run", "pool-train/train-cpu",
        "--params", json.dumps({"dataset": dataset, "training": {**QUICK, "device": "cpu"}}),
    ).stdout
    cpu_run = re.findall(UUID_PATTERN, output)[-1]
    # ... and train-gpu with the Python client.
    started = workers.run_python(
        f"""
        from prefect.deployments import run_deployment
        run = run_deployment("pool-train/train-gpu", timeout=0, parameters={{
            "dataset": {dataset!r}, "training": {{**{QUICK!r}, "device": "cuda"}}}})
        print(run.id)
        """
    )
    assert started.returncode == 0, started.stderr
    gpu_run = started.stdout.split()[-1]

    runs = server.wait_for_flow_runs([cpu_run, gpu_run], timeout=300)
    for run in runs.values():
        assert run["state_type"] == "COMPLETED", run["state"]
    assert (runs[cpu_run]["work_pool_name"], runs[gpu_run]["work_pool_name"]) == ("cpu", "cuda")

    storage = workers.storage
    cpu_result = json.loads(storage.read_path(f"models/{cpu_run}/result.json"))
    gpu_result = json.loads(storage.read_path(f"models/{gpu_run}/result.json"))
    assert (cpu_result["work_pool"], cpu_result["device"], cpu_result["fell_back_to_cpu"]) == ("cpu", "cpu", False)
    assert (gpu_result["work_pool"], gpu_result["device"], gpu_result["fell_back_to_cpu"]) == ("cuda", "cpu", True)
    assert gpu_result["model_uri"] == storage.url(f"models/{gpu_run}")

    # On the cuda pool every card carries the gpu tag, so the gpu limit applies.
    gpu_tasks = task_runs(server, [run["id"] for run in subflow_runs(server, gpu_run)])
    cpu_tasks = task_runs(server, [run["id"] for run in subflow_runs(server, cpu_run)])
    assert any(t["name"].startswith("train[") for t in gpu_tasks)
    assert all("gpu" in t["tags"] for t in gpu_tasks)
    assert not any("gpu" in t["tags"] for t in cpu_tasks)

    model = load_stored_model(storage, f"models/{gpu_run}")  # in this, the parent, process
    rows = noisy_linear(200, noise=0.3, seed=7)
    assert (model.predict(rows) - rows["y"]).abs().mean() < 2.0


def test_the_pipeline_sends_cuda_training_to_the_cuda_pool(workers: Project, dataset: dict) -> None:
    ran = workers.run_python(
        f"""
        from prefect_torch.flows import pipeline_flow
        result = pipeline_flow(
            dataset={dataset!r},
            training={{**{QUICK!r}, "device": "cuda"}},
            routing={{"start_timeout_s": 240}},
            storage_block={STORAGE_BLOCK!r},
        )
        print(result.model_dump_json())
        """
    )
    assert ran.returncode == 0, ran.stderr[-4000:]
    result = last_json(ran.stdout)
    trained = result["trained"]
    assert trained["work_pool"] == "cuda" and trained["fell_back_to_cpu"]
    run = workers.server.request("GET", f"/flow_runs/{trained['flow_run_id']}")
    assert run["work_pool_name"] == "cuda" and run["state_type"] == "COMPLETED"
    assert run["parent_task_run_id"] is not None  # a subflow of the pipeline run

    # The reference points into the shared storage and loads here, in the parent.
    model = load_stored_model(workers.storage, trained["model_path"])
    assert model.document["weights_sha256"]
    # The pipeline measured the model on the held-out rows the worker's run tested on.
    assert result["metrics"]["r2"] == pytest.approx(trained["metrics"]["r2"], rel=1e-5)
    assert result["heldout_rows"] == 60


def test_the_retrain_deployment_promotes_then_keeps_the_champion(workers: Project) -> None:
    server = workers.server
    registry = ModelRegistry(storage=workers.storage)
    retrain = workers.deployment("retrain/retrain")

    def run_retrain(parameters: dict) -> dict:
        created = server.request("POST", f"/deployments/{retrain['id']}/create_flow_run",
                                 json={"parameters": parameters})
        return server.wait_for_flow_runs([created["id"]], timeout=300)[created["id"]]

    first = run_retrain({"training": QUICK})
    assert first["state_type"] == "COMPLETED", first["state"]
    assert first["work_pool_name"] == "cpu"
    assert first["parameters"]["model_name"] == RETRAIN_MODEL  # the deployment's default
    assert registry.get_alias(RETRAIN_MODEL).version == 1

    worse = run_retrain({"training": {"epochs": 1}, "optimizer": {"lr": 1e-6}})
    assert worse["state_type"] == "COMPLETED", worse["state"]
    assert [v.version for v in registry.list_versions(RETRAIN_MODEL)] == [1, 2]
    assert registry.get_alias(RETRAIN_MODEL).version == 1
    assert "Not better" in registry.get_version(RETRAIN_MODEL, 2).description

    artifacts = server.request("POST", "/artifacts/filter", json={
        "artifacts": {"key": {"any_": [f"retrain-{RETRAIN_MODEL}"]}},
    })
    decisions = {a["flow_run_id"]: a["data"] for a in artifacts}
    assert "promoted the challenger" in decisions[first["id"]]
    assert "kept the champion" in decisions[worse["id"]]
