"""GPU routing: train where the device asks for, and pass the model by reference.

``pool_train_flow`` is the flow deployed as ``train-cpu`` and ``train-gpu``: it
checks the device rule of its work pool (a ``cuda`` pool trains on a GPU or
fails, unless the worker allows a CPU fallback), runs ``train_flow`` as a
subflow, saves the model into the shared Torch Storage block and writes a small
``result.json`` next to it.

``pipeline_flow`` runs anywhere. With ``training.device="cuda"`` it sends the
training to the ``train-gpu`` deployment with ``run_deployment`` (after checking
a worker can take it: it fails fast otherwise, or trains on CPU here when
``routing.fallback="cpu"``), reads the model reference from shared storage and
evaluates the model on the held-out test rows itself. Results travel through
the storage as JSON and safetensors, never as Prefect (pickled) results, so the
caller and the worker only need to share the storage, not a result store.
"""

from __future__ import annotations

import tempfile
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field
from prefect import flow, get_run_logger, tags, task
from prefect.cache_policies import NO_CACHE

from prefect_torch.blocks.registry import load_stored_model, save_model_folder
from prefect_torch.blocks.storage import StorageNotFoundError, TorchStorage, default_storage
from prefect_torch.deployments.pools import GPU_TAG, cuda_pools, training_device
from prefect_torch.deployments.runs import check_deployment_available, run_and_wait
from prefect_torch.engine.loop import TrainSpec
from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec
from prefect_torch.engine.spec import Spec
from prefect_torch.errors import ConfigError, DataError, DeviceError, StorageError
from prefect_torch.flows.params import DatasetSpec, TrainFlowResult, TrialLink
from prefect_torch.flows.train import train_flow, training_callbacks
from prefect_torch.tasks import data_load, data_split

MODELS_FOLDER = "models"
RESULT_FILE = "result.json"
TRAIN_GPU_DEPLOYMENT = "pool-train/train-gpu"


class StoredTrainResult(TrainFlowResult):
    """A training run's result, with its model saved in shared storage."""

    model_path: str = Field(description="Model folder, relative to the storage's basepath.")
    work_pool: str | None = Field(default=None, description="Work pool the training ran on; empty when run in-process.")
    flow_run_id: str | None = Field(default=None, description="The pool-train flow run that trained the model.")
    fell_back_to_cpu: bool = Field(default=False, description="Trained on CPU although the run was meant for a GPU.")
    code_version: dict[str, str] = Field(default_factory=dict, description="Versions of the code that trained it.")


class RoutingSpec(Spec):
    """Where GPU training runs, and what to do when no GPU is available."""

    deployment: str = Field(
        default=TRAIN_GPU_DEPLOYMENT,
        description="Deployment that trains on the GPU pool, as 'flow name/deployment name'.",
    )
    fallback: Literal["fail", "cpu"] = Field(
        default="fail",
        description="With no GPU pool, deployment or worker: 'fail' at once, or 'cpu' to train on CPU in this run.",
    )
    start_timeout_s: float = Field(
        default=600.0, title="Start timeout (s)", gt=0, description="Cancel and fail if no worker starts the GPU run within this many seconds."
    )
    timeout_s: float = Field(
        default=86_400.0, title="Timeout (s)", gt=0, description="Cancel and fail if the GPU run has not finished within this many seconds."
    )


class PipelineResult(BaseModel):
    """What ``pipeline_flow`` returns."""

    trained: StoredTrainResult = Field(description="The training run and where its model is.")
    metrics: dict[str, float] = Field(description="Metrics of the stored model on the held-out test rows, measured here.")
    heldout_rows: int = Field(description="Rows the metrics were measured on.")


# -- storage ---------------------------------------------------------------------------


def load_storage(name: str | None) -> TorchStorage:
    """The saved Torch Storage block ``name``, or the default storage."""
    if not name:
        return default_storage()
    try:
        return TorchStorage.load(name, _sync=True)
    except ValueError as exc:
        raise ConfigError(
            f"There is no saved Torch Storage block named {name!r} ({exc}). Save one with "
            f"TorchStorage(basepath=...).save({name!r}) or leave storage_block empty."
        ) from exc


def read_stored_result(storage: TorchStorage, model_path: str) -> StoredTrainResult:
    """The ``result.json`` a pool-train run wrote next to its model."""
    path = f"{model_path.strip('/')}/{RESULT_FILE}"
    try:
        raw = storage.read_path(path)
    except StorageNotFoundError:
        raise StorageError(
            f"The training run completed but left no {RESULT_FILE} at {storage.url(path)}. The "
            "worker saved to another storage: give every worker and this run the same Torch "
            "Storage block (storage_block=..., or PREFECT_TORCH_STORAGE_BLOCK on the workers)."
        ) from None
    return StoredTrainResult.model_validate_json(raw)


@task(name="model_upload", cache_policy=NO_CACHE, persist_result=False)
def model_upload(local_folder: str, storage: TorchStorage, model_path: str) -> str:
    """Copy the saved model into shared storage; returns its URL."""
    return save_model_folder(storage, local_folder, model_path)


# -- training on a pool ----------------------------------------------------------------


def _current_work_pool() -> str | None:
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not flow_run.id:
        return None
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run.id).work_pool_name


def _code_version() -> dict[str, str]:
    from prefect_torch import __version__

    return {"prefect_torch": __version__, "train_flow": str(train_flow.version or "")}


@flow(name="pool-train", result_serializer="json")
def pool_train_flow(
    dataset: DatasetSpec,
    model: ModelSpec = ModelSpec(),
    optimizer: OptimizerSpec = OptimizerSpec(),
    training: TrainSpec = TrainSpec(),
    storage_block: str | None = None,
    model_path: str | None = None,
    trial: TrialLink | None = None,
) -> StoredTrainResult:
    """Train on this work pool (on its GPU for the cuda pool) and save the model
    to shared storage, where the caller finds it.

    Args:
        dataset: The data to train on and how to split it.
        model: The network to train.
        optimizer: The optimizer and its settings.
        training: Epochs, batching, device and the rest of the training loop.
        storage_block: Saved Torch Storage block to keep the model in; empty:
            PREFECT_TORCH_STORAGE_BLOCK on the worker, else a local folder.
        model_path: Folder for the model, relative to the storage's basepath;
            empty: models/<flow run id>.
        trial: The sweep trial this run is (set by sweep_flow): each epoch's
            validation metric is reported to it and its pruner may stop the run.
    """
    import torch
    from prefect.runtime import flow_run

    logger = get_run_logger()
    pool = _current_work_pool()
    choice = training_device(training.device, pool, torch.cuda.is_available())
    if choice.fell_back_to_cpu:
        logger.warning("Work pool %r: %s.", pool, choice.reason)
    training = training.model_copy(update={"device": choice.device})
    storage = load_storage(storage_block)
    path = (model_path or f"{MODELS_FOLDER}/{flow_run.id or uuid.uuid4().hex}").strip("/")
    # The gpu tag's concurrency limit keeps one GPU from being oversubscribed.
    on_gpu = choice.device.startswith("cuda") or (pool is not None and pool in cuda_pools())
    with tempfile.TemporaryDirectory(prefix="prefect-torch-train-") as scratch, (
        tags(GPU_TAG) if on_gpu else nullcontext()
    ):
        # A local storage takes the model directly; a remote one gets a copy.
        output = storage.url(path) if storage.is_local else str(Path(scratch) / "model")
        with training_callbacks(_trial_callbacks(trial)):
            result = train_flow(dataset=dataset, model=model, optimizer=optimizer, training=training, output=output)
        uri = result.model_uri if storage.is_local else model_upload(result.model_uri, storage, path)
    stored = StoredTrainResult(
        **{**result.model_dump(), "model_uri": uri},
        model_path=path,
        work_pool=pool,
        flow_run_id=str(flow_run.id) if flow_run.id else None,
        fell_back_to_cpu=choice.fell_back_to_cpu,
        code_version=_code_version(),
    )
    storage.write_path(f"{path}/{RESULT_FILE}", stored.model_dump_json(indent=2).encode())
    logger.info("Model saved to %s (trained on %s, work pool %s).", uri, result.device, pool or "none")
    return stored


def _trial_callbacks(trial: TrialLink | None) -> list:
    """The callback reporting to the sweep's trial through the shared study, if this run is one."""
    if trial is None:
        return []
    from prefect_torch.engine.search import ReportToTrial
    from prefect_torch.flows.sweep import remote_trial

    return [ReportToTrial(remote_trial(trial), trial.metric)]


def train_routed(
    dataset: DatasetSpec,
    model: ModelSpec,
    optimizer: OptimizerSpec,
    training: TrainSpec,
    routing: RoutingSpec,
    storage_block: str | None,
) -> StoredTrainResult:
    """Train in this flow run, or on the GPU pool when ``training.device`` is
    'cuda'; returns the result with the model in shared storage."""
    logger = get_run_logger()
    path = f"{MODELS_FOLDER}/{uuid.uuid4().hex}"
    local = dict(dataset=dataset, model=model, optimizer=optimizer, storage_block=storage_block, model_path=path)
    if training.device != "cuda":
        return pool_train_flow(**local, training=training)
    problem = check_deployment_available(routing.deployment)
    if problem is not None:
        if routing.fallback != "cpu":
            raise DeviceError(
                f"device='cuda' sends training to the GPU pool, but: {problem} "
                "Or pass routing.fallback='cpu' to train on CPU in this run instead."
            )
        logger.warning("%s Training on CPU here, as routing.fallback='cpu' allows.", problem)
        return pool_train_flow(**local, training=training.model_copy(update={"device": "cpu"}))
    parameters = {
        "dataset": dataset.model_dump(mode="json"),
        "model": model.model_dump(mode="json"),
        "optimizer": optimizer.model_dump(mode="json"),
        "training": training.model_dump(mode="json"),
        "storage_block": storage_block,
        "model_path": path,
    }
    logger.info("Sending training to %s; the model will be at %s.", routing.deployment, path)
    run = run_and_wait(
        routing.deployment, parameters, start_timeout_s=routing.start_timeout_s, timeout_s=routing.timeout_s
    )
    result = read_stored_result(load_storage(storage_block), path)
    logger.info("Training run %r on work pool %r finished: %s.", run.name, run.work_pool_name, result.model_uri)
    return result


# -- evaluation on held-out rows -------------------------------------------------------


@task(name="heldout_rows", cache_policy=NO_CACHE, persist_result=False)
def heldout_rows(dataset: DatasetSpec, split: str = "test") -> pd.DataFrame:
    """The raw rows of the dataset's held-out split, as a table.

    The split is recomputed with the same spec, so these are exactly the rows
    the training run held out. Features come back in their original units
    (undoing the standardisation), so a model trained on other data, with
    other statistics, can be evaluated on them too.
    """
    splits = data_split(data_load(dataset.load_spec()), dataset.split_spec())
    part, info = splits[split], splits.info
    if len(part) == 0:
        raise DataError(
            f"The {split} split of {dataset.uri} is empty: nothing to evaluate on. "
            "Set dataset.test_fraction above 0."
        )
    std = np.asarray(info.feature_std, dtype=np.float64)
    mean = np.asarray(info.feature_mean, dtype=np.float64)
    frame = pd.DataFrame(part.X.double().numpy() * std + mean, columns=info.features)
    if info.problem == "regression":
        target: Any = info.decode_regression(part.y).numpy()
    else:
        codes = part.y.reshape(-1).long().numpy()
        target = np.asarray(info.classes, dtype=object)[codes]
    frame[info.target] = target
    return frame


@task(name="evaluate_stored", task_run_name="evaluate_stored[{label}]", cache_policy=NO_CACHE, persist_result=False)
def evaluate_stored(storage: TorchStorage, model_path: str, rows: pd.DataFrame, label: str = "model") -> dict[str, float]:
    """Load a model from storage and measure it on ``rows`` (raw features and target)."""
    from prefect_torch.engine.metrics import compute_metrics, predict_outputs

    trained = load_stored_model(storage, model_path)
    info = trained.info
    if info.target not in rows.columns:
        raise DataError(
            f"The {label} model predicts {info.target!r}, but the held-out data has no such column "
            f"(columns: {list(rows.columns)}). Compare models trained for the same target."
        )
    outputs = predict_outputs(trained.model, info.encode_features(rows))
    return compute_metrics(outputs, info.encode_target(rows[info.target]), info)


# -- the pipeline ----------------------------------------------------------------------


@flow(name="pipeline", result_serializer="json")
def pipeline_flow(
    dataset: DatasetSpec,
    model: ModelSpec = ModelSpec(),
    optimizer: OptimizerSpec = OptimizerSpec(),
    training: TrainSpec = TrainSpec(),
    routing: RoutingSpec = RoutingSpec(),
    storage_block: str | None = None,
) -> PipelineResult:
    """Train (on the GPU pool when training.device is 'cuda'), then load the model
    from shared storage and evaluate it on the held-out test rows.

    Args:
        dataset: The data to train on and how to split it.
        model: The network to train.
        optimizer: The optimizer and its settings.
        training: The training loop; device 'cuda' sends training to the GPU pool.
        routing: Which deployment trains on the GPU and what to do without one.
        storage_block: Saved Torch Storage block shared with the workers; empty:
            PREFECT_TORCH_STORAGE_BLOCK, else a local folder.
    """
    trained = train_routed(dataset, model, optimizer, training, routing, storage_block)
    rows = heldout_rows(dataset)
    metrics = evaluate_stored(load_storage(storage_block), trained.model_path, rows, "trained")
    get_run_logger().info(
        "Held-out metrics of %s: %s", trained.model_uri, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    )
    return PipelineResult(trained=trained, metrics=metrics, heldout_rows=len(rows))


__all__ = [
    "pool_train_flow",
    "pipeline_flow",
    "train_routed",
    "heldout_rows",
    "evaluate_stored",
    "load_storage",
    "read_stored_result",
    "StoredTrainResult",
    "RoutingSpec",
    "PipelineResult",
    "TRAIN_GPU_DEPLOYMENT",
]
