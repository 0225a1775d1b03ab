"""The prefect-torch deployments, from Python: the same three ``prefect.yaml``
declares (``train-cpu``, ``train-gpu``, ``retrain``).

Each helper returns a ``DeploymentSpec`` (a ``TypedDict``, so it reads like the
YAML entry and can be changed before applying); ``apply_deployments`` registers
them with the server in ``PREFECT_API_URL``::

    from prefect_torch.deployments import (
        apply_deployments, retrain_deployment, train_cpu_deployment, train_gpu_deployment,
    )

    apply_deployments([
        train_cpu_deployment(),
        train_gpu_deployment(),
        retrain_deployment(data_uri="s3://bucket/housing/", target="price", model_name="housing"),
    ])

Entrypoints are module paths (``prefect_torch.flows.routing.pool_train_flow``), so
a worker with prefect-torch installed finds the flows wherever it runs; with
``project_dir`` the runs first change into that folder (a source checkout).
``project_directory`` is the ``prefect.yaml`` build step that records it.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, TypedDict

from prefect_torch.deployments.pools import CPU_POOL, CUDA_POOL, GPU_TAG

NIGHTLY_CRON = "0 2 * * *"
POOL_TRAIN_ENTRYPOINT = "prefect_torch.flows.routing.pool_train_flow"
RETRAIN_ENTRYPOINT = "prefect_torch.flows.retrain.retrain_flow"
PROJECT_TAG = "prefect-torch"
RETRAIN_DESCRIPTION = "Retrain on the newest data and promote the challenger only if it beats the champion."
#: What the retrain deployment's parameters come from in ``prefect.yaml``.
RETRAIN_VARIABLES = {
    "PREFECT_TORCH_RETRAIN_DATA": "data_uri",
    "PREFECT_TORCH_RETRAIN_TARGET": "target",
    "PREFECT_TORCH_MODEL_NAME": "model_name",
}


class DeploymentSpec(TypedDict):
    """One deployment, as in a ``prefect.yaml`` ``deployments:`` entry."""

    name: str
    entrypoint: str
    description: str
    work_pool: str
    tags: list[str]
    parameters: dict[str, Any]
    cron: str | None
    timezone: str
    enforce_parameter_schema: bool


class AppliedDeployment(TypedDict):
    """A deployment registered with the server."""

    id: str
    name: str
    full_name: str
    work_pool: str


class RetrainSettings(TypedDict):
    """Output of the ``retrain_settings`` step: the retrain deployment's parameters and
    whether its schedule may run."""

    data_uri: str
    target: str
    model_name: str
    schedule_active: bool
    description: str


class ProjectDirectory(TypedDict):
    """Output of the ``project_directory`` step (``{{ project.directory }}``)."""

    directory: str


def train_cpu_deployment() -> DeploymentSpec:
    """``pool-train/train-cpu``: training on the ``cpu`` pool."""
    return DeploymentSpec(
        name="train-cpu",
        entrypoint=POOL_TRAIN_ENTRYPOINT,
        description="Train a PyTorch model on the cpu work pool; the model is saved to shared storage.",
        work_pool=CPU_POOL,
        tags=[PROJECT_TAG, "cpu"],
        parameters={"training": {"device": "cpu"}},
        cron=None,
        timezone="UTC",
        enforce_parameter_schema=True,
    )


def train_gpu_deployment() -> DeploymentSpec:
    """``pool-train/train-gpu``: training on the ``cuda`` pool's GPU."""
    return DeploymentSpec(
        name="train-gpu",
        entrypoint=POOL_TRAIN_ENTRYPOINT,
        description="Train a PyTorch model on a GPU of the cuda work pool; the model is saved to shared storage.",
        work_pool=CUDA_POOL,
        tags=[PROJECT_TAG, GPU_TAG],
        parameters={"training": {"device": "cuda"}},
        cron=None,
        timezone="UTC",
        enforce_parameter_schema=True,
    )


def retrain_deployment(
    data_uri: str,
    target: str,
    model_name: str,
    cron: str = NIGHTLY_CRON,
    timezone: str = "UTC",
) -> DeploymentSpec:
    """``retrain/retrain``: on a cron schedule (nightly by default), train a
    challenger on the newest dataset under ``data_uri`` and promote it if it
    beats the champion."""
    return DeploymentSpec(
        name="retrain",
        entrypoint=RETRAIN_ENTRYPOINT,
        description=RETRAIN_DESCRIPTION,
        work_pool=CPU_POOL,
        tags=[PROJECT_TAG, "retrain"],
        parameters={"model_name": model_name, "data": {"uri": data_uri, "target": target}},
        cron=cron,
        timezone=timezone,
        enforce_parameter_schema=True,
    )


def project_directory() -> ProjectDirectory:
    """The folder ``prefect deploy`` runs in (a ``prefect.yaml`` build step), so
    the pull step can send the worker's runs there."""
    return ProjectDirectory(directory=os.path.abspath(os.getcwd()))


def retrain_settings() -> RetrainSettings:
    """The retrain deployment's settings from the PREFECT_TORCH_RETRAIN_DATA,
    PREFECT_TORCH_RETRAIN_TARGET and PREFECT_TORCH_MODEL_NAME variables (a ``prefect.yaml``
    build step).

    Without all three a scheduled run could only fail (no data, target or model name), so
    the schedule is created paused, and the deployment's description and a warning say
    which variables to set."""
    values = {field: os.environ.get(variable, "").strip() for variable, field in RETRAIN_VARIABLES.items()}
    missing = [variable for variable, field in RETRAIN_VARIABLES.items() if not values[field]]
    description = RETRAIN_DESCRIPTION
    if missing:
        message = (
            f"Schedule paused: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set, and a "
            "scheduled run could only fail. Set them and run `prefect deploy --all` again, or fill in the "
            "parameters and turn the schedule on in the UI."
        )
        description = f"{RETRAIN_DESCRIPTION} {message}"
        print(f"WARNING: retrain deployment: {message}", file=sys.stderr)
    return RetrainSettings(
        data_uri=values["data_uri"], target=values["target"], model_name=values["model_name"],
        schedule_active=not missing, description=description,
    )


def apply_deployments(
    specs: Iterable[DeploymentSpec], project_dir: str | os.PathLike[str] | None = None
) -> list[AppliedDeployment]:
    """Create or update the deployments on the server in ``PREFECT_API_URL``.

    The work pools must exist (``ensure_work_pools``). With ``project_dir``,
    runs change into that folder before loading the flow, as the
    ``set_working_directory`` pull step of ``prefect.yaml`` does.
    """
    from prefect.deployments.runner import EntrypointType
    from prefect.runner.storage import LocalStorage
    from prefect.schedules import Cron
    from prefect.utilities.importtools import import_object

    applied = []
    for spec in specs:
        flow = import_object(spec["entrypoint"])
        deployment = flow.to_deployment(
            name=spec["name"],
            description=spec["description"],
            tags=list(spec["tags"]),
            parameters=dict(spec["parameters"]),
            schedules=[Cron(spec["cron"], timezone=spec["timezone"])] if spec["cron"] else None,
            enforce_parameter_schema=spec["enforce_parameter_schema"],
            work_pool_name=spec["work_pool"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        if project_dir is not None:
            deployment.storage = LocalStorage(os.fspath(project_dir))
        deployment_id = deployment.apply()
        applied.append(
            AppliedDeployment(
                id=str(deployment_id),
                name=spec["name"],
                full_name=f"{flow.name}/{spec['name']}",
                work_pool=spec["work_pool"],
            )
        )
    return applied


__all__ = [
    "NIGHTLY_CRON",
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
]
