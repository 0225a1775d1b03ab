"""The fast-path flow: data_load → data_split → model_define → train → evaluate."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

from prefect import flow, get_run_logger, task
from prefect.assets import materialize
from prefect.cache_policies import NO_CACHE

from prefect_torch.engine.data import drop_early_reads
from prefect_torch.engine.fileio import join
from prefect_torch.engine.handles import ModelHandle
from prefect_torch.engine.loop import Callback, TrainSpec
from prefect_torch.engine.models import ModelSpec, count_parameters
from prefect_torch.engine.optim import OptimizerSpec
from prefect_torch.engine.persist import save_model
from prefect_torch.engine.split import Splits
from prefect_torch.flows.params import DatasetSpec, TrainFlowResult
from prefect_torch.flows.storage import default_models_root
from prefect_torch.reporting import current_run_name, dataset_asset, model_asset, publish_model_card
from prefect_torch.reporting.assets import MATERIALIZED_BY, record_materialization
from prefect_torch.reporting.names import model_save_run_name
from prefect_torch.blocks.serializer import TorchSerializer
from prefect_torch.tasks import data_load, data_split, evaluate, model_define, train
from prefect_torch.tasks._common import persisted_in


# Callbacks the Train card of every train_flow run in this context gets besides its own:
# how a sweep's trial on a work pool reports each epoch to its Optuna trial without the
# flow growing a parameter that is not JSON.
_extra_callbacks: ContextVar[tuple[Callback, ...]] = ContextVar("prefect_torch_train_callbacks", default=())


@contextmanager
def training_callbacks(callbacks: Sequence[Callback]) -> Iterator[None]:
    """Give the Train card of ``train_flow`` runs inside this block these callbacks too."""
    token = _extra_callbacks.set(tuple(callbacks))
    try:
        yield
    finally:
        _extra_callbacks.reset(token)


_SAVE_OPTIONS = dict(name="model_save", task_run_name=model_save_run_name, cache_policy=NO_CACHE, persist_result=False)


def _save(model: ModelHandle, splits: Splits, output: str | None, extra: dict) -> str:
    """Save the trained model as safetensors + JSON; returns the folder."""
    uri = output or join(default_models_root(), model.key)
    saved = save_model(model.model, model.spec, splits.info, uri, extra=extra)
    record_materialization(
        {"model": model.spec.short_name(), "data_key": splits.info.data_key, "test_metrics": extra.get("metrics", {})}
    )
    return saved


# The plain task, for flows that save a model outside train_flow (a sweep's best trial).
model_save = task(**_SAVE_OPTIONS)(_save)


def materializing_model_save(uri: str, spec: ModelSpec, dataset_uri: str):
    """model_save as the task that materializes the model asset at ``uri`` from the dataset
    asset: the lineage Prefect shows. The keys are only known at run time, hence per call."""
    return materialize(
        model_asset(uri, spec), by=MATERIALIZED_BY, asset_deps=[dataset_asset(dataset_uri)], **_SAVE_OPTIONS
    )(_save)


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    dataset = params.get("dataset")
    uri = dataset.uri if isinstance(dataset, DatasetSpec) else (dataset or {}).get("uri", "data")
    return f"train[{str(uri).rstrip('/').rsplit('/', 1)[-1]}]"


# The flow's own result (and a failure's exception) is written as a safe record, never pickle.
@flow(name="train", flow_run_name=_flow_run_name, log_prints=True, result_serializer=TorchSerializer())
def train_flow(
    dataset: DatasetSpec,
    model: ModelSpec = ModelSpec(),
    optimizer: OptimizerSpec = OptimizerSpec(),
    training: TrainSpec = TrainSpec(),
    output: str | None = None,
) -> TrainFlowResult:
    """Train a PyTorch model on a CSV/Parquet dataset in one Train task, evaluate it
    on the held-out test split and save it (safetensors + JSON).

    Args:
        dataset: Where the data is (local path or s3:// URL), the target column and how to split it.
        model: The network: MLP layer sizes, activation, dropout and normalisation, or your own module.
        optimizer: Optimizer (adam, adamw, sgd, rmsprop), learning rate, weight decay and momentum.
        training: Epochs, batch size, accumulation, clipping, LR schedule, early stopping and device.
        output: Folder or URL to save the model to; a folder under the Prefect home when empty.
    """
    started = time.perf_counter()
    logger = get_run_logger()
    load, split, define, fit, score = persisted_in(None, data_load, data_split, model_define, train, evaluate)
    table = load(dataset.load_spec())
    # A cached Load took neither the bytes its fingerprint read nor an early read; the
    # early split of the table Load returned stays for Data Split.
    drop_early_reads(kept_for=table)
    splits = split(table, dataset.split_spec())
    drop_early_reads()  # a cached Split did not take it
    handle = define(model, splits)
    watchers = list(_extra_callbacks.get())
    extra_args = {"callbacks": watchers} if watchers else {}
    fitted = fit(splits, handle, optimizer, training, **extra_args, return_state=True)
    trained = fitted.result()
    # A cached Train card returns an earlier run's model: the card must say so.
    cached = fitted.name == "Cached"
    metrics = score(trained.model, splits, "test")
    extra = {
        "metrics": metrics,
        "history": trained.history,
        "optimizer_spec": optimizer.model_dump(mode="json"),
        "training_spec": training.model_dump(mode="json"),
        "loss": trained.loss,
    }
    destination = output or join(default_models_root(), trained.model.key)
    save = materializing_model_save(destination, model, dataset.uri)
    model_uri = save(trained.model, splits, destination, extra)
    logger.info("test metrics: %s; model saved to %s", _fmt(metrics), model_uri)
    publish_model_card(
        logger, title=current_run_name("train"), dataset_uri=dataset.uri, data_key=splits.info.data_key,
        rows=splits.info.rows, problem=splits.info.problem, loss=trained.loss, model_spec=model,
        parameters=count_parameters(trained.model.model), optimizer=optimizer, device=trained.device,
        history=trained.history, epochs=training.epochs, steps=trained.steps, stop_reason=trained.stop_reason,
        metrics=metrics, model_uri=model_uri, seconds=time.perf_counter() - started,
        train_seconds=trained.seconds, cached=cached, target_std=splits.info.target_std,
    )
    return TrainFlowResult(
        metrics=metrics,
        history=trained.history,
        model_uri=model_uri,
        problem=splits.info.problem,
        loss=trained.loss,
        stop_reason=trained.stop_reason,
        data_key=splits.info.data_key,
        device=trained.device,
        steps=trained.steps,
        train_seconds=trained.seconds,
    )


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
