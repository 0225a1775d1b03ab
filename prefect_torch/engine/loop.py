"""The fast training loop.

It knows nothing of Prefect: side concerns (progress, artifacts, checkpoints)
arrive as callbacks. Its per-batch work is the same sequence of ``steps``
functions the step-wise cards run, over the same ``batching`` plan.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from prefect_torch.engine import steps
from prefect_torch.engine.batching import BatchPlan, num_batches, plan_epoch
from prefect_torch.engine.compilation import CompiledForward
from prefect_torch.engine.cudagraph import CudaGraphs, StepFn, make_step
from prefect_torch.engine.device import DeviceChoice, check_precision, resolve_device
from prefect_torch.engine.metrics import PRIMARY_METRIC, compute_metrics
from prefect_torch.engine.optim import SchedulerSpec, build_scheduler, current_lr, step_scheduler
from prefect_torch.engine.problem import LossName, resolve_loss
from prefect_torch.engine.split import Splits, TensorSplit
from prefect_torch.engine.spec import Spec
from prefect_torch.engine.streaming import DataPlacement, choose_placement, make_source, resident_bytes
from prefect_torch.errors import ConfigError, TrainingError

logger = logging.getLogger(__name__)


class TrainSpec(Spec):
    """How to train: epochs, batching, accumulation, clipping, schedule, stopping, device."""

    epochs: int = Field(default=10, ge=1, le=1_000_000, description="Passes over the training split.")
    batch_size: int = Field(default=64, ge=1, description="Rows per batch.")
    accumulate: int = Field(
        default=1, ge=1, description="Batches whose gradients are accumulated before each optimizer step."
    )
    clip: float | None = Field(default=None, gt=0.0, description="Clip the gradient norm to this value; off when empty.")
    loss: LossName = Field(default="auto", description="Loss; 'auto' picks mse / bce / cross_entropy from the problem.")
    # A default value (pydantic copies it per instance), not a factory: the UI form shows defaults only.
    scheduler: SchedulerSpec = Field(default=SchedulerSpec(), title="Scheduler", description="Learning-rate schedule.")
    early_stopping_patience: int | None = Field(
        default=None, ge=1, description="Stop after this many epochs without validation improvement; off when empty."
    )
    min_delta: float = Field(default=0.0, ge=0.0, description="Smallest validation-loss drop that counts as improvement.")
    restore_best: bool = Field(default=True, description="With early stopping, end with the best epoch's weights.")
    shuffle: bool = Field(default=True, description="Shuffle the training rows every epoch.")
    seed: int = Field(default=0, ge=0, description="Seed of shuffling and dropout.")
    device: DeviceChoice = Field(default="auto", description="auto (CUDA when available), cpu or cuda.")
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32", description="fp32, or bf16 autocast (CUDA GPUs from A100/H100 on; also works on CPU)."
    )
    compile: bool = Field(
        default=False,
        description="Compile the model with torch.compile (needs a C++ compiler on CPU, Triton on CUDA); "
        "fails with a DeviceError naming the fix where it cannot compile.",
    )
    data_placement: DataPlacement = Field(
        default="auto",
        description="resident: copy the training data to the device once; stream: keep it in host memory "
        "and copy batches ahead in the background (for data larger than GPU memory); auto: resident "
        "when it fits in half the free GPU memory.",
    )
    cuda_graphs: CudaGraphs = Field(
        default="auto",
        description="On CUDA, capture the training step once as CUDA graphs and replay it (forward, backward, "
        "clipping and the fused optimizer step in one launch; the ragged last batch runs eagerly). auto: "
        "capture where possible, else train eagerly and log why; on: fail with a DeviceError naming why "
        "it cannot capture; off: always the eager step. No effect on CPU.",
    )
    checkpoint_every: int | None = Field(
        default=None, ge=1, description="Checkpoint every N optimizer steps; at each epoch end when empty."
    )
    progress_every: int | None = Field(
        default=None, ge=1, description="Report progress every N optimizer steps (besides every epoch)."
    )
    # Data parallelism (engine/distributed.py); with processes=1 and nodes=1 none of it runs.
    processes: int = Field(
        default=1, ge=1, le=1024,
        description="Training processes per node; more than 1 trains data-parallel (DDP) through "
        "torch.distributed's elastic launcher: gloo on CPU, NCCL on CUDA with one GPU per process.",
    )
    nodes: int = Field(
        default=1, ge=1, le=4096,
        description="Machines taking part; more than 1 needs rendezvous (each node runs the same card).",
    )
    rendezvous: str | None = Field(
        default=None,
        description="host:port of the c10d rendezvous every node reaches (e.g. the first node's); "
        "needed when nodes > 1, on one node a free local port is used when empty.",
    )
    global_batch: Literal["grow", "fixed"] = Field(
        default="grow",
        description="grow: every process takes batch_size rows, so one step sees batch_size x processes x "
        "nodes rows; fixed: batch_size is the rows of one step, split across the processes.",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        default="auto", description="How processes share gradients: auto (NCCL on CUDA, gloo on CPU), gloo or nccl."
    )
    max_restarts: int = Field(
        default=0, ge=0, le=100,
        description="Times the launcher restarts all workers after one fails (they resume from the last "
        "checkpoint); 0 fails the card instead.",
    )


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float | None
    val_metrics: dict[str, float]
    lr: float
    seconds: float
    samples_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoopState:
    """Loop counters: everything besides tensors needed to resume exactly."""

    epoch: int = 0            # epoch in progress, 0-based
    batch: int = 0            # next batch of that epoch
    step: int = 0             # optimizer steps taken
    best_val_loss: float = math.inf
    best_epoch: int = 0       # 1-based epoch of the best validation loss, 0 = none yet
    bad_epochs: int = 0
    epoch_loss_sum: float = 0.0
    epoch_rows: int = 0
    epoch_seconds: float = 0.0
    stop_reason: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["best_val_loss"] = None if math.isinf(self.best_val_loss) else self.best_val_loss
        return data

    @classmethod
    def from_state_dict(cls, data: dict[str, Any]) -> "LoopState":
        data = dict(data)
        if data.get("best_val_loss") is None:
            data["best_val_loss"] = math.inf
        return cls(**data)


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    state: LoopState
    seconds: float
    stopped_early: bool
    stop_reason: str | None
    restored_best: bool = False  # the best epoch's weights were loaded back at the end


class Callback:
    """Hooks the loop calls; override what you need.

    On CUDA the fast loop replays its step as CUDA graphs only if every callback that
    overrides ``on_step_end`` says ``cuda_graph_safe = True``: its per-step hook reads
    host state only (counters, clocks), so it neither stalls the GPU every step nor
    replaces tensors the graphs point at. ``False`` keeps the eager step.
    """

    cuda_graph_safe: bool | None = None  # None: safe unless on_step_end is overridden

    def on_step_end(self, trainer: "Trainer") -> None: ...

    def on_epoch_end(self, trainer: "Trainer", record: EpochRecord) -> None: ...

    def on_checkpoint(self, trainer: "Trainer") -> None: ...


class Trainer:
    """One training run: model, optimizer, schedule, data on the device, counters."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        splits: Splits,
        spec: TrainSpec,
        callbacks: list[Callback] | tuple[Callback, ...] = (),
    ):
        self.spec = spec
        self.device = resolve_device(spec.device)
        check_precision(self.device, spec.precision)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.info = splits.info
        if len(splits.train) == 0:
            raise ConfigError("The train split is empty; there is nothing to train on.")
        # Where the rows live while training: on the device, or streamed from host memory.
        self.placement = choose_placement(
            spec.data_placement, self.device, resident_bytes(splits.train, splits.val)
        )
        logger.info("data placement: %s (%s)", self.placement.kind, self.placement.reason)
        self.source = make_source(
            self.placement, splits.train, self.device, spec.batch_size, spec.seed, spec.shuffle
        )
        self.train_data: TensorSplit = self.source.data
        # Streamed runs keep the validation rows on the host too; they go over in chunks.
        self.val_data: TensorSplit = splits.val.to(self.device) if self.placement.kind == "resident" else splits.val
        needs_val = spec.early_stopping_patience is not None or spec.scheduler.name == "plateau"
        if needs_val and len(self.val_data) == 0:
            raise ConfigError(
                "Early stopping and the plateau scheduler watch the validation loss; set val_fraction > 0."
            )
        self.loss_name = resolve_loss(spec.loss, self.info.problem)
        self.loss_fn = steps.make_loss(self.loss_name)
        self.plans = self.make_plans()
        self.steps_per_epoch = sum(plan.closes_group for plan in self.plans)
        self.scheduler = build_scheduler(spec.scheduler, optimizer, spec.epochs, self.steps_per_epoch)
        self.callbacks = list(callbacks)
        self.state = LoopState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.forward_model = CompiledForward(self.model) if spec.compile else self.model
        # A per-step NaN check reads the loss on the host. On CPU that is free and stops at
        # the exact step; on CUDA it would stall the GPU every step, so the epoch's loss is
        # checked once at its end instead (end_epoch). Tests turn it off on CPU to check
        # that nothing else in the step loop reads from the device.
        self.check_every_step = self.device.type == "cpu"
        # The latest batch's loss, still on the device: a progress callback may read it
        # (a host sync) every progress_every steps; the loop itself never does.
        self.last_loss: torch.Tensor | None = None
        # How the fast loop trains a batch (CUDA graphs or eager), chosen at the first epoch
        # it runs: after a resume has loaded the optimizer state the graphs will point at.
        self.step_fn: StepFn | None = None

    def make_plans(self) -> list[BatchPlan]:
        """This process's batches of an epoch (a data-parallel worker takes its shard of each)."""
        return plan_epoch(len(self.train_data), self.spec.batch_size, self.spec.accumulate)

    # -- the loop -------------------------------------------------------------

    def fit(self) -> FitResult:
        started = time.perf_counter()
        self.begin()
        while self.running:
            self.run_epoch()
        return self.finish(time.perf_counter() - started)

    # The pieces below are shared with the step-wise flow, which drives the same
    # Trainer batch by batch through Prefect tasks: both drivers seed, count,
    # schedule, validate, stop and restore in exactly the same way.

    def begin(self) -> None:
        """Seed dropout for a fresh run; a resumed run has its RNG state restored instead."""
        if self.state.epoch == 0 and self.state.batch == 0 and self.state.step == 0:
            torch.manual_seed(self.spec.seed)

    @property
    def running(self) -> bool:
        """Epochs remain and no stop condition has fired."""
        return self.state.epoch < self.spec.epochs and self.state.stop_reason is None

    def finish(self, seconds: float) -> FitResult:
        """Name why training stopped and restore the best weights (early stopping)."""
        if self.state.stop_reason is None:
            self.state.stop_reason = f"completed {self.spec.epochs} epochs"
        self.source.settle()
        restored = self.restore_best_weights()
        return FitResult(
            history=list(self.state.history),
            state=self.state,
            seconds=seconds,
            stopped_early=self.state.epoch < self.spec.epochs,
            stop_reason=self.state.stop_reason,
            restored_best=restored,
        )

    def run_epoch(self) -> EpochRecord:
        epoch_started = time.perf_counter()
        # Summed on the device: reading it every step would stall a GPU.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.model.train()
        if self.step_fn is None:
            self.step_fn = make_step(self)
        plans = self.plans[self.state.batch:]
        with contextlib.closing(self.source.batches(self.state.epoch, plans)) as batches:
            for plan, (xb, yb) in zip(plans, batches):
                self.step_fn(plan, xb, yb, loss_sum)
                if plan.closes_group and self.mid_epoch_checkpoint_due():
                    # Fold the running sums into the state so a resumed run continues them.
                    self.state.epoch_loss_sum += float(loss_sum)
                    loss_sum.zero_()
                    now = time.perf_counter()
                    self.state.epoch_seconds += now - epoch_started
                    epoch_started = now
                    self.emit("on_checkpoint")
        self.state.epoch_loss_sum += float(loss_sum)
        self.state.epoch_rows = len(self.train_data)
        self.state.epoch_seconds += time.perf_counter() - epoch_started
        return self.end_epoch()

    def train_batch(self, plan: BatchPlan, xb: torch.Tensor, yb: torch.Tensor, loss_sum: torch.Tensor) -> None:
        """One batch: forward, loss, backward, and the optimizer step when its group closes.

        Nothing here reads a value back from the device (unless check_every_step).
        """
        if plan.opens_group:
            steps.zero_grad(self.optimizer)
        # forward and loss, under bf16 autocast when asked
        with self.autocast():
            predictions = steps.forward(self.forward_model, xb)
            loss = steps.compute_loss(self.loss_fn, predictions, yb)
        if self.check_every_step:
            self.check_finite(loss, plan)
        # backprop; the loss is weighted by the batch's share of its accumulation group
        steps.backward(loss, scale=plan.loss_scale)
        self.last_loss = loss.detach()
        # one kernel: loss_sum += loss * rows, in float64
        loss_sum.add_(self.last_loss, alpha=plan.stop - plan.start)
        if plan.closes_group:
            self.finish_group(plan)

    def finish_group(self, plan: BatchPlan) -> None:
        """Optimizer step (with clipping) at the end of an accumulation group."""
        steps.optimizer_step(self.optimizer, self.model, self.spec.clip, self.state.step + 1)
        self.after_optimizer_step(plan)

    def after_optimizer_step(self, plan: BatchPlan) -> None:
        """Count the step, schedule the LR (per step) and call on_step_end; the graphed step shares it."""
        self.count_step(plan)
        if self.scheduler_due("step"):
            step_scheduler(self.scheduler, None)
        self.emit("on_step_end")

    def count_step(self, plan: BatchPlan) -> None:
        """Count an optimizer step taken after ``plan``'s batch."""
        self.state.step += 1
        self.state.batch = plan.index + 1

    def scheduler_due(self, interval: str) -> bool:
        """Whether the LR schedule steps at this point ('step' or 'epoch')."""
        return self.scheduler is not None and self.spec.scheduler.interval == interval

    def mid_epoch_checkpoint_due(self) -> bool:
        """A step checkpoint is due; the epoch end checkpoints anyway, so skip the last step."""
        return self._checkpoint_due() and self.state.batch < len(self.plans)

    def end_epoch(self) -> EpochRecord:
        """Validate, record, schedule, decide whether to stop; shared with the step-wise flow."""
        record = self.record_epoch()
        if self.scheduler_due("epoch"):
            step_scheduler(self.scheduler, record.val_loss)
        self.close_epoch(record)
        return record

    def record_epoch(self) -> EpochRecord:
        """Validate and append the epoch's record to the history (LR read before scheduling)."""
        train_loss = self.state.epoch_loss_sum / max(1, self.state.epoch_rows)
        if not math.isfinite(train_loss):
            raise TrainingError(self._divergence_message(f"epoch {self.state.epoch + 1}", train_loss))
        val_loss, val_metrics = self.validate()
        lr = current_lr(self.optimizer)
        seconds = self.state.epoch_seconds
        record = EpochRecord(
            epoch=self.state.epoch + 1,
            train_loss=train_loss,
            val_loss=val_loss,
            val_metrics=val_metrics,
            lr=lr,
            seconds=seconds,
            samples_per_s=len(self.train_data) / seconds if seconds > 0 else 0.0,
        )
        self.state.history.append(record.to_dict())
        return record

    def close_epoch(self, record: EpochRecord) -> None:
        """Early stopping, then move the counters to the next epoch and checkpoint."""
        self.track_early_stopping(record.val_loss)
        self.state.epoch += 1
        self.state.batch = 0
        self.state.epoch_loss_sum = 0.0
        self.state.epoch_rows = 0
        self.state.epoch_seconds = 0.0
        self.emit("on_epoch_end", record)
        self.emit("on_checkpoint")

    # -- pieces ---------------------------------------------------------------

    def epoch_data(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training split in this epoch's order (on the device when resident, else on the host)."""
        return self.source.epoch_data(epoch)

    def autocast(self):
        if self.spec.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def validate(self) -> tuple[float | None, dict[str, float]]:
        if len(self.val_data) == 0:
            return None, {}
        self.model.eval()
        try:
            outputs = []
            for start in range(0, len(self.val_data), 8192):
                # a no-op when resident; a chunk's copy to the device when streaming
                chunk = self.val_data.X[start:start + 8192].to(self.device, non_blocking=True)
                with self.autocast():
                    outputs.append(self.forward_model(chunk).float())
            predictions = torch.cat(outputs)
            target = self.val_data.y.to(self.device)
            val_loss = float(steps.compute_loss(self.loss_fn, predictions, target))
            metrics = compute_metrics(predictions, target, self.info)
        finally:
            self.model.train()
        primary = PRIMARY_METRIC[self.info.problem]
        return val_loss, {primary: metrics[primary]}

    def track_early_stopping(self, val_loss: float | None) -> None:
        if val_loss is None:
            return
        if val_loss < self.state.best_val_loss - self.spec.min_delta:
            self.state.best_val_loss = val_loss
            self.state.best_epoch = self.state.epoch + 1
            self.state.bad_epochs = 0
            if self.spec.early_stopping_patience is not None and self.spec.restore_best:
                self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return
        self.state.bad_epochs += 1
        patience = self.spec.early_stopping_patience
        if patience is not None and self.state.bad_epochs >= patience:
            self.state.stop_reason = (
                f"early stopping: validation loss did not improve for {patience} epochs "
                f"(best {self.state.best_val_loss:.6g} at epoch {self.state.best_epoch})"
            )

    def restore_best_weights(self) -> bool:
        """Load the best epoch's weights if training went on past it; True if it did."""
        if self.best_weights is not None and self.state.best_epoch < self.state.epoch:
            self.model.load_state_dict(self.best_weights)
            return True
        return False

    def check_finite(self, loss: torch.Tensor, plan: BatchPlan) -> None:
        if not torch.isfinite(loss):
            where = f"epoch {self.state.epoch + 1}, batch {plan.index} (after {self.state.step} steps)"
            raise TrainingError(self._divergence_message(where, float(loss.detach())))

    def _divergence_message(self, where: str, value: float) -> str:
        return (
            f"The training loss became {value} at {where}. Lower the learning rate "
            f"(now {current_lr(self.optimizer):g}), set gradient clipping (clip=1.0), or check the "
            "data for extreme values."
        )

    def _checkpoint_due(self) -> bool:
        every = self.spec.checkpoint_every
        return every is not None and self.state.step % every == 0

    def emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    splits: Splits,
    spec: TrainSpec,
    callbacks: list[Callback] | tuple[Callback, ...] = (),
) -> FitResult:
    """Train ``model`` in place and return its history."""
    return Trainer(model, optimizer, splits, spec, callbacks).fit()


def steps_per_epoch(rows: int, spec: TrainSpec) -> int:
    return -(-num_batches(rows, spec.batch_size) // spec.accumulate)
