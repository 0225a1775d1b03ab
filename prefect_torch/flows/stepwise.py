"""The step-wise flow: the training loop opened up into one Prefect task per card.

model_define → training_init_optimizer → for each epoch, for each batch:
training_prepare_batch → training_zero_grad → training_forward → training_loss
→ [after_loss] → training_backward → [after_backward] → training_optimizer_step
→ [training_lr_schedule] → [after_step]; at each epoch end the validation
(``training_epoch_end``), the LR schedule and a checkpoint; at the end, evaluate
on the test split and save the model as ``train_flow`` does.

Each epoch runs as a nested flow run (``epoch 1/2``, ...): the run's graph shows
the loop's structure at its top level, and a batch's cards are one click into
their epoch. The run publishes what ``train_flow`` publishes (progress, per-epoch
history, loss curves, a summary, the model card and the model asset made from the
dataset asset), plus the training loss of every optimizer step: a table in each
epoch's run and a curve over the whole run.

One engine, two drivers: the loop state, batching plan, epoch end, schedule,
early stopping and checkpoints are the fast path's ``Trainer``; this flow only
replaces its inner batch loop by cards. With the same specs and seed both flows
end with bitwise-identical weights on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import logging
import math
import time
from typing import Any

import torch
from prefect import Flow, Task, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import opaque
from pydantic.json_schema import SkipJsonSchema

from prefect_torch.engine.batching import BatchPlan
from prefect_torch.tasks._common import default_checkpoints_root
from prefect_torch.engine.checkpoint import checkpoint_key, checkpoint_trainer, resume_trainer
from prefect_torch.engine.device import resolve_device
from prefect_torch.engine.fileio import join
from prefect_torch.engine.data import drop_early_reads
from prefect_torch.engine.handles import ModelHandle, OptimizerHandle
from prefect_torch.engine.loop import Callback, EpochRecord, Trainer, TrainSpec
from prefect_torch.engine.models import ModelSpec, count_parameters
from prefect_torch.engine.optim import OptimizerSpec
from prefect_torch.engine.split import Splits
from prefect_torch.errors import ConfigError
from prefect_torch.flows.params import DatasetSpec, TrainFlowResult
from prefect_torch.flows.storage import default_models_root
from prefect_torch.flows.train import materializing_model_save
from prefect_torch.reporting import TrainingReport, current_run_name, publish_model_card
from prefect_torch.reporting.plot import loss_scale_note, step_loss_markdown
from prefect_torch.reporting.publish import Publisher, artifact_key, never_fails
from prefect_torch.reporting.tables import MAX_TABLE_ROWS, thin
from prefect_torch.reporting.text import table_cell
from prefect_torch.tasks import (
    data_load,
    data_split,
    evaluate,
    model_define,
    training_backward,
    training_forward,
    training_init_optimizer,
    training_loss,
    training_lr_schedule,
    training_optimizer_step,
    training_prepare_batch,
    training_zero_grad,
)
from prefect_torch.tasks.train import LogEpochs

# -- user steps -----------------------------------------------------------------
#
# A user step is any Prefect task, called positionally at its point of the loop:
#
#   after_loss(loss, model, batch_data)          -> the loss to backpropagate (a scalar tensor)
#   after_backward(model, batch_data)            -> None, or a new ModelHandle if it changed the model
#   after_step(model, optimizer, step_info)      -> None, or a new OptimizerHandle if it changed the optimizer
#
# e.g. add an L1 penalty to the loss, log gradient statistics, change the learning rate.


@dataclasses.dataclass(frozen=True)
class UserSteps:
    """The user's tasks to run between cards (see the table above)."""

    after_loss: Task | None = None
    after_backward: Task | None = None
    after_step: Task | None = None

    def lineage(self) -> dict[str, str]:
        """What identifies the steps for checkpoint lineage: their task keys (name + code hash)."""
        return {name: step.task_key for name, step in self._steps() if step is not None}

    def _steps(self):
        return (("after_loss", self.after_loss), ("after_backward", self.after_backward),
                ("after_step", self.after_step))

    def check(self) -> None:
        for name, step in self._steps():
            if step is not None and not isinstance(step, Task):
                raise ConfigError(
                    f"{name} must be a Prefect task; got {type(step).__name__}. Decorate the function with "
                    "@task (from prefect import task) and pass the task."
                )


# -- naming task runs by loop position ---------------------------------------------


class _Cursor:
    """Where the loop is, for task-run names: epoch (1-based) and batch, or epoch end."""

    def __init__(self) -> None:
        self.epoch = 1
        self.batch: int | None = None

    def label(self) -> str:
        return f"e{self.epoch}" if self.batch is None else f"e{self.epoch}-b{self.batch}"


class _RunName:
    """``card[e2-b17]``: a task_run_name callable reading the cursor when the run starts."""

    # Prefect inspects the callable's signature on every run to see whether it wants the
    # parameters; a ready-made one spares resolving ``__call__`` each time.
    __signature__ = inspect.Signature()

    def __init__(self, name: str, cursor: _Cursor):
        self.name, self.cursor = name, cursor

    def __call__(self) -> str:
        return f"{self.name}[{self.cursor.label()}]"


def _named(card: Task, cursor: _Cursor) -> Task:
    return card.with_options(task_run_name=_RunName(card.name, cursor))


# -- flow-level tasks ---------------------------------------------------------------


@task(name="training_epoch_end", cache_policy=NO_CACHE, persist_result=False)
def training_epoch_end(trainer: Trainer, model: ModelHandle) -> EpochRecord:
    """Epoch end: validation loss and metric on the validation split, recorded in the history."""
    model.model  # the trainer validates the live model: refuse a stale handle
    return trainer.record_epoch()


@task(name="training_checkpoint", cache_policy=NO_CACHE, persist_result=False)
def training_checkpoint(trainer: Trainer, uri: str) -> str:
    """Checkpoint: model, optimizer, scheduler, RNG and loop state (safetensors + JSON)."""
    return checkpoint_trainer(uri, trainer)


class _CheckpointAsTask(Callback):
    """The Trainer's checkpoint hook, run as a visible ``training_checkpoint`` task."""

    def __init__(self, uri: str, cursor: _Cursor):
        self.uri = uri
        self.card = _named(training_checkpoint, cursor)

    def on_checkpoint(self, trainer: Trainer) -> None:
        self.card(opaque(trainer), self.uri)


# -- the driver ---------------------------------------------------------------------


class StepwiseLoop:
    """Drives a Trainer batch by batch through the step cards.

    The cards are the only code that touches the model and optimizer per batch;
    the Trainer supplies the plan, the counters and the epoch-end logic.

    Arguments go to the cards wrapped in ``opaque``: Prefect still links each task
    run to the runs that produced its inputs, but does not walk into handles,
    batches and tensors looking for nested futures (that walk was most of a
    card's overhead beyond an empty task's).
    """

    def __init__(
        self,
        trainer: Trainer,
        splits: Splits,
        model: ModelHandle,
        optimizer: OptimizerHandle,
        user_steps: UserSteps,
        cursor: _Cursor,
    ):
        self.trainer, self.spec = trainer, trainer.spec
        self.model, self.optimizer = model, optimizer
        self.user_steps = user_steps
        self.cursor = cursor
        # The cards read batches from the trainer's copy of the data (on its device).
        self.splits = opaque(dataclasses.replace(splits, train=trainer.train_data, val=trainer.val_data))
        self.prepare_batch = _named(training_prepare_batch, cursor)
        self.zero_grad = _named(training_zero_grad, cursor)
        self.forward = _named(training_forward, cursor)
        self.loss = _named(training_loss, cursor)
        self.backward = _named(training_backward, cursor)
        self.optimizer_step = _named(training_optimizer_step, cursor)
        self.lr_schedule = _named(training_lr_schedule, cursor)
        self.epoch_end = _named(training_epoch_end, cursor)
        self.after_loss = _maybe_named(user_steps.after_loss, cursor)
        self.after_backward = _maybe_named(user_steps.after_backward, cursor)
        self.after_step = _maybe_named(user_steps.after_step, cursor)
        #: (optimizer step, mean training loss of the batches it applied), every step of this run.
        self.step_losses: list[tuple[int, float]] = []
        self._group_losses: list[float] = []
        self.step_losses_key: str | None = None  # set to publish each epoch's steps as a table
        self.quiet: _QuietCompletions | None = None  # the log filter of the running loop

    def run(self) -> None:
        """Every remaining epoch, each as a nested flow run (``epoch_flow``)."""
        epoch_flow = self.epoch_flow()
        with _long_lived_objects_frozen(), _step_card_completions_quiet(PER_BATCH_CARDS) as quiet:
            self.quiet = quiet
            self.trainer.begin()
            while self.trainer.running:
                epoch_flow(epoch=self.trainer.state.epoch + 1, epochs=self.spec.epochs)

    def epoch_flow(self) -> Flow:
        """The flow one epoch runs in: its batch cards, validation, schedule and checkpoint
        become that flow run's task runs, so the parent run's graph shows one node per epoch."""
        loop = self

        @flow(name="train-stepwise-epoch", flow_run_name="epoch {epoch}/{epochs}", persist_result=False,
              validate_parameters=False, log_prints=True)
        def train_stepwise_epoch(epoch: int, epochs: int) -> None:
            """One epoch of the step-wise flow: every batch's cards, then the epoch end."""
            if loop.quiet is not None:
                loop.quiet.also_in_current_run()  # the per-batch cards stay quiet in here too
            first = len(loop.step_losses)
            loop.run_epoch()
            loop.publish_epoch_steps(epoch, loop.step_losses[first:])

        return train_stepwise_epoch

    def publish_epoch_steps(self, epoch: int, steps: list[tuple[int, float]]) -> None:
        """This epoch's per-step training loss, as a table on the epoch's flow run."""
        if self.step_losses_key is None or not steps:
            return
        with never_fails("per-step loss table"):
            rows = [{"step": step, "train_loss": table_cell(loss)} for step, loss in steps]
            shown = thin(rows, MAX_TABLE_ROWS)
            covers = f"{len(rows):,} steps" if len(shown) == len(rows) else f"{len(shown)} of {len(rows):,} steps"
            Publisher().table(
                self.step_losses_key, shown,
                f"Training loss of each optimizer step in epoch {epoch} ({covers}; the mean over the step's batches).",
            )

    def run_epoch(self) -> None:
        trainer, state = self.trainer, self.trainer.state
        started = time.perf_counter()
        loss_sum = 0.0  # this stretch's summed loss x rows, folded into the state like the fast loop does
        for plan in trainer.plans[state.batch:]:
            loss_sum += self.run_batch(plan)
            if plan.closes_group:
                self.finish_group(plan)
                if trainer.mid_epoch_checkpoint_due():
                    state.epoch_loss_sum += loss_sum
                    loss_sum = 0.0
                    now = time.perf_counter()
                    state.epoch_seconds += now - started
                    started = now
                    trainer.emit("on_checkpoint")
        state.epoch_loss_sum += loss_sum
        state.epoch_rows = len(trainer.train_data)
        state.epoch_seconds += time.perf_counter() - started
        self.end_epoch()

    def run_batch(self, plan: BatchPlan) -> float:
        """Prepare, (zero), forward, loss, backward one batch; returns its loss x rows."""
        self.cursor.epoch, self.cursor.batch = self.trainer.state.epoch + 1, plan.index
        spec = self.spec
        batch, _ = self.prepare_batch(
            self.splits, batch_index=plan.index, batch_size=spec.batch_size, epoch=self.cursor.epoch,
            seed=spec.seed, shuffle=spec.shuffle, accumulate=spec.accumulate,
        )
        if plan.opens_group:
            self.optimizer = self.zero_grad(opaque(self.optimizer))
        predictions, self.model = self.forward(opaque(self.model), opaque(batch))
        loss, loss_value = self.loss(opaque(predictions), opaque(batch), self.trainer.loss_name)
        if self.after_loss is not None:
            loss = self.after_loss(opaque(loss), opaque(self.model), opaque(batch))
            if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
                raise ConfigError(
                    f"after_loss ({self.after_loss.name}) must return the loss to backpropagate as a "
                    f"scalar tensor; it returned {type(loss).__name__} {getattr(loss, 'shape', '')}."
                )
            loss_value = float(loss.detach())
        self._group_losses.append(float(loss_value))
        if not math.isfinite(loss_value):
            self.trainer.check_finite(loss, plan)  # raises the loop's TrainingError with its advice
        self.model, _ = self.backward(opaque(loss), opaque(self.model), loss_scale=plan.loss_scale)
        if self.after_backward is not None:
            self.model = _updated(self.after_backward(opaque(self.model), opaque(batch)), self.model)
        return loss_value * batch.rows

    def finish_group(self, plan: BatchPlan) -> None:
        """Optimizer step, LR schedule (per step) and the user's after_step, then count it."""
        trainer = self.trainer
        self.model, self.optimizer, step_info = self.optimizer_step(
            opaque(self.optimizer), opaque(self.model), gradient_clip=self.spec.clip or 0.0, step=trainer.state.step + 1
        )
        trainer.count_step(plan)
        self.step_losses.append((trainer.state.step, sum(self._group_losses) / len(self._group_losses)))
        self._group_losses = []
        if trainer.scheduler_due("step"):
            self.optimizer, _ = self.lr_schedule(opaque(self.optimizer), opaque(trainer.scheduler))
        if self.after_step is not None:
            self.optimizer = _updated(
                self.after_step(opaque(self.model), opaque(self.optimizer), step_info), self.optimizer
            )
        trainer.emit("on_step_end")

    def end_epoch(self) -> None:
        """Validate and record, schedule (per epoch), then early stopping and the checkpoint."""
        trainer = self.trainer
        self.cursor.batch = None
        record = self.epoch_end(opaque(trainer), opaque(self.model))
        if trainer.scheduler_due("epoch"):
            self.optimizer, _ = self.lr_schedule(
                opaque(self.optimizer), opaque(trainer.scheduler), val_loss=record.val_loss
            )
        trainer.close_epoch(record)


@contextlib.contextmanager
def _long_lived_objects_frozen():
    """Keep the cyclic garbage collector off the objects that exist before the loop.

    Every card call leaves a few hundred short-lived Prefect objects behind, and the
    full collections they trigger walk each of the ~600k long-lived objects of torch,
    pandas and Prefect: measured, that cost more per card than Prefect's own task
    overhead. Frozen objects are still freed by reference counting; unfreezing at the
    end hands them back to the collector.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


#: The cards a step-wise loop runs for every batch (or optimizer step).
PER_BATCH_CARDS = frozenset(card.name for card in (
    training_prepare_batch, training_zero_grad, training_forward, training_loss,
    training_backward, training_optimizer_step, training_lr_schedule,
))


class _QuietCompletions(logging.Filter):
    """Drops the "Finished in state Completed()" line of this flow run's per-batch cards
    (and of the epoch flow runs below it: ``also_in_current_run``).

    Six of them per batch bury the epoch lines in the console and the run's log, and
    each is shipped to the server and stored. Their task runs and states still show
    in the UI; failures still log (at ERROR); at DEBUG level nothing is dropped.
    """

    def __init__(self, flow_run_id: str | None, cards: frozenset[str]):
        super().__init__()
        self.flow_run_ids = {flow_run_id} if flow_run_id else set()
        self.cards = cards

    def also_in_current_run(self) -> None:
        """Quiet the cards of the flow run now active too (an epoch's nested run)."""
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        if context is not None and context.flow_run is not None:
            self.flow_run_ids.add(str(context.flow_run.id))

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno == logging.INFO
            and getattr(record, "task_name", None) in self.cards
            and getattr(record, "flow_run_id", None) in self.flow_run_ids
            and not logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        )


@contextlib.contextmanager
def _step_card_completions_quiet(cards: frozenset[str]):
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        yield _QuietCompletions(None, cards)  # no flow run to attribute lines to: leave logging alone
        return
    task_runs = logging.getLogger("prefect.task_runs")
    quiet = _QuietCompletions(str(context.flow_run.id), cards)
    task_runs.addFilter(quiet)
    try:
        yield quiet
    finally:
        task_runs.removeFilter(quiet)


def _maybe_named(step: Task | None, cursor: _Cursor) -> Task | None:
    return None if step is None else _named(step, cursor)


def _updated(returned: Any, current: Any) -> Any:
    """A user step's returned handle replaces the current one; anything else leaves it."""
    return returned if isinstance(returned, type(current)) else current


# -- the flow -----------------------------------------------------------------------


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    dataset = flow_run.parameters.get("dataset")
    uri = dataset.uri if isinstance(dataset, DatasetSpec) else (dataset or {}).get("uri", "data")
    return f"train-stepwise[{str(uri).rstrip('/').rsplit('/', 1)[-1]}]"


def _check_supported(training: TrainSpec) -> None:
    if training.processes > 1 or training.nodes > 1:
        raise ConfigError(
            f"The step-wise flow runs every batch as its own card in one process, so it cannot train on "
            f"processes={training.processes} x nodes={training.nodes}. Set processes=1 and nodes=1, or use "
            "train_flow, whose Train card launches the data-parallel processes."
        )
    if training.compile:
        raise ConfigError("The step-wise flow runs the model eagerly; set compile=False or use train_flow.")
    if training.precision != "fp32":
        raise ConfigError(
            f"The step-wise flow trains in fp32; got precision={training.precision!r}. "
            "Set precision='fp32' or use train_flow for bf16."
        )


@flow(name="train-stepwise", flow_run_name=_flow_run_name, log_prints=True)
def stepwise_train_flow(
    dataset: DatasetSpec,
    model: ModelSpec = ModelSpec(),
    optimizer: OptimizerSpec = OptimizerSpec(),
    training: TrainSpec = TrainSpec(),
    output: str | None = None,
    checkpoint_dir: str | None = None,
    resume: bool = True,
    after_loss: SkipJsonSchema[Task | None] = None,
    after_backward: SkipJsonSchema[Task | None] = None,
    after_step: SkipJsonSchema[Task | None] = None,
) -> TrainFlowResult:
    """Train batch by batch, one Prefect task per card, evaluate on the test split and
    save the model (safetensors + JSON). Ends bitwise-equal to ``train_flow`` on CPU.

    Args:
        dataset: Where the data is (local path or s3:// URL), the target column and how to split it.
        model: The network to train.
        optimizer: Optimizer (adam, adamw, sgd, rmsprop), learning rate, weight decay and momentum.
        training: Epochs, batching, accumulation, clipping, schedule, stopping, checkpoints.
        output: Folder (or URL) to save the model to; under the Prefect home when empty.
        checkpoint_dir: Folder (or URL) for this run's checkpoints, filed by lineage; under the Prefect home when empty.
        resume: Continue from the newest checkpoint of the same lineage, if there is one.
        after_loss: Python callers only: a task (loss, model, batch_data) -> loss, run after Calculate Loss.
        after_backward: Python callers only: a task (model, batch_data) run after Backward Pass.
        after_step: Python callers only: a task (model, optimizer, step_info) run after Optimizer Step.
    """
    flow_started = time.perf_counter()
    logger = get_run_logger()
    _check_supported(training)
    user_steps = UserSteps(after_loss, after_backward, after_step)
    user_steps.check()
    table = data_load(dataset.load_spec())
    # A cached Load took neither the bytes its fingerprint read nor an early read; the
    # early split of the table Load returned stays for Data Split.
    drop_early_reads(kept_for=table)
    splits = data_split(table, dataset.split_spec())
    drop_early_reads()  # a cached Split did not take it
    handle = model_define(model, splits)
    # The optimizer is built on the training device, as the Train card builds it.
    handle.model.to(resolve_device(training.device))
    opt = training_init_optimizer(handle, optimizer)

    lineage = checkpoint_key(handle.key, optimizer, training, user_steps.lineage())
    checkpoints = join(checkpoint_dir or default_checkpoints_root(), lineage)
    cursor = _Cursor()
    # The fast path's report: progress while the epochs run; history, loss curves and summary at the end.
    report = TrainingReport(model, optimizer, logger=logger,
                            model_note="saved by this flow's model_save task; see the model card")
    trainer = Trainer(handle.model, opt.live, splits, training,
                      [LogEpochs(logger), report, _CheckpointAsTask(checkpoints, cursor)])
    if resume and (state := resume_trainer(checkpoints, trainer, log=logger)) is not None:
        # The checkpoint was loaded into the live model and optimizer: both moved on.
        handle = handle.advance("resume", state.step)
        opt = opt.advance("resume")
        logger.info("resumed from %s: epoch %d, batch %d, %d steps taken",
                    checkpoints, state.epoch + 1, state.batch, state.step)
    logger.info(
        "training %s with %s on %s, step by step: %d rows, %d epochs, %d steps/epoch; checkpoints in %s",
        model.short_name(), optimizer.short_name(), trainer.device, len(splits.train),
        training.epochs, trainer.steps_per_epoch, checkpoints,
    )

    loop = StepwiseLoop(trainer, splits, handle, opt, user_steps, cursor)
    loop.step_losses_key = artifact_key(report.scope, "train-step-losses")
    started = time.perf_counter()
    with report.running(trainer):  # finish inside, as Trainer.fit does: the report reads the stop reason
        loop.run()
        result = trainer.finish(time.perf_counter() - started)
    logger.info("stopped: %s", result.stop_reason)
    scale_note = loss_scale_note(splits.info.problem, splits.info.target_std)
    if loop.step_losses:
        with never_fails("per-step loss curve", logger):
            Publisher(logger).markdown(
                artifact_key(report.scope, "train-step-loss-curve"),
                step_loss_markdown(loop.step_losses, trainer.loss_name, trainer.steps_per_epoch, scale_note),
                f"Training loss of every optimizer step of {current_run_name('train-stepwise')}.",
            )
    trained = loop.model
    if result.restored_best:
        trained = trained.advance("restore_best_weights", result.state.best_epoch)
    # Filed under its lineage, not the chain of card calls, so a resumed run saves where
    # an uninterrupted one would.
    trained = dataclasses.replace(trained, key=lineage)

    metrics = evaluate(trained, splits, "test")
    extra = {
        "metrics": metrics,
        "history": result.history,
        "optimizer_spec": optimizer.model_dump(mode="json"),
        "training_spec": training.model_dump(mode="json"),
        "loss": trainer.loss_name,
    }
    # Saved as train_flow saves: the model asset, made from the dataset asset.
    destination = output or join(default_models_root(), trained.key)
    model_uri = materializing_model_save(destination, model, dataset.uri)(trained, splits, destination, extra)
    logger.info("test metrics: %s; model saved to %s",
                ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), model_uri)
    publish_model_card(
        logger, title=current_run_name("train-stepwise"), dataset_uri=dataset.uri, data_key=splits.info.data_key,
        rows=splits.info.rows, problem=splits.info.problem, loss=trainer.loss_name, model_spec=model,
        parameters=count_parameters(trained.model), optimizer=optimizer, device=str(trainer.device),
        history=result.history, epochs=training.epochs, steps=result.state.step, stop_reason=result.stop_reason,
        metrics=metrics, model_uri=model_uri, seconds=time.perf_counter() - flow_started,
        train_seconds=result.seconds, target_std=splits.info.target_std,
    )
    return TrainFlowResult(
        metrics=metrics,
        history=result.history,
        model_uri=model_uri,
        problem=splits.info.problem,
        loss=trainer.loss_name,
        stop_reason=result.stop_reason,
        data_key=splits.info.data_key,
        device=str(trainer.device),
        steps=result.state.step,
        train_seconds=result.seconds,
    )
