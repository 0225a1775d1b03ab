"""Deployments: the ``cpu`` and ``cuda`` work pools, the ``gpu`` tag limit, the
device rule of a CUDA pool, and the ``train-cpu``, ``train-gpu`` and ``retrain``
deployments (also declared in ``prefect.yaml``).

Typical set-up, against the server in ``PREFECT_API_URL``::

    prefect-torch pools create        # or ensure_work_pools()
    prefect deploy --all              # or apply_deployments([...])
    prefect worker start --pool cpu
    prefect worker start --pool cuda  # on a GPU machine

This package imports Prefect but not torch.
"""

from prefect_torch.deployments.deploy import (
    NIGHTLY_CRON,
    AppliedDeployment,
    DeploymentSpec,
    RETRAIN_VARIABLES,
    ProjectDirectory,
    RetrainSettings,
    apply_deployments,
    project_directory,
    retrain_deployment,
    retrain_settings,
    train_cpu_deployment,
    train_gpu_deployment,
)
from prefect_torch.deployments.pools import (
    ALLOW_CPU_FALLBACK_ENV,
    CPU_POOL,
    CUDA_POOL,
    CUDA_POOLS_ENV,
    GPU_TAG,
    DeviceChoice,
    WorkPoolsOutput,
    base_job_template,
    cpu_fallback_allowed,
    cuda_pools,
    ensure_work_pools,
    kubernetes_cuda_template,
    kubernetes_multi_gpu_template,
    training_device,
)
from prefect_torch.deployments.runs import check_deployment_available, run_and_wait

__all__ = [
    "CPU_POOL",
    "CUDA_POOL",
    "GPU_TAG",
    "NIGHTLY_CRON",
    "ALLOW_CPU_FALLBACK_ENV",
    "CUDA_POOLS_ENV",
    "WorkPoolsOutput",
    "ensure_work_pools",
    "kubernetes_cuda_template",
    "kubernetes_multi_gpu_template",
    "base_job_template",
    "DeviceChoice",
    "training_device",
    "cuda_pools",
    "cpu_fallback_allowed",
    "DeploymentSpec",
    "AppliedDeployment",
    "ProjectDirectory",
    "train_cpu_deployment",
    "train_gpu_deployment",
    "retrain_deployment",
    "project_directory",
    "retrain_settings",
    "RetrainSettings",
    "RETRAIN_VARIABLES",
    "apply_deployments",
    "check_deployment_available",
    "run_and_wait",
]
