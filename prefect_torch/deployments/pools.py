"""Work pools: ``cpu`` and ``cuda``, the ``gpu`` tag limit, and the rule that
keeps a CUDA pool's runs off the CPU.

``ensure_work_pools`` creates what is missing and leaves what exists alone, so
running it twice changes nothing (it backs ``prefect-torch pools create``, and it
returns a ``TypedDict`` so it can also run as a ``prefect.yaml`` step). Pools are
``process`` pools by default; ``pool_type="kubernetes"`` gives the ``cuda`` pool
the bundled job template that requests ``nvidia.com/gpu``.

The device rule (``training_device``) is checked by the training flow on the
worker: a run on a CUDA pool, or one that asks for ``device="cuda"``, trains on
the GPU or fails, unless the worker was started with
``PREFECT_TORCH_ALLOW_CPU_FALLBACK=1``. A slow CPU run where a GPU run was
expected is a failure a user should see, not a surprise in the bill.

This module imports Prefect but not torch.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, TypedDict

from prefect_torch.errors import ConfigError, DeviceError

CPU_POOL = "cpu"
CUDA_POOL = "cuda"
GPU_TAG = "gpu"
DEFAULT_GPU_LIMIT = 1
#: Set to 1 on a worker of a CUDA pool to let its runs train on CPU (tests, CPU-only machines).
ALLOW_CPU_FALLBACK_ENV = "PREFECT_TORCH_ALLOW_CPU_FALLBACK"
#: Comma-separated names of further work pools whose runs need CUDA (besides ``cuda``).
CUDA_POOLS_ENV = "PREFECT_TORCH_CUDA_POOLS"
KUBERNETES_CUDA_TEMPLATE = "kubernetes-cuda.json"

PoolType = Literal["process", "kubernetes"]
_TRUE = {"1", "true", "yes", "on"}


class WorkPoolsOutput(TypedDict):
    """What ``ensure_work_pools`` did (usable as ``{{ step-id.field }}`` in prefect.yaml)."""

    cpu_pool: str
    cuda_pool: str
    gpu_tag: str
    gpu_limit: int
    created: list[str]
    existing: list[str]


def ensure_work_pools(
    pool_type: PoolType = "process",
    gpu_limit: int = DEFAULT_GPU_LIMIT,
    cpu_pool: str = CPU_POOL,
    cuda_pool: str = CUDA_POOL,
    gpus_per_pod: int = 1,
) -> WorkPoolsOutput:
    """Create the ``cpu`` and ``cuda`` work pools and the ``gpu`` tag concurrency
    limit on the Prefect server in ``PREFECT_API_URL``, where missing.

    Existing pools and limits are left as they are (their settings may have been
    tuned in the UI); the output says which were created and which existed.
    With ``pool_type="kubernetes"`` and ``gpus_per_pod`` > 1 the ``cuda`` pool's pods
    get that many GPUs and a ``/dev/shm`` sized for NCCL (data-parallel training).
    """
    from prefect.settings import get_current_settings

    if pool_type not in ("process", "kubernetes"):
        raise ConfigError(f"Unknown pool type {pool_type!r}. Use 'process' or 'kubernetes'.")
    if not isinstance(gpu_limit, int) or gpu_limit < 1:
        raise ConfigError(f"gpu_limit must be a positive integer (GPUs per tag); got {gpu_limit!r}.")
    if not get_current_settings().api.url:
        raise ConfigError(
            "No Prefect server is configured: work pools only make sense on a server "
            "your workers also use. Set PREFECT_API_URL (for example `prefect config set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api`) and run this again."
        )
    import httpx

    try:
        return _ensure(pool_type, gpu_limit, cpu_pool, cuda_pool, gpus_per_pod)
    except httpx.TransportError as exc:
        raise ConfigError(
            f"Cannot reach the Prefect server at {get_current_settings().api.url} "
            f"({type(exc).__name__}: {exc}). Start it (`prefect server start`) or fix PREFECT_API_URL."
        ) from exc


def _ensure(pool_type: PoolType, gpu_limit: int, cpu_pool: str, cuda_pool: str, gpus_per_pod: int = 1) -> WorkPoolsOutput:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    created: list[str] = []
    existing: list[str] = []
    with get_client(sync_client=True) as client:
        for name, template, description in (
            (cpu_pool, base_job_template(pool_type, gpus=False), "prefect-torch: training and pipelines on CPU."),
            (cuda_pool, base_job_template(pool_type, gpus=True, gpus_per_pod=gpus_per_pod), "prefect-torch: GPU training (runs need CUDA)."),
        ):
            try:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=name, type=pool_type, base_job_template=template, description=description
                    )
                )
                created.append(f"work pool {name}")
            except ObjectAlreadyExists:
                pool = client.read_work_pool(name)
                if pool.type != pool_type:
                    raise ConfigError(
                        f"Work pool {name!r} exists with type {pool.type!r}, not {pool_type!r}. "
                        f"Delete it (`prefect work-pool delete {name}`) or ask for type {pool.type!r}."
                    ) from None
                existing.append(f"work pool {name}")
        try:
            limit = client.read_concurrency_limit_by_tag(GPU_TAG)
            existing.append(f"tag limit {GPU_TAG}")
            gpu_limit = limit.concurrency_limit
        except ObjectNotFound:
            client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=gpu_limit)
            created.append(f"tag limit {GPU_TAG}")
    return WorkPoolsOutput(
        cpu_pool=cpu_pool,
        cuda_pool=cuda_pool,
        gpu_tag=GPU_TAG,
        gpu_limit=gpu_limit,
        created=created,
        existing=existing,
    )


# -- base job templates -----------------------------------------------------------------


def kubernetes_cuda_template() -> dict[str, Any]:
    """The bundled Kubernetes base job template for the ``cuda`` pool.

    Its job asks for ``gpu_count`` (default 1) ``nvidia.com/gpu`` and tolerates
    the taint GPU node pools usually carry.
    """
    text = resources.files("prefect_torch.deployments").joinpath("templates").joinpath(KUBERNETES_CUDA_TEMPLATE).read_text()
    return json.loads(text)


def kubernetes_multi_gpu_template(gpus: int = 2, shm_size: str = "16Gi") -> dict[str, Any]:
    """The ``cuda`` pool's Kubernetes template for one pod with several GPUs.

    For data-parallel training on one node (``TrainSpec.processes`` up to ``gpus``):
    the pod requests ``gpu_count`` GPUs (default ``gpus``) and mounts a memory-backed
    ``/dev/shm`` of ``shm_size``, since NCCL and the workers share memory through it
    and a container's default 64 MiB makes NCCL fail or crawl.
    """
    if not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"gpus must be a positive integer (GPUs per pod); got {gpus!r}.")
    template = copy.deepcopy(kubernetes_cuda_template())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "{{ shm_size }}"}}]
    pod["containers"][0]["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    properties = template["variables"]["properties"]
    properties["gpu_count"]["default"] = gpus
    properties["gpu_count"]["description"] = (
        "Number of NVIDIA GPUs (nvidia.com/gpu) each flow run's pod requests; set the Train card's "
        "processes to at most this."
    )
    properties["shm_size"] = {
        "title": "Shared Memory",
        "description": "Size of the pod's memory-backed /dev/shm, which NCCL and the training processes use.",
        "type": "string",
        "default": shm_size,
    }
    return template


def base_job_template(pool_type: PoolType, gpus: bool, gpus_per_pod: int = 1) -> dict[str, Any]:
    """The base job template for a ``cpu`` (``gpus=False``) or ``cuda`` pool."""
    if pool_type == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    template = kubernetes_multi_gpu_template(gpus_per_pod) if gpus and gpus_per_pod > 1 else kubernetes_cuda_template()
    if not gpus:  # the same job, minus the GPU request and toleration
        template = copy.deepcopy(template)
        pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
        pod["containers"][0].pop("resources", None)
        pod.pop("tolerations", None)
        template["variables"]["properties"].pop("gpu_count", None)
    return template


# -- the device rule --------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceChoice:
    """The device a run trains on, and why."""

    device: str
    fell_back_to_cpu: bool
    reason: str


def cuda_pools(environ: Mapping[str, str] = os.environ) -> set[str]:
    """Names of the work pools whose runs need CUDA."""
    extra = {name.strip() for name in environ.get(CUDA_POOLS_ENV, "").split(",") if name.strip()}
    return {CUDA_POOL} | extra


def cpu_fallback_allowed(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this worker may train a CUDA pool's runs on CPU."""
    return environ.get(ALLOW_CPU_FALLBACK_ENV, "").strip().lower() in _TRUE


def training_device(
    requested: str,
    work_pool: str | None,
    cuda_available: bool,
    environ: Mapping[str, str] = os.environ,
) -> DeviceChoice:
    """Decide the device for a training run on ``work_pool``.

    A run on a CUDA pool, or one that asked for ``cuda``, needs a GPU: with
    none here it raises ``DeviceError``, unless ``PREFECT_TORCH_ALLOW_CPU_FALLBACK``
    is set on the worker, then it trains on CPU and says so.
    """
    on_cuda_pool = work_pool is not None and work_pool in cuda_pools(environ)
    wants_cuda = requested == "cuda" or requested.startswith("cuda:")
    if not (on_cuda_pool or wants_cuda):
        return DeviceChoice(requested, False, f"device {requested!r} as asked")
    where = f"work pool {work_pool!r}" if on_cuda_pool else "this run"
    if requested == "cpu" and not cpu_fallback_allowed(environ):
        raise DeviceError(
            f"This run is on {where}, which is for GPU training, but asked for device='cpu'. "
            f"Run it on the {CPU_POOL!r} pool (deployment train-cpu), or set "
            f"{ALLOW_CPU_FALLBACK_ENV}=1 on the worker to allow CPU runs there."
        )
    if cuda_available:
        device = requested if wants_cuda else "cuda"
        return DeviceChoice(device, False, f"CUDA GPU on {where}")
    if cpu_fallback_allowed(environ):
        return DeviceChoice(
            "cpu", True,
            f"no CUDA GPU on this worker; training on CPU because {ALLOW_CPU_FALLBACK_ENV} is set",
        )
    raise DeviceError(
        f"This run is on {where} and needs a CUDA GPU, but the worker's machine has none "
        "(torch sees no CUDA device). Start the worker for this pool on a GPU machine, run "
        f"on the {CPU_POOL!r} pool with device='cpu', or set {ALLOW_CPU_FALLBACK_ENV}=1 on "
        "the worker to allow training on CPU."
    )


__all__ = [
    "CPU_POOL",
    "CUDA_POOL",
    "GPU_TAG",
    "ALLOW_CPU_FALLBACK_ENV",
    "CUDA_POOLS_ENV",
    "WorkPoolsOutput",
    "ensure_work_pools",
    "kubernetes_cuda_template",
    "kubernetes_multi_gpu_template",
    "base_job_template",
    "DeviceChoice",
    "cuda_pools",
    "cpu_fallback_allowed",
    "training_device",
]
