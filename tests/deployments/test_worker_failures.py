"""What goes wrong with workers, against a real server: a cuda worker without a
GPU refuses to train, a pipeline without a GPU worker fails fast (or trains on
CPU when asked to), a run no worker starts is cancelled, and a worker killed
mid-training leaves the registry and the champion as they were."""

from __future__ import annotations

import os
import signal
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from prefect_torch.blocks import ModelRegistry
from prefect_torch.blocks.registry import save_model_folder
from prefect_torch.deployments import ALLOW_CPU_FALLBACK_ENV
from prefect_torch.engine.models import ModelSpec, build_model
from prefect_torch.engine.persist import save_model
from prefect_torch.engine.split import SplitSpec, split_table
from tests.datasets import noisy_linear
from tests.deployments.conftest import STORAGE_BLOCK, Project, last_json
from tests.support.prefect_server import _descendants, prefect_worker

pytestmark = [pytest.mark.server, pytest.mark.s3, pytest.mark.slow]


@pytest.fixture
def dataset(tmp_path: Path) -> dict:
    path = tmp_path / "houses.csv"
    noisy_linear(300, seed=11).to_csv(path, index=False)
    return {"uri": str(path), "target": "y"}


def test_a_cuda_worker_without_a_gpu_refuses_to_train(project: Project, dataset: dict) -> None:
    server = project.server
    deployment = project.deployment("pool-train/train-gpu")
    with prefect_worker(server, "cuda", extra_env=project.worker_env):  # no CPU fallback allowed
        created = server.request("POST", f"/deployments/{deployment['id']}/create_flow_run", json={
            "parameters": {"dataset": dataset, "training": {"epochs": 1}},
        })
        run = server.wait_for_flow_runs([created["id"]], timeout=240)[created["id"]]
    assert run["state_type"] == "FAILED"
    message = run["state"]["message"]
    assert "DeviceError" in message and "work pool 'cuda'" in message
    assert f"{ALLOW_CPU_FALLBACK_ENV}=1" in message
    assert not project.storage.exists(f"models/{created['id']}/result.json")


def test_the_pipeline_fails_fast_without_a_gpu_worker(project: Project, dataset: dict) -> None:
    # A GPU deployment on a pool no worker polls, made with the Python helpers.
    pool = f"cuda-idle-{uuid.uuid4().hex[:6]}"
    project.server.prefect("work-pool", "create", pool, "--type", "process")
    ran = project.run_python(
        f"""
        import json, time
        from prefect_torch.deployments import apply_deployments, train_gpu_deployment
        from prefect_torch.flows import pipeline_flow

        apply_deployments([{{**train_gpu_deployment(), "name": "train-gpu-idle", "work_pool": {pool!r}}}])
        outcomes = {{}}
        for label, routing in [
            ("idle", {{"deployment": "pool-train/train-gpu-idle"}}),
            ("missing", {{"deployment": "pool-train/no-such-deployment"}}),
            ("fallback", {{"deployment": "pool-train/train-gpu-idle", "fallback": "cpu"}}),
        ]:
            started = time.monotonic()
            try:
                result = pipeline_flow(dataset={dataset!r}, training={{"epochs": 2, "device": "cuda"}},
                                       routing=routing, storage_block={STORAGE_BLOCK!r})
                outcome = {{"trained": result.trained.model_dump(mode="json")}}
            except Exception as exc:
                outcome = {{"error": f"{{type(exc).__name__}}: {{exc}}"}}
            outcome["seconds"] = time.monotonic() - started
            outcomes[label] = outcome
        print(json.dumps(outcomes))
        """
    )
    assert ran.returncode == 0, ran.stderr[-4000:]
    outcomes = last_json(ran.stdout)
    idle, missing, fallback = outcomes["idle"], outcomes["missing"], outcomes["fallback"]
    assert idle["error"].startswith("DeviceError: device='cuda' sends training to the GPU pool")
    assert f"No worker is online for work pool {pool!r}" in idle["error"]
    assert "routing.fallback='cpu'" in idle["error"]
    assert "There is no deployment 'pool-train/no-such-deployment'" in missing["error"]
    assert "prefect deploy --all" in missing["error"]
    assert idle["seconds"] < 60 and missing["seconds"] < 60  # no waiting for a worker
    trained = fallback["trained"]
    assert (trained["device"], trained["work_pool"]) == ("cpu", None)
    runs = project.server.request("POST", "/flow_runs/filter", json={
        "deployments": {"name": {"any_": ["train-gpu-idle"]}},
    })
    assert runs == []  # nothing was left queued on the idle pool


def test_a_run_no_worker_starts_is_cancelled(project: Project, dataset: dict) -> None:
    # A worker is online, but its work queue is paused: the run would wait forever.
    pool = f"cuda-stalled-{uuid.uuid4().hex[:6]}"
    with prefect_worker(project.server, pool, extra_env=project.worker_env):
        project.server.prefect("work-queue", "pause", "default", "--pool", pool)
        ran = project.run_python(
            f"""
            from prefect_torch.deployments import apply_deployments, train_gpu_deployment
            from prefect_torch.flows import pipeline_flow

            apply_deployments([{{**train_gpu_deployment(), "name": "train-gpu-stalled", "work_pool": {pool!r}}}])
            try:
                pipeline_flow(dataset={dataset!r}, training={{"epochs": 1, "device": "cuda"}},
                              routing={{"deployment": "pool-train/train-gpu-stalled", "start_timeout_s": 10}},
                              storage_block={STORAGE_BLOCK!r})
            except Exception as exc:
                print(f"{{type(exc).__name__}}: {{exc}}")
            """
        )
    assert ran.returncode == 0, ran.stderr[-4000:]
    message = ran.stdout.strip().splitlines()[-1]
    assert message.startswith(f"DeviceError: No worker of work pool {pool!r} started the run")
    assert "within 10 s, so it was cancelled" in message
    (run,) = project.server.request("POST", "/flow_runs/filter", json={
        "deployments": {"name": {"any_": ["train-gpu-stalled"]}},
    })
    assert run["state_type"] == "CANCELLED"


def test_a_killed_worker_leaves_the_registry_and_the_champion(project: Project, tmp_path: Path) -> None:
    server = project.server
    name = f"killed-{uuid.uuid4().hex[:6]}"
    registry = ModelRegistry(storage=project.storage)
    champion = registry.register(name, _stored_model(project, f"models/{name}-champion"), metrics={"r2": 0.5})
    registry.set_alias(name, "champion", champion.version, expected_version=None)
    # The registry's and the models' files; card results (records and split tensors) and
    # checkpoints may come and go.
    def registry_files():
        return sorted(
            p for p in registry.storage.list("") if not p.startswith(("results/", "tensors/", "checkpoints/"))
        )

    before = registry_files()

    retrain = project.deployment("retrain/retrain")
    with prefect_worker(server, "cpu", extra_env=project.worker_env) as worker:
        created = server.request("POST", f"/deployments/{retrain['id']}/create_flow_run", json={
            "parameters": {"model_name": name, "training": {"epochs": 100_000, "batch_size": 8}},
        })
        _wait_for_training(project, created["id"])
        family = [worker.process.pid, *_descendants(worker.process.pid)]
        for pid in family:  # the worker and its flow-run process, without warning
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    run = server.request("GET", f"/flow_runs/{created['id']}")
    assert run["state_type"] != "COMPLETED"
    assert [v.version for v in registry.list_versions(name)] == [champion.version]
    assert registry.get_alias(name).version == champion.version
    assert len(registry.alias_history(name)) == 1
    assert registry_files() == before  # not even a half-saved challenger


def _wait_for_training(project: Project, flow_run_id: str, timeout: float = 240) -> None:
    """Wait until the run's Train card is running."""
    from tests.deployments.conftest import subflow_runs, task_runs

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [flow_run_id, *(r["id"] for r in subflow_runs(project.server, flow_run_id))]
        if any(t["name"].startswith("train[") and t["state_type"] == "RUNNING"
               for t in task_runs(project.server, runs)):
            return
        time.sleep(0.5)
    raise TimeoutError(f"the retrain run {flow_run_id} did not start training within {timeout} s")


def _stored_model(project: Project, path: str) -> str:
    splits = split_table(noisy_linear(60), SplitSpec(target="y"))
    spec = ModelSpec(hidden=[4])
    model = build_model(spec, splits.info.n_features, splits.info.n_outputs)
    with tempfile.TemporaryDirectory() as scratch:
        save_model(model, spec, splits.info, scratch)
        save_model_folder(project.storage, scratch, path)
    return path
