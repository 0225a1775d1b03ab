"""Work pools: the Kubernetes GPU template, ``prefect-torch pools create`` against a
real server, and the device rule of a CUDA pool."""

from __future__ import annotations

import subprocess
import sys
import uuid

import httpx
import jsonschema
import pytest
from prefect.server.schemas.actions import validate_base_job_template
from prefect.utilities.templating import apply_values, find_placeholders
from prefect.workers.process import ProcessWorker

from prefect_torch.deployments import (
    ALLOW_CPU_FALLBACK_ENV,
    CUDA_POOLS_ENV,
    base_job_template,
    kubernetes_cuda_template,
    training_device,
)
from prefect_torch.errors import DeviceError
from tests.deployments.conftest import REPO_ROOT, Project

# What prefect-kubernetes' KubernetesWorkerJobConfiguration reads from a template.
KUBERNETES_JOB_FIELDS = {
    "command", "env", "labels", "name", "namespace", "job_manifest",
    "job_watch_timeout_seconds", "pod_watch_timeout_seconds", "stream_output",
}


def render(template: dict, values: dict | None = None) -> dict:
    """The job configuration a worker would build: variable defaults, then values.

    Mirrors ``BaseJobConfiguration.from_template_and_values``: unset variables
    (no default, or a null default) drop their keys.
    """
    variables = {
        name: spec["default"]
        for name, spec in template["variables"]["properties"].items()
        if spec.get("default") is not None
    }
    return apply_values(template["job_configuration"], {**variables, **(values or {})})


# -- the Kubernetes template -----------------------------------------------------------


def test_kubernetes_template_has_the_structure_the_kubernetes_worker_reads() -> None:
    template = kubernetes_cuda_template()
    assert set(template) == {"job_configuration", "variables"}
    assert set(template["job_configuration"]) == KUBERNETES_JOB_FIELDS
    manifest = template["job_configuration"]["job_manifest"]
    # The parts prefect-kubernetes insists on (its _get_base_job_manifest).
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    pod = manifest["spec"]["template"]["spec"]
    assert (pod["parallelism"], pod["completions"], pod["restartPolicy"]) == (1, 1, "Never")
    container = pod["containers"][0]
    assert container["name"] == "prefect-job"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "{{ gpu_count }}"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    validate_base_job_template(template)  # Prefect's own check: every placeholder is a declared variable


def test_kubernetes_template_variables_are_a_valid_json_schema() -> None:
    variables = kubernetes_cuda_template()["variables"]
    jsonschema.Draft202012Validator.check_schema(variables)
    for name, spec in variables["properties"].items():
        assert spec.get("title") and spec.get("description"), name
        if "default" in spec:
            jsonschema.validate(spec["default"], spec)
    validator = jsonschema.Draft202012Validator(variables)
    assert list(validator.iter_errors({"gpu_count": 2, "namespace": "ml"})) == []
    errors = [e.message for e in validator.iter_errors({"gpu_count": 0})]
    assert errors == ["0 is less than the minimum of 1"]


def test_kubernetes_template_renders_a_gpu_job() -> None:
    template = kubernetes_cuda_template()
    job = render(template)
    container = job["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert "image" not in container  # unset: the worker puts in its default image
    assert job["namespace"] == "default" and job["pod_watch_timeout_seconds"] == 600
    bigger = render(template, {"gpu_count": 4, "image": "my/torch:cuda", "node_selector": {"gpu": "a100"}})
    pod = bigger["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 4}
    assert pod["containers"][0]["image"] == "my/torch:cuda"
    assert pod["nodeSelector"] == {"gpu": "a100"}


def test_the_cpu_variant_asks_for_no_gpu() -> None:
    template = base_job_template("kubernetes", gpus=False)
    validate_base_job_template(template)
    pod = render(template)["job_manifest"]["spec"]["template"]["spec"]
    assert "resources" not in pod["containers"][0] and "tolerations" not in pod
    assert "gpu_count" not in template["variables"]["properties"]
    placeholders = {p.name for p in find_placeholders(str(template["job_configuration"]))}
    assert placeholders <= set(template["variables"]["properties"])
    assert base_job_template("process", gpus=True) == ProcessWorker.get_default_base_job_template()


def test_the_multi_gpu_variant_requests_several_gpus_and_a_shared_memory_volume_for_nccl() -> None:
    template = base_job_template("kubernetes", gpus=True, gpus_per_pod=4)
    validate_base_job_template(template)
    jsonschema.Draft202012Validator.check_schema(template["variables"])
    pod = render(template)["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 4}
    assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}]
    bigger = render(template, {"gpu_count": 8, "shm_size": "64Gi"})["job_manifest"]["spec"]["template"]["spec"]
    assert bigger["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert bigger["volumes"][0]["emptyDir"]["sizeLimit"] == "64Gi"
    # the one-GPU template stays as it was
    assert "volumes" not in render(kubernetes_cuda_template())["job_manifest"]["spec"]["template"]["spec"]


@pytest.mark.server
@pytest.mark.s3
@pytest.mark.slow
def test_the_server_accepts_kubernetes_pools_with_the_template(project: Project) -> None:
    # prefect-kubernetes is not installed: the server does not need the worker
    # type, and validates the template's placeholders against its variables.
    server = project.server
    suffix = uuid.uuid4().hex[:6]
    created = project.run_python(
        f"""
        import json
        from prefect_torch.deployments import ensure_work_pools
        print(json.dumps(ensure_work_pools("kubernetes", cpu_pool="k8s-cpu-{suffix}", cuda_pool="k8s-cuda-{suffix}")))
        """
    )
    assert created.returncode == 0, created.stderr
    pool = server.request("GET", f"/work_pools/k8s-cuda-{suffix}")
    assert pool["type"] == "kubernetes"
    assert pool["base_job_template"] == kubernetes_cuda_template()
    cpu_pool = server.request("GET", f"/work_pools/k8s-cpu-{suffix}")
    assert "gpu_count" not in cpu_pool["base_job_template"]["variables"]["properties"]

    broken = kubernetes_cuda_template()
    del broken["variables"]["properties"]["gpu_count"]
    with pytest.raises(httpx.HTTPStatusError) as refused:
        server.request("POST", "/work_pools/", json={
            "name": f"k8s-broken-{suffix}", "type": "kubernetes", "base_job_template": broken,
        })
    assert refused.value.response.status_code == 422
    assert "gpu_count" in refused.value.response.text


# -- prefect-torch pools create ------------------------------------------------------------


@pytest.mark.server
@pytest.mark.s3
@pytest.mark.slow
def test_pools_create_is_idempotent(project: Project) -> None:
    first, second = project.pools_output
    assert first.split("\n")[:3] == ["created work pool cpu", "created work pool cuda", "created tag limit gpu"]
    assert second.split("\n")[:3] == [
        "exists  work pool cpu (left unchanged)",
        "exists  work pool cuda (left unchanged)",
        "exists  tag limit gpu (left unchanged)",
    ]
    for name in ("cpu", "cuda"):
        pool = project.server.request("GET", f"/work_pools/{name}")
        assert pool["type"] == "process"
        assert pool["base_job_template"] == ProcessWorker.get_default_base_job_template()
    limit = project.server.request("GET", "/concurrency_limits/tag/gpu")
    assert limit["concurrency_limit"] == 1


def test_pools_create_needs_a_reachable_server(tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "PREFECT_HOME": str(tmp_path)}
    command = [sys.executable, "-m", "prefect_torch.cli", "pools", "create"]
    unset = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert unset.returncode == 2
    assert "No Prefect server is configured" in unset.stderr and "PREFECT_API_URL" in unset.stderr

    dead = subprocess.run(
        command, env={**env, "PREFECT_API_URL": "http://127.0.0.1:9/api"},
        capture_output=True, text=True, timeout=180, cwd=REPO_ROOT,
    )
    assert dead.returncode == 2, dead.stderr
    assert "Cannot reach the Prefect server at http://127.0.0.1:9/api" in dead.stderr


# -- the device rule -----------------------------------------------------------------------


def test_a_cuda_pool_trains_on_the_gpu_when_there_is_one() -> None:
    assert training_device("auto", "cuda", cuda_available=True, environ={}).device == "cuda"
    assert training_device("cuda:1", "cuda", cuda_available=True, environ={}).device == "cuda:1"
    assert training_device("auto", "cpu", cuda_available=True, environ={}).device == "auto"
    assert training_device("cpu", None, cuda_available=False, environ={}).device == "cpu"


def test_a_cuda_pool_without_a_gpu_refuses_unless_allowed() -> None:
    with pytest.raises(DeviceError, match=rf"work pool 'cuda' and needs a CUDA GPU.*{ALLOW_CPU_FALLBACK_ENV}=1"):
        training_device("auto", "cuda", cuda_available=False, environ={})
    with pytest.raises(DeviceError, match="needs a CUDA GPU"):
        training_device("cuda", None, cuda_available=False, environ={})
    with pytest.raises(DeviceError, match="asked for device='cpu'"):
        training_device("cpu", "cuda", cuda_available=True, environ={})
    with pytest.raises(DeviceError, match="work pool 'gpu-a100'"):
        training_device("auto", "gpu-a100", cuda_available=False, environ={CUDA_POOLS_ENV: "gpu-a100, gpu-h100"})
    allowed = training_device("cuda", "cuda", cuda_available=False, environ={ALLOW_CPU_FALLBACK_ENV: "1"})
    assert (allowed.device, allowed.fell_back_to_cpu) == ("cpu", True)
    assert ALLOW_CPU_FALLBACK_ENV in allowed.reason
    with pytest.raises(DeviceError):
        training_device("cuda", "cuda", cuda_available=False, environ={ALLOW_CPU_FALLBACK_ENV: "0"})
