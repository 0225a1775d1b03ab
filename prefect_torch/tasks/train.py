"""The Train card (CPU and GPU): the whole loop in one task, the fast path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger, task
from prefect.states import Cancelled

from prefect_torch.engine.handles import ModelHandle
from prefect_torch.engine.loop import Callback, EpochRecord, Trainer, TrainSpec
from prefect_torch.engine.optim import OptimizerSpec, build_optimizer
from prefect_torch.engine.split import Splits
from prefect_torch.engine.records import Recordable
from prefect_torch.reporting import TrainingReport
from prefect_torch.engine.checkpoint import CheckpointCallback, checkpoint_key, resume_trainer
from prefect_torch.engine.distributed import ParallelTrainer, is_parallel, lineage_spec
from prefect_torch.engine.fileio import join
from prefect_torch.errors import TrainingStopped
from prefect_torch.tasks._common import coarse_card, default_checkpoints_root
from prefect_torch.tasks.lineage import Lineage


@dataclass
class TrainOutput(Recordable):
    """What the Train card returns; persisted as the model's weights plus JSON."""

    model: ModelHandle
    history: list[dict[str, Any]]
    stop_reason: str | None
    seconds: float
    steps: int
    device: str
    loss: str
    extras: dict[str, Any] = field(default_factory=dict)

    def __record__(self):
        tensors, model_meta = self.model.__record__()
        meta = {k: getattr(self, k) for k in ("history", "stop_reason", "seconds", "steps", "device", "loss", "extras")}
        return tensors, {"model": model_meta, **meta}

    @classmethod
    def __from_record__(cls, tensors, meta):
        meta = dict(meta)
        model = ModelHandle.__from_record__(tensors, meta.pop("model"))
        return cls(model=model, **meta)


class LogEpochs(Callback):
    """One Prefect log line per epoch: losses, metric, LR and throughput."""

    def __init__(self, logger):
        self.logger = logger

    def on_epoch_end(self, trainer: Trainer, record: EpochRecord) -> None:
        metric = " ".join(f"{k}={v:.4f}" for k, v in record.val_metrics.items())
        val = f" val_loss={record.val_loss:.5f}" if record.val_loss is not None else ""
        self.logger.info(
            "epoch %d/%d train_loss=%.5f%s %s lr=%.3g %.0f samples/s",
            record.epoch, trainer.spec.epochs, record.train_loss, val, metric, record.lr, record.samples_per_s,
        )


def _train_run_name() -> str:
    from prefect.runtime import task_run

    params = task_run.parameters
    model, optimizer = params["model"], params["optimizer"]
    name = model.spec.short_name() if isinstance(model, ModelHandle) else "model"
    opt = optimizer.short_name() if isinstance(optimizer, OptimizerSpec) else "optimizer"
    return f"train[{name} {opt}]"


# Callbacks watch the run; they do not change its result, so they are not part of the key.
@task(name="train", task_run_name=_train_run_name,
      **coarse_card("1", cache_policy=Lineage(code_version="1", ignore=("callbacks",))))
def train(
    splits: Splits,
    model: ModelHandle,
    optimizer: OptimizerSpec = OptimizerSpec(),
    training: TrainSpec = TrainSpec(),
    callbacks: list[Callback] | None = None,
) -> TrainOutput:
    """Train (CPU / GPU): epochs of shuffled batches with accumulation, clipping,
    LR schedule, validation and early stopping, in one task.

    Runs on CUDA when ``training.device`` is 'cuda' (or 'auto' with a GPU); with
    ``training.processes`` > 1 (or ``nodes`` > 1) data-parallel on that many processes.
    """
    logger = get_run_logger()
    module = model.model
    report = TrainingReport(model.spec, optimizer, logger=logger)
    # Checkpoints are filed by the run's lineage, so a re-run after a crash finds them.
    checkpoints = join(default_checkpoints_root(), checkpoint_key(model.key, optimizer, lineage_spec(training)))
    if is_parallel(training):
        # Worker processes train (DDP); rank 0 checkpoints, its events reach these callbacks here.
        trainer = ParallelTrainer(module, model.spec, model.in_features, model.out_features, optimizer, splits,
                                  training, checkpoints, [LogEpochs(logger), report, *(callbacks or [])], log=logger)
    else:
        optim = build_optimizer(optimizer, module.to(_device(training)))
        trainer = Trainer(module, optim, splits, training,
                          [LogEpochs(logger), report, CheckpointCallback(checkpoints), *(callbacks or [])])
        resumed = resume_trainer(checkpoints, trainer, log=logger)
        if resumed is not None:
            logger.info("resuming from the checkpoint after %d steps (epoch %d, batch %d) in %s",
                        resumed.step, resumed.epoch + 1, resumed.batch, checkpoints)
    logger.info(
        "training %s with %s on %s: %d rows, %d epochs, %d steps/epoch",
        model.spec.short_name(), optimizer.short_name(), trainer.device,
        len(splits.train), training.epochs, trainer.steps_per_epoch,
    )
    try:
        with report.running(trainer):  # progress while it runs; history, curves and summary at the end
            result = trainer.fit()
    except TrainingStopped as stopped:
        # Stopped on purpose (a pruned sweep trial): one line in the UI, no traceback, nothing cached.
        logger.info("stopped: %s", stopped)
        return Cancelled(message=str(stopped))
    logger.info("stopped: %s", result.stop_reason)
    trained = model.advance(
        "train", {"optimizer": optimizer.model_dump(mode="json"), "training": training.model_dump(mode="json")},
        splits.key,
    )
    return TrainOutput(
        model=trained,
        history=result.history,
        stop_reason=result.stop_reason,
        seconds=result.seconds,
        steps=result.state.step,
        device=str(trainer.device),
        loss=trainer.loss_name,
    )


def _device(training: TrainSpec):
    from prefect_torch.engine.device import resolve_device

    return resolve_device(training.device)
