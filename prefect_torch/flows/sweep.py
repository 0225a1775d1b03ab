"""Hyperparameter sweeps: an Optuna study whose trials are Prefect runs.

``sweep_flow`` loads and splits the data once, then asks an Optuna study (TPE
sampler with a seed, median pruner) for trials and runs each as a Train card:

- in this flow run, ``parallel`` trials at a time through Prefect's thread-pool
  task runner (torch's intra-op threads are shared out between them); or
- as flow runs of a ``train-cpu`` / ``train-gpu`` deployment on a work pool
  (``run_deployment``), so that workers on many machines share the trials.

The study lives in Optuna's RDB storage: a SQLite file under the Prefect home by
default, or the PostgreSQL database of a ``SweepStorage`` block for sweeps that
span machines. Its name comes from the sweep's lineage (data key, split, base
specs, space, metric, direction), so running the same sweep again continues the
study: finished trials stay finished, trials a killed sweep left running are
retried with their parameters (Optuna's heartbeat), and a trial whose parameters
were trained before is a cache hit of the Train card.

Each epoch's validation metric is reported to the trial (``ReportToTrial``, a
callback of the training loop); the pruner stops poor trials, which are recorded
as pruned. A trial that raises is recorded as failed with its error and the sweep
goes on; a sweep whose every trial failed fails with the first error.

At the end: a table of every trial and a chart (metric per trial, parameter
importances) as artifacts, and the best model saved, measured on the test split
and, with ``model_name``, registered in the ``ModelRegistry`` (it becomes the
champion only by the retrain flow's promotion rule).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
import uuid
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator, Literal

from pydantic import BaseModel, Field
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import CancelledRun
from prefect.task_runners import ThreadPoolTaskRunner

from prefect_torch.engine.loop import TrainSpec
from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec
from prefect_torch.engine.search import (
    USER_ATTR_PRUNED,
    VAL_LOSS,
    ReportToTrial,
    SearchSpace,
    TrialPruned,
    apply_params,
    check_metric,
    check_space,
    decode_params,
    default_direction,
    parse_space,
    suggest,
    trial_value,
)
from prefect_torch.engine.spec import Spec
from prefect_torch.errors import ConfigError, DeviceError, TrainingError
from prefect_torch.flows.params import DatasetSpec, PrunerSpec, TrialLink

# The thread pool is larger than any parallelism: the sweep itself keeps at most
# ``parallel`` trials in flight, so the pool never queues one behind another.
_MAX_PARALLEL = 64
_STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


class SweepSpec(Spec):
    """How many trials, how many at once, what they optimise and where they run."""

    trials: int = Field(default=20, ge=1, le=100_000, description="Trials the study should have finished.")
    parallel: int = Field(default=1, ge=1, le=_MAX_PARALLEL, description="Trials running at the same time.")
    metric: str = Field(
        default=VAL_LOSS, description="Validation metric to optimise each trial on: val_loss, r2 or accuracy."
    )
    direction: Literal["auto", "minimize", "maximize"] = Field(
        default="auto", description="minimize or maximize the metric; auto: maximize r2/accuracy, minimize val_loss."
    )
    seed: int = Field(default=0, ge=0, description="Seed of the TPE sampler.")
    pruner: PrunerSpec = Field(default=PrunerSpec(), title="Pruner", description="Which trials are stopped early.")
    deployment: str | None = Field(
        default=None,
        description="Run each trial as a flow run of this deployment on its work pool, e.g. "
        "'pool-train/train-cpu'; in this flow run when empty.",
    )
    study_storage_block: str | None = Field(
        default=None,
        description="Saved Torch Sweep Storage block (a PostgreSQL URL) holding the study; a SQLite file "
        "under the Prefect home when empty.",
    )
    study_name: str | None = Field(
        default=None, description="Name of the Optuna study; derived from the data, space and metric when empty."
    )
    heartbeat_s: int = Field(
        default=10, ge=1, description="Seconds between heartbeats of running trials; a trial silent for 3 "
        "heartbeats (its sweep was killed) is retried by the next run of the sweep."
    )
    start_timeout_s: float = Field(
        default=600.0, gt=0, description="With a deployment: fail a trial no worker started within this many seconds."
    )
    timeout_s: float = Field(
        default=86_400.0, gt=0, description="With a deployment: fail a trial not finished within this many seconds."
    )

    def resolved_direction(self) -> Literal["minimize", "maximize"]:
        return default_direction(self.metric) if self.direction == "auto" else self.direction


class TrialSummary(BaseModel):
    """One trial of the study."""

    number: int = Field(description="Trial number within the study.")
    params: dict[str, Any] = Field(description="The hyperparameters it tried.")
    value: float | None = Field(description="Its metric; the last reported epoch's for a pruned trial.")
    state: str = Field(description="COMPLETE, PRUNED, FAIL, RUNNING or WAITING.")
    seconds: float | None = Field(default=None, description="Wall time of the trial.")
    error: str | None = Field(default=None, description="Why it failed.")
    run_url: str | None = Field(default=None, description="The Prefect run that trained it.")


class BestTrial(BaseModel):
    """The best trial, its model and its metrics on the test split."""

    number: int = Field(description="Trial number.")
    params: dict[str, Any] = Field(description="Its hyperparameters.")
    value: float = Field(description="Its validation metric.")
    metrics: dict[str, float] = Field(description="Metrics of its model on the test split.")
    model_uri: str = Field(description="Where its model is saved.")
    registered_version: int | None = Field(default=None, description="Its version in the model registry.")
    promoted: bool = Field(default=False, description="Whether it became the registry's champion.")


class SweepResult(BaseModel):
    """What ``sweep_flow`` returns."""

    study_name: str = Field(description="The Optuna study.")
    metric: str = Field(description="The metric optimised.")
    direction: str = Field(description="minimize or maximize.")
    best: BestTrial = Field(description="The best trial.")
    trials: list[TrialSummary] = Field(description="Every trial of the study, by number.")
    run_here: list[int] = Field(description="Numbers of the trials this run of the sweep ran (not earlier runs).")


# -- the study ------------------------------------------------------------------------


def study_name_for(
    data_key: str, dataset: DatasetSpec, space: SearchSpace, model: ModelSpec, optimizer: OptimizerSpec,
    training: TrainSpec, metric: str, direction: str,
) -> str:
    """The study's name: a digest of everything that defines the objective."""
    lineage = {
        "data_key": data_key, "split": dataset.split_spec().model_dump(mode="json"),
        "space": space.model_dump(mode="json"), "model": model.model_dump(mode="json"),
        "optimizer": optimizer.model_dump(mode="json"), "training": training.model_dump(mode="json"),
        "metric": metric, "direction": direction,
    }
    digest = hashlib.sha256(json.dumps(lineage, sort_keys=True).encode()).hexdigest()
    return f"sweep-{data_key.rsplit('-', 1)[-1][:8]}-{digest[:16]}"


def _rdb_storage(url: str, heartbeat_s: int):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}  # threads and processes share the file
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                # Heartbeats are marked experimental in Optuna; they are how a killed sweep's trials come back.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s, grace_period=3 * heartbeat_s,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
                )
            break
        except (IntegrityError, OperationalError):
            # Another process set up the same new database at the same moment (Optuna creates its
            # tables and stamps its schema version once; the second is refused): open it again.
            if attempt == 2:
                raise
    if url.startswith("sqlite"):
        _write_ahead_log(storage.engine)
    return storage


def _write_ahead_log(engine) -> None:
    """SQLite in write-ahead-log mode, synced at checkpoints: every report, heartbeat and
    tell is a transaction, and a full fsync each (the default) made a trial's bookkeeping
    cost as much as a small training. A crash of the sweep loses nothing committed."""
    from sqlalchemy import event

    def tune(connection, _record) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(engine, "connect", tune)
    engine.dispose()  # connections made before the listener reconnect with it


def open_study(name: str, url: str, spec: SweepSpec):
    """Create the study, or load it to continue (returns it and its storage); trials a
    killed sweep left running are failed and queued again with their parameters."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = spec.pruner.build()
    storage = _rdb_storage(url, spec.heartbeat_s)
    study = optuna.create_study(
        study_name=name, storage=storage, load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=spec.seed), pruner=pruner, direction=spec.resolved_direction(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return study, storage


def remote_trial(link: TrialLink):
    """The Optuna trial ``link`` names, in its shared study, for a run on a worker."""
    import optuna

    from prefect_torch.blocks.sweeps import sweep_database

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(sweep_database(link.storage_block), engine_kwargs={"pool_pre_ping": True})
    study = optuna.load_study(study_name=link.study_name, storage=storage, pruner=link.pruner.build())
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(link.study_name), link.trial_number
    )
    return optuna.trial.Trial(study, trial_id)


def _finished_count(study) -> int:
    """Trials that count towards ``trials``: completed, pruned, or failed by their own error
    (a trial failed by a stale heartbeat is retried instead, so it does not count)."""
    from optuna.trial import TrialState

    count = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            count += 1
        elif trial.state == TrialState.FAIL and "error" in trial.user_attrs:
            count += 1
    return count


@contextmanager
def _heartbeats(storage, every_s: float) -> Iterator[set[int]]:
    """Beat for every trial id in the yielded set until the block ends: a sweep killed
    mid-trial stops beating, and the next run of the sweep retries those trials."""
    alive: set[int] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            with lock:
                ids = list(alive)
            for trial_id in ids:
                try:
                    storage.record_heartbeat(trial_id)
                except Exception:  # noqa: BLE001 - a missed beat is retried next interval
                    pass

    thread = threading.Thread(target=beat, name="sweep-heartbeat", daemon=True)
    thread.start()
    try:
        yield alive
    finally:
        stop.set()
        thread.join(timeout=5)


@contextmanager
def _shared_torch_threads(parallel: int) -> Iterator[None]:
    """Parallel trials in one process share its cores instead of each taking them all."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // parallel))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- one trial ------------------------------------------------------------------------


@dataclass
class TrialOutcome:
    """What one trial run reports back to the sweep."""

    state: Literal["COMPLETE", "PRUNED"]
    value: float | None
    seconds: float
    model_path: str | None = None  # trials on a work pool: their model in shared storage
    test_metrics: dict[str, float] | None = None


def _trial_run_name() -> str:
    from prefect.runtime import task_run

    return f"trial[{task_run.parameters.get('number', '?')}]"


def start_trial(cards, number: int, trial: Any, params: dict[str, Any], splits: Any, model: ModelSpec,
                optimizer: OptimizerSpec, training: TrainSpec, metric: str):
    """One trial in this process: the Train card, submitted to the flow's task runner, on
    the sweep's shared split, reporting each epoch to the Optuna trial.

    The model starts from a fork of the Model Define card's model: trials that share a
    model spec share that card's (cached, live) result, and each must train its own copy.
    The fork's key comes from the define card's, so the same parameters in a later run of
    the sweep are a cache hit of the Train card."""
    define, fit = cards
    model, optimizer, training = apply_params(params, model, optimizer, training)
    handle = define(model, splits).fork()
    return fit.with_options(task_run_name=f"train[trial {number}: {model.short_name()} {optimizer.short_name()}]").submit(
        splits, handle, optimizer, training, callbacks=[ReportToTrial(trial, metric)]
    ), training


@task(name="sweep_trial", task_run_name=_trial_run_name, cache_policy=NO_CACHE, persist_result=False)
def run_trial_on_pool(
    number: int,
    link: TrialLink,
    params: dict[str, Any],
    dataset: DatasetSpec,
    model: ModelSpec,
    optimizer: OptimizerSpec,
    training: TrainSpec,
    spec: SweepSpec,
    storage_block: str | None,
) -> TrialOutcome:
    """One trial as a flow run of the sweep's deployment, on a worker of its work pool."""
    from prefect_torch.deployments.runs import run_and_wait
    from prefect_torch.flows.routing import load_storage, read_stored_result

    started = time.perf_counter()
    model, optimizer, training = apply_params(params, model, optimizer, training)
    path = f"models/sweeps/{link.study_name}/trial-{number}-{uuid.uuid4().hex[:8]}"
    parameters = {
        "dataset": dataset.model_dump(mode="json"), "model": model.model_dump(mode="json"),
        "optimizer": optimizer.model_dump(mode="json"), "training": training.model_dump(mode="json"),
        "storage_block": storage_block, "model_path": path, "trial": link.model_dump(mode="json"),
    }
    try:
        run = run_and_wait(
            spec.deployment or "", parameters, start_timeout_s=spec.start_timeout_s, timeout_s=spec.timeout_s,
            flow_run_name=f"{link.study_name}[trial {number}]",
        )
    except TrainingError:
        pruned_at = remote_trial(link).user_attrs.get(USER_ATTR_PRUNED)
        if pruned_at is None:
            raise
        get_run_logger().info("trial %d pruned after epoch %s on its worker", number, pruned_at)
        return TrialOutcome("PRUNED", None, time.perf_counter() - started)
    stored = read_stored_result(load_storage(storage_block), path)
    _set_attr(link, "run_url", _run_url("flow-run", str(run.id)))
    return TrialOutcome(
        "COMPLETE", trial_value(stored.history, link.metric, training), time.perf_counter() - started,
        model_path=path, test_metrics=stored.metrics,
    )


def _set_attr(link: TrialLink, key: str, value: Any) -> None:
    remote_trial(link).set_user_attr(key, value)


def _run_url(kind: str, run_id: str) -> str:
    from prefect.settings import PREFECT_UI_URL

    base = PREFECT_UI_URL.value()
    return f"{base.rstrip('/')}/runs/{kind}/{run_id}" if base else f"{kind}/{run_id}"


# -- the flow -------------------------------------------------------------------------


def _sweep_run_name() -> str:
    from prefect.runtime import flow_run

    dataset = flow_run.parameters.get("dataset")
    uri = dataset.uri if isinstance(dataset, DatasetSpec) else (dataset or {}).get("uri", "data")
    return f"sweep[{str(uri).rstrip('/').rsplit('/', 1)[-1]}]"


def check_sweep(space: Any, model: ModelSpec, optimizer: OptimizerSpec, training: TrainSpec, spec: SweepSpec) -> SearchSpace:
    """Everything about a sweep that can be refused before any trial runs."""
    parsed = parse_space(space.model_dump() if isinstance(space, SearchSpace) else space)
    check_metric(spec.metric)
    check_space(parsed, model, optimizer, training)
    return parsed


@flow(name="sweep", flow_run_name=_sweep_run_name, log_prints=True, result_serializer="json",
      task_runner=ThreadPoolTaskRunner(max_workers=_MAX_PARALLEL))
def sweep_flow(
    dataset: DatasetSpec,
    space: SearchSpace,
    sweep: SweepSpec = SweepSpec(),
    model: ModelSpec = ModelSpec(),
    optimizer: OptimizerSpec = OptimizerSpec(),
    training: TrainSpec = TrainSpec(),
    storage_block: str | None = None,
    model_name: str | None = None,
) -> SweepResult:
    """Search hyperparameters with an Optuna study whose trials are Train card runs,
    in this flow run or on a work pool; save (and register) the best model.

    Args:
        dataset: The data and how to split it; loaded and split once for every trial.
        space: Hyperparameters to search: a field of the model, optimizer or training
            spec mapped to {log_uniform: [lo, hi]}, {uniform: [lo, hi]}, {int: [lo, hi]}
            or {choice: [...]}.
        sweep: Trials, parallelism, metric, sampler seed, pruner, and where trials run.
        model: The network; the space's model fields vary around it.
        optimizer: The optimizer; the space's optimizer fields vary around it.
        training: The training loop; the space's training fields vary around it.
        storage_block: Saved Torch Storage block for models (shared with the workers when
            trials run on a pool); empty: PREFECT_TORCH_STORAGE_BLOCK, else a local folder.
        model_name: Register the best model under this name in the registry of that storage.
    """
    from prefect.futures import as_completed

    from prefect_torch.blocks.sweeps import sweep_database
    from prefect_torch.tasks import data_load, data_split, evaluate, model_define, train
    from prefect_torch.tasks._common import persisted_in

    logger = get_run_logger()
    space = check_sweep(space, model, optimizer, training, sweep)
    if sweep.deployment:
        from prefect_torch.deployments.runs import check_deployment_available

        problem = check_deployment_available(sweep.deployment)
        if problem is not None:  # before the study gets trials no worker will run
            raise DeviceError(f"The sweep's trials go to {sweep.deployment!r}, but: {problem}")
    # One call: each saves the result storage block on the API, which costs round trips.
    load, split, define, fit, score = persisted_in(None, data_load, data_split, model_define, train, evaluate)
    splits = split(load(dataset.load_spec()), dataset.split_spec())
    problem = splits.info.problem
    if sweep.metric != VAL_LOSS and (sweep.metric == "r2") != (problem == "regression"):
        raise ConfigError(
            f"The sweep metric {sweep.metric!r} is not measured for {problem} problems: use val_loss or "
            f"{'r2' if problem == 'regression' else 'accuracy'}."
        )
    direction = sweep.resolved_direction()
    name = sweep.study_name or study_name_for(
        splits.info.data_key, dataset, space, model, optimizer, training, sweep.metric, direction
    )
    study, storage = open_study(name, sweep_database(sweep.study_storage_block), sweep)
    study_id = storage.get_study_id_from_name(name)
    remaining = max(0, sweep.trials - _finished_count(study))
    where = f"on deployment {sweep.deployment}" if sweep.deployment else "in this flow run"
    logger.info("study %s: %d trials finished, %d to run, %d at a time %s",
                name, sweep.trials - remaining, remaining, sweep.parallel, where)

    run_here: list[int] = []
    first_error: BaseException | None = None
    inflight: dict[Any, tuple[Any, int, float, TrainSpec | None]] = {}
    cards = (define, fit)
    launched = 0
    threads = _shared_torch_threads(sweep.parallel) if not sweep.deployment else nullcontext()
    with threads, _heartbeats(storage, sweep.heartbeat_s) as beating:
        while launched < remaining or inflight:
            # Keep `parallel` trials running.
            while launched < remaining and len(inflight) < sweep.parallel:
                with warnings.catch_warnings():
                    # Optuna expects heartbeats from Study.optimize; the sweep beats for its trials itself.
                    warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
                    trial = study.ask()
                trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
                beating.add(trial_id)
                params = suggest(trial, space)
                launched += 1
                run_here.append(trial.number)
                if sweep.deployment:
                    link = TrialLink(study_name=name, trial_number=trial.number,
                                     storage_block=sweep.study_storage_block, metric=sweep.metric,
                                     pruner=sweep.pruner)
                    future = run_trial_on_pool.submit(trial.number, link, params, dataset, model, optimizer,
                                                      training, sweep, storage_block)
                    trained_with = None
                else:
                    future, trained_with = start_trial(cards, trial.number, trial, params, splits, model,
                                                       optimizer, training, sweep.metric)
                    trial.set_user_attr("run_url", _run_url("task-run", str(future.task_run_id)))
                inflight[future] = (trial, trial_id, time.perf_counter(), trained_with)
            # Record the first trial to finish.
            done = next(iter(as_completed(list(inflight))))
            trial, trial_id, started, trained_with = inflight.pop(done)
            error = _tell(study, trial, _outcome(done, started, trained_with, sweep.metric, trial), logger)
            beating.discard(trial_id)
            if error is not None and first_error is None:
                first_error = error

    trials = summarize(study)
    if not any(t.state == "COMPLETE" for t in trials):
        if first_error is not None:
            raise first_error
        raise TrainingError(f"No trial of study {name} completed; see the failed trials' errors in its table.")
    best = _best(study, dataset, splits, model, optimizer, training, sweep, storage_block, model_name,
                 (define, fit, score))
    result = SweepResult(study_name=name, metric=sweep.metric, direction=direction, best=best, trials=trials,
                         run_here=run_here)
    _publish(result, study, logger)
    return result


def _outcome(future, started: float, training: TrainSpec | None, metric: str, trial) -> TrialOutcome | BaseException:
    """What a finished trial run came to: its outcome, or the exception it raised."""
    try:
        result = future.result()
    except TrialPruned as pruned:
        return TrialOutcome("PRUNED", pruned.value, time.perf_counter() - started)
    except CancelledRun as cancelled:
        # The Train card ends Cancelled when its pruner stopped it (see tasks/train.py).
        if trial.user_attrs.get(USER_ATTR_PRUNED) is not None:
            return TrialOutcome("PRUNED", None, time.perf_counter() - started)
        return cancelled
    except Exception as exc:  # noqa: BLE001 - a failed trial is recorded; the sweep goes on
        return exc
    if isinstance(result, TrialOutcome):
        return result
    try:
        value = trial_value(result.history, metric, training)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001
        return exc
    return TrialOutcome("COMPLETE", value, time.perf_counter() - started)


def _tell(study, trial, outcome: TrialOutcome | BaseException, logger) -> BaseException | None:
    """Record a finished trial run in the study: complete, pruned or failed (with its error)."""
    from optuna.trial import TrialState

    if isinstance(outcome, BaseException):
        exc = outcome
        message = f"{type(exc).__name__}: {exc}"
        trial.set_user_attr("error", message[:2000])
        study.tell(trial, state=TrialState.FAIL)
        logger.warning("trial %d failed: %s", trial.number, message)
        return exc
    trial.set_user_attr("seconds", outcome.seconds)
    if outcome.model_path:
        trial.set_user_attr("model_path", outcome.model_path)
        trial.set_user_attr("test_metrics", outcome.test_metrics or {})
    if outcome.state == "PRUNED":
        study.tell(trial, state=TrialState.PRUNED)
        logger.info("trial %d pruned", trial.number)
    else:
        study.tell(trial, outcome.value)
        logger.info("trial %d: %s = %.6g", trial.number, study.metric_names[0] if study.metric_names else "value",
                    outcome.value)
    return None


def summarize(study) -> list[TrialSummary]:
    summaries = []
    for trial in study.get_trials(deepcopy=False):
        value = trial.value
        if value is None and trial.intermediate_values:
            value = trial.intermediate_values[max(trial.intermediate_values)]
        summaries.append(TrialSummary(
            number=trial.number, params=decode_params(trial.params),
            value=value if value is None or math.isfinite(value) else None, state=trial.state.name,
            seconds=trial.user_attrs.get("seconds"), error=trial.user_attrs.get("error"),
            run_url=trial.user_attrs.get("run_url"),
        ))
    return summaries


def _best(
    study, dataset: DatasetSpec, splits, model: ModelSpec, optimizer: OptimizerSpec, training: TrainSpec,
    sweep: SweepSpec, storage_block: str | None, model_name: str | None, cards,
) -> BestTrial:
    """Save the best trial's model and measure it on the test split; register it if asked."""
    from prefect_torch.flows.routing import load_storage

    logger = get_run_logger()
    best = study.best_trial
    params = decode_params(best.params)
    model, optimizer, training = apply_params(params, model, optimizer, training)
    storage = load_storage(storage_block)
    path = best.user_attrs.get("model_path")
    if path:  # trained on a work pool: its model and test metrics are in shared storage
        metrics = dict(best.user_attrs.get("test_metrics") or {})
        model_uri = storage.url(path)
    else:
        model_uri, metrics, path = _save_best(cards, best.number, study.study_name, splits, model, optimizer, training,
                                              storage)
    logger.info("best trial %d: %s = %.6g; test metrics %s; model at %s", best.number, sweep.metric, best.value,
                metrics, model_uri)
    version, promoted = None, False
    if model_name:
        version, promoted = _register(model_name, path, storage, storage_block, dataset, splits, metrics,
                                      model, optimizer, training, study.study_name, best.number)
    return BestTrial(number=best.number, params=params, value=best.value, metrics=metrics, model_uri=model_uri,
                     registered_version=version, promoted=promoted)


def _save_best(cards, number, study_name, splits, model, optimizer, training, storage):
    """The Train card again (a cache hit: the trial trained it, from the same fork of the
    defined model), evaluated on the test split and saved to storage."""
    import tempfile
    from pathlib import Path

    from prefect_torch.flows.routing import model_upload
    from prefect_torch.flows.train import model_save

    define, fit, score = cards
    trained = fit(splits, define(model, splits).fork(), optimizer, training)
    metrics = score(trained.model, splits, "test")
    path = f"models/sweeps/{study_name}/trial-{number}"
    extra = {"metrics": metrics, "history": trained.history, "optimizer_spec": optimizer.model_dump(mode="json"),
             "training_spec": training.model_dump(mode="json"), "loss": trained.loss}
    with tempfile.TemporaryDirectory(prefix="prefect-torch-sweep-") as scratch:
        output = storage.url(path) if storage.is_local else str(Path(scratch) / "model")
        uri = model_save(trained.model, splits, output, extra)
        if not storage.is_local:
            uri = model_upload(uri, storage, path)
    return uri, metrics, path


def _register(model_name, path, storage, storage_block, dataset, splits, metrics, model, optimizer, training,
              study_name, number) -> tuple[int, bool]:
    """Register the best model; it becomes the champion only by the retrain flow's rule
    (better than the champion on the same held-out rows, by the promotion margin)."""
    from prefect.runtime import flow_run

    from prefect_torch.blocks.registry import ModelRegistry, RegistryConflictError
    from prefect_torch.flows.retrain import PromotionSpec, _metric_for, decide
    from prefect_torch.flows.routing import _code_version, evaluate_stored, heldout_rows

    logger = get_run_logger()
    promotion = PromotionSpec()
    registry = ModelRegistry(storage=storage)
    champion = registry.current_alias(model_name, promotion.alias)
    metric = _metric_for(splits.info.problem, promotion.metric, metrics)
    champion_score = None
    if champion is not None:
        rows = heldout_rows(dataset)
        champion_model = registry.get_version(model_name, champion.version)
        champion_score = evaluate_stored(storage, champion_model.model_path, rows, "champion").get(metric)
    promote, reason = decide(metric, metrics[metric], champion_score, promotion.min_improvement)
    version = registry.register(
        model_name, path, metrics=metrics, problem=splits.info.problem, data_key=splits.info.data_key,
        dataset_uri=dataset.uri,
        specs={"dataset": dataset.model_dump(mode="json"), "model": model.model_dump(mode="json"),
               "optimizer": optimizer.model_dump(mode="json"), "training": training.model_dump(mode="json"),
               "sweep": {"study": study_name, "trial": number}},
        code_version=_code_version(), description=f"Best trial {number} of sweep {study_name}. {reason}",
        flow_run_id=str(flow_run.id) if flow_run.id else None,
    )
    if promote:
        try:
            registry.set_alias(model_name, promotion.alias, version.version,
                               expected_version=champion.version if champion else None,
                               reason=reason, flow_run_id=version.flow_run_id)
        except RegistryConflictError as exc:
            promote, reason = False, f"{reason} Not promoted: {exc}"
    logger.info("registered %s version %d; %s", model_name, version.version, reason)
    return version.version, promote


def _publish(result: SweepResult, study, logger) -> None:
    from prefect_torch.reporting.publish import Publisher, artifact_key
    from prefect_torch.reporting.sweep import sweep_markdown, trial_rows

    publisher = Publisher(logger)
    key = artifact_key("sweep", result.study_name)
    publisher.table(f"{key}-trials", trial_rows(result.trials), description=f"Trials of study {result.study_name}")
    publisher.markdown(f"{key}-summary", sweep_markdown(result, _importances(study)),
                       description=f"Sweep {result.study_name}: best trial and what mattered")


def _importances(study) -> dict[str, float]:
    """Optuna's parameter importances (fANOVA); empty while too few trials completed."""
    import optuna

    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):
        return {}


__all__ = [
    "sweep_flow", "check_sweep", "study_name_for", "open_study", "remote_trial", "summarize",
    "SweepSpec", "PrunerSpec", "SweepResult", "TrialSummary", "BestTrial", "TrialOutcome",
]
