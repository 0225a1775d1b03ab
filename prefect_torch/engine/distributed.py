"""Data-parallel training: the Train card's loop on N processes (DDP).

Built on what PyTorch ships, not a launcher of our own: torch.distributed's
elastic launcher (``torch.distributed.launcher.api``, the engine behind
``torchrun``) starts the workers and watches them, ``DistributedDataParallel``
averages their gradients, over gloo on CPU and NCCL on CUDA (one GPU each).

The card's process (the *parent*) never trains::

    parent (Train card)                     workers (rank 0 .. N-1)
    ─────────────────────                   ─────────────────────────────────
    share_splits() → splits.safetensors ─►  open_shared_splits() (safetensors)
    job.json, model.safetensors         ─►  same model, optimizer, spec
    elastic_launch(...)                     DistributedTrainer.fit()
    replays events.jsonl to callbacks   ◄─  rank 0: events, checkpoints
    loads model.safetensors             ◄─  local rank 0: final weights + result

Every worker holds the training tensors and takes its shard of each epoch's
seeded permutation: the epoch is planned as one process would plan it with the
*global* batch (``batching.plan_epoch``), and each global batch's rows are split
into ``world`` contiguous slices, one per rank. Each rank's loss is weighted by
``its rows × world / rows of the accumulation group``, so DDP's gradient
average equals the gradient of the whole group's mean loss, ragged last batches
included: 2 processes with batch b train like 1 process with batch 2b.

Rank 0 alone has side effects (checkpoints, events that become logs and
artifacts in the parent); they are marked ``@rank_zero_only`` where defined.
Rank 0 alone validates and broadcasts the validation loss and metric; early
stopping is decided by rank 0 and broadcast, so every rank stops at the same epoch.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from prefect_torch.engine.batching import BatchPlan, plan_epoch
from prefect_torch.engine.device import check_precision, resolve_device
from prefect_torch.engine.loop import Callback, EpochRecord, FitResult, LoopState, Trainer, TrainSpec
from prefect_torch.engine.metrics import PRIMARY_METRIC
from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec
from prefect_torch.engine.problem import resolve_loss
from prefect_torch.engine.split import DatasetInfo, Splits, TensorSplit
from prefect_torch import errors
from prefect_torch.errors import ConfigError, DeviceError, TrainingError

logger = logging.getLogger(__name__)

# Files of a launch's job folder (a temporary folder of the card's process).
JOB_FILE = "job.json"
SPLITS_FILE = "splits.safetensors"
MODEL_IN_FILE = "model-in.safetensors"
MODEL_OUT_FILE = "model-out.safetensors"
RESULT_FILE = "result.json"
EVENTS_FILE = "events.jsonl"

# How often the parent reads the workers' events (seconds).
POLL_INTERVAL_S = 0.05


# -- who does what --------------------------------------------------------------


def world_size(spec: TrainSpec) -> int:
    return spec.processes * spec.nodes


def is_parallel(spec: TrainSpec) -> bool:
    """Whether ``spec`` asks for more than one training process."""
    return world_size(spec) > 1


def current_rank() -> int:
    """This process's global rank: 0 outside a data-parallel worker."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def rank_zero_only(fn: Callable) -> Callable:
    """Run ``fn`` on global rank 0 only (elsewhere it returns None), like Lightning's.

    Marks a side effect that only one process of a data-parallel run may have:
    a checkpoint, an event that becomes a log line or an artifact.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if current_rank() == 0:
            return fn(*args, **kwargs)
        return None

    return wrapper


def node_leader_only(fn: Callable) -> Callable:
    """Run ``fn`` on each node's local rank 0 only: it writes what that node's card returns."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            return fn(*args, **kwargs)
        return None

    return wrapper


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def check_parallel(spec: TrainSpec) -> torch.device:
    """Refuse, before anything is launched, what cannot run; returns the device type to use."""
    if not dist.is_available():
        raise ConfigError(
            f"processes={spec.processes}, nodes={spec.nodes} needs torch.distributed, which this torch build "
            "lacks. Install a torch build with distributed support, or set processes=1 and nodes=1."
        )
    device = resolve_device(spec.device)
    check_precision(device, spec.precision)
    if spec.backend == "nccl" and device.type != "cuda":
        raise DeviceError(
            "backend='nccl' runs on CUDA GPUs only, and this run trains on CPU. Use backend='gloo' "
            "(or 'auto': gloo on CPU, NCCL on CUDA), or device='cuda' on a machine with GPUs."
        )
    if device.type == "cuda":
        if spec.backend == "nccl" or spec.backend == "auto":
            if not dist.is_nccl_available():
                raise DeviceError(
                    "NCCL is not available in this torch build, so CUDA processes cannot share gradients. "
                    "Install a CUDA build of torch with NCCL, or set backend='gloo'."
                )
        gpus = torch.cuda.device_count()
        if spec.processes > gpus:
            raise DeviceError(
                f"processes={spec.processes} asks for {spec.processes} CUDA processes on this node (one GPU "
                f"each), but it has {gpus} GPU{'s' if gpus != 1 else ''}. Set processes to at most {gpus}, "
                "request more GPUs (the cuda pool's gpu_count), or train on device='cpu'."
            )
    if spec.nodes > 1 and not spec.rendezvous:
        raise ConfigError(
            f"nodes={spec.nodes} needs rendezvous='host:port', an address every node reaches (for example "
            "the first node's, or a PyTorchJob's MASTER_ADDR with a free port). Set it, or set nodes=1."
        )
    if spec.rendezvous and ":" not in spec.rendezvous:
        raise ConfigError(f"rendezvous must be 'host:port'; got {spec.rendezvous!r}. Add the port, e.g. ':29400'.")
    if spec.global_batch == "fixed" and spec.batch_size < world_size(spec):
        raise ConfigError(
            f"global_batch='fixed' splits batch_size={spec.batch_size} rows across {world_size(spec)} "
            f"processes, which leaves some without rows. Set batch_size to at least {world_size(spec)}, "
            "or global_batch='grow'."
        )
    return device


def lineage_spec(spec: TrainSpec) -> TrainSpec:
    """``spec`` as it counts for a run's lineage (its checkpoints): where the processes
    meet and how often the launcher restarts them do not change the numbers."""
    return spec.model_copy(update={"rendezvous": None, "max_restarts": 0})


def global_batch_size(spec: TrainSpec) -> int:
    """Rows of one global batch (all ranks together)."""
    return spec.batch_size * world_size(spec) if spec.global_batch == "grow" else spec.batch_size


def shard_plans(plans: list[BatchPlan], rank: int, world: int) -> list[BatchPlan]:
    """Rank ``rank``'s slice of every global batch, with its loss weight.

    A global batch of n rows is cut into ``world`` contiguous slices (the first
    n % world one row longer). A rank's loss is its slice's mean; weighted by
    ``slice rows × world / group rows`` and averaged over ranks by DDP, the
    gradient equals the group's mean-loss gradient, as in one process.
    """
    group_rows: dict[int, int] = {}  # batch index -> rows of its accumulation group
    members: list[int] = []
    for plan in plans:
        members.append(plan.index)
        if plan.closes_group:
            rows = plans[members[-1]].stop - plans[members[0]].start
            group_rows.update({index: rows for index in members})
            members = []
    sharded = []
    for plan in plans:
        rows = plan.stop - plan.start
        base, extra = divmod(rows, world)
        start = plan.start + rank * base + min(rank, extra)
        count = base + (1 if rank < extra else 0)
        sharded.append(BatchPlan(plan.index, start, start + count, count * world / group_rows[plan.index],
                                 plan.opens_group, plan.closes_group))
    return sharded


# -- the data handed to the workers ---------------------------------------------------


def share_splits(splits: Splits, folder: str | Path) -> str:
    """Write the train and validation tensors once where every worker can map them.

    The one place that hands data to workers: when splits are stored as
    memory-mapped safetensors already, this returns that file instead.
    """
    path = Path(folder) / SPLITS_FILE
    tensors = {}
    for name in ("train", "val"):
        part = splits[name]
        tensors[f"{name}.X"] = part.X.detach().cpu().contiguous()
        tensors[f"{name}.y"] = part.y.detach().cpu().contiguous()
    meta = {"info": splits.info.to_dict(), "key": splits.key}
    save_file(tensors, str(path), metadata={"meta": json.dumps(meta)})
    return str(path)


def open_shared_splits(path: str | Path) -> Splits:
    """The splits ``share_splits`` wrote (the test split is left out: training never reads it)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["meta"])
    tensors = load_file(str(path))
    train = TensorSplit(tensors["train.X"], tensors["train.y"])
    val = TensorSplit(tensors["val.X"], tensors["val.y"])
    empty = TensorSplit(train.X[:0], train.y[:0])
    return Splits(train=train, val=val, test=empty, info=DatasetInfo.from_dict(meta["info"]), key=meta["key"])


# -- the worker's loop ----------------------------------------------------------------


class DistributedTrainer(Trainer):
    """The Trainer on one rank: its shard of every batch, gradients averaged by DDP.

    Everything else (accumulation, clipping, schedules, bf16, checkpoints through
    callbacks) is the single-process Trainer's; this class adds the collectives.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, splits: Splits, spec: TrainSpec,
                 callbacks: list[Callback] | tuple[Callback, ...] = (), *, rank: int, world: int):
        self.rank, self.world = rank, world
        super().__init__(model, optimizer, splits, spec, callbacks)
        from torch.nn.parallel import DistributedDataParallel

        device_ids = None
        if self.device.type == "cuda":
            device_ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        # Validation runs on rank 0 alone, so it must not go through DDP (whose forward may
        # broadcast buffers, a collective the other ranks would never join).
        self.plain_forward = self.forward_model
        if spec.compile:
            from prefect_torch.engine.compilation import CompiledForward

            self.forward_model = CompiledForward(self.ddp)
        else:
            self.forward_model = self.ddp
        # A global batch smaller than the world leaves some ranks no rows; they still take
        # part in the gradient average, with a zero loss that keeps every parameter in the graph.
        self.loss_fn = _empty_safe(self.loss_fn)

    def make_plans(self) -> list[BatchPlan]:
        plans = plan_epoch(len(self.train_data), global_batch_size(self.spec), self.spec.accumulate)
        return shard_plans(plans, self.rank, self.world)

    def train_batch(self, plan: BatchPlan, xb: torch.Tensor, yb: torch.Tensor, loss_sum: torch.Tensor) -> None:
        # Inside an accumulation group the gradients only add up locally; the batch that
        # closes the group averages them over the ranks (one all-reduce per optimizer step).
        sync = contextlib.nullcontext() if plan.closes_group else self.ddp.no_sync()
        with sync:
            super().train_batch(plan, xb, yb, loss_sum)

    def validate(self) -> tuple[float | None, dict[str, float]]:
        if len(self.val_data) == 0:
            return None, {}
        primary = PRIMARY_METRIC[self.info.problem]
        values = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.rank == 0:
            forward, self.forward_model = self.forward_model, self.plain_forward
            try:
                val_loss, metrics = super().validate()
            finally:
                self.forward_model = forward
            values[0], values[1] = val_loss, metrics[primary]
        dist.broadcast(values, src=0)
        return float(values[0]), {primary: float(values[1])}

    def record_epoch(self) -> EpochRecord:
        self._sum_epoch_loss()
        return super().record_epoch()

    def track_early_stopping(self, val_loss: float | None) -> None:
        # Every rank tracks the same (broadcast) losses; rank 0's decision is broadcast anyway,
        # so no rounding difference can ever leave one rank training alone.
        super().track_early_stopping(val_loss)
        stop = torch.tensor([self.state.stop_reason is not None], dtype=torch.int32, device=self.device)
        dist.broadcast(stop, src=0)
        if not bool(stop):
            self.state.stop_reason = None
        elif self.state.stop_reason is None:
            self.state.stop_reason = "early stopping, decided by rank 0"

    def emit(self, hook: str, *args: Any) -> None:
        if hook == "on_checkpoint":
            self._sum_epoch_loss()
        super().emit(hook, *args)

    def _sum_epoch_loss(self) -> None:
        """Gather the ranks' partial epoch loss sums on rank 0 (what a checkpoint holds).

        Every rank calls this at the same points (each checkpoint, each epoch end);
        afterwards rank 0 holds the sum over all ranks, the others hold zero, except
        at the epoch end where every rank needs the total to report the same loss.
        """
        total = torch.tensor([self.state.epoch_loss_sum], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        self.state.epoch_loss_sum = float(total) if self.rank == 0 else 0.0

    def reset_partial_sums(self) -> None:
        """After resuming from rank 0's checkpoint, only rank 0 keeps the partial epoch loss sum."""
        if self.rank != 0:
            self.state.epoch_loss_sum = 0.0


def _empty_safe(loss_fn: nn.Module) -> nn.Module:
    """``loss_fn`` (same class, so shape checks still apply) with a zero loss on an empty batch."""

    class EmptySafe(type(loss_fn)):  # type: ignore[misc, valid-type]
        def forward(self, predictions: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            if predictions.shape[0] == 0:
                return predictions.sum() * 0.0
            return super().forward(predictions, target)

    EmptySafe.__name__ = type(loss_fn).__name__
    loss_fn.__class__ = EmptySafe
    return loss_fn


class EventRelay(Callback):
    """Rank 0's loop events as JSON lines, for the card's process to replay to its callbacks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @rank_zero_only
    def send(self, event: dict[str, Any]) -> None:
        with self.path.open("a") as stream:
            stream.write(json.dumps(event) + "\n")

    def on_step_end(self, trainer: Trainer) -> None:
        every = trainer.spec.progress_every
        if every and trainer.state.step % every == 0:  # per-step events only as often as reported
            self.send({"hook": "on_step_end", "state": trainer.state.state_dict()})

    def on_epoch_end(self, trainer: Trainer, record: EpochRecord) -> None:
        self.send({"hook": "on_epoch_end", "state": trainer.state.state_dict(), "record": record.to_dict()})

    def on_checkpoint(self, trainer: Trainer) -> None:
        self.send({"hook": "on_checkpoint", "state": trainer.state.state_dict()})


class RankZero(Callback):
    """Callbacks that run on rank 0 only (the checkpoint writer)."""

    def __init__(self, *callbacks: Callback):
        self.callbacks = callbacks

    @rank_zero_only
    def on_step_end(self, trainer: Trainer) -> None:
        for callback in self.callbacks:
            callback.on_step_end(trainer)

    @rank_zero_only
    def on_epoch_end(self, trainer: Trainer, record: EpochRecord) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(trainer, record)

    @rank_zero_only
    def on_checkpoint(self, trainer: Trainer) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(trainer)


@node_leader_only
def _write_result(job: Path, trainer: Trainer, result: FitResult) -> None:
    """The trained weights and the run's outcome, for the card on this node to return."""
    weights = {k: v.detach().cpu().contiguous() for k, v in trainer.model.state_dict().items()}
    save_file(weights, str(job / MODEL_OUT_FILE))
    document = {
        "state": result.state.state_dict(),
        "seconds": result.seconds,
        "stopped_early": result.stopped_early,
        "stop_reason": result.stop_reason,
        "restored_best": result.restored_best,
        "had_best_weights": trainer.best_weights is not None,
    }
    # Written last and renamed into place: the parent reads a result only once it is whole.
    partial = job / (RESULT_FILE + ".partial")
    partial.write_text(json.dumps(document))
    partial.replace(job / RESULT_FILE)


def worker_main(job_dir: str) -> NoReturn:
    """A worker's entry point (run by the elastic launcher as ``python -c ...``).

    Errors are recorded in the file the launcher names, so the card reports the
    worker's own exception and traceback.
    """
    import traceback

    from torch.distributed.elastic.multiprocessing.errors import record

    from prefect_torch.exiting import exit_without_teardown

    try:
        record(_run_worker)(job_dir)  # on failure, writes the error file the launcher reads
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported as the interpreter would, then the exit below
        traceback.print_exc()
        code = 1
    # Everything the worker wrote is closed. torch's native teardown at exit sometimes
    # aborts a gloo worker, and the launcher then reports SIGABRT instead of the
    # worker's own result or error.
    exit_without_teardown(code)


def _run_worker(job_dir: str) -> None:
    from prefect_torch.engine.checkpoint import CheckpointCallback, resume_trainer
    from prefect_torch.engine.models import build_model
    from prefect_torch.engine.optim import build_optimizer

    job = Path(job_dir)
    spec = json.loads((job / JOB_FILE).read_text())
    training = TrainSpec.model_validate(spec["training"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    device = resolve_device(training.device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        # One GPU per process: the spec names this worker's.
        training = training.model_copy(update={"device": f"cuda:{local_rank}"})
    elif "OMP_NUM_THREADS" not in os.environ:
        # The node's cores shared among its workers, not every worker on every core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    backend = backend_for(device) if training.backend == "auto" else training.backend
    dist.init_process_group(backend=backend)
    try:
        splits = open_shared_splits(job / SPLITS_FILE)
        model_spec = ModelSpec.model_validate(spec["model"]["spec"])
        model = build_model(model_spec, spec["model"]["in_features"], spec["model"]["out_features"])
        model.load_state_dict(load_file(str(job / MODEL_IN_FILE)))
        optimizer = build_optimizer(OptimizerSpec.model_validate(spec["optimizer"]),
                                    model.to(resolve_device(training.device)))
        checkpoints = spec["checkpoints"]
        relay = EventRelay(job / EVENTS_FILE)
        trainer = DistributedTrainer(model, optimizer, splits, training,
                                     [RankZero(CheckpointCallback(checkpoints)), relay], rank=rank, world=world)
        resumed = resume_trainer(checkpoints, trainer)
        if resumed is not None:
            trainer.reset_partial_sums()
        relay.send({"hook": "start", "state": trainer.state.state_dict(), "resumed": resumed is not None,
                    "device": str(trainer.device), "world": world, "backend": backend})
        dist.barrier()  # every rank has read the checkpoint before rank 0 may write the next
        result = trainer.fit()
        _write_result(job, trainer, result)
    finally:
        dist.destroy_process_group()


_WORKER_COMMAND = "import sys; from prefect_torch.engine.distributed import worker_main; worker_main(sys.argv[1])"


# -- the card's side --------------------------------------------------------------------


class ParallelTrainer:
    """The card's side of a data-parallel run: launches the workers, replays their events.

    It looks to callbacks like a Trainer (``spec``, ``state``, ``device``, ``info``,
    ``loss_name``, ``model``, ``plans``, ``steps_per_epoch``...), so the card's
    logging and reporting callbacks work unchanged; they see rank 0's counters and
    records as they arrive. The live ``model`` gets the trained weights at the end.
    """

    def __init__(
        self,
        model: nn.Module,
        model_spec: ModelSpec,
        in_features: int,
        out_features: int,
        optimizer: OptimizerSpec,
        splits: Splits,
        spec: TrainSpec,
        checkpoints: str,
        callbacks: list[Callback] | tuple[Callback, ...] = (),
        log: logging.Logger | logging.LoggerAdapter | None = None,
    ):
        self.device = check_parallel(spec)
        if len(splits.train) == 0:
            raise ConfigError("The train split is empty; there is nothing to train on.")
        self.model, self.model_spec = model, model_spec
        self.in_features, self.out_features = in_features, out_features
        self.optimizer_spec, self.splits, self.spec = optimizer, splits, spec
        self.checkpoints = checkpoints
        self.callbacks = list(callbacks)
        self.log = log or logger
        self.info = splits.info
        self.train_data = splits.train
        self.loss_name = resolve_loss(spec.loss, self.info.problem)
        self.plans = plan_epoch(len(splits.train), global_batch_size(spec), spec.accumulate)
        self.steps_per_epoch = sum(plan.closes_group for plan in self.plans)
        self.state = LoopState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.world = world_size(spec)

    def emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def fit(self) -> FitResult:
        started = time.perf_counter()
        job = Path(tempfile.mkdtemp(prefix="prefect-torch-ddp-"))
        try:
            self._write_job(job)
            failure = self._launch_and_replay(job)
            if failure is not None:
                raise failure
            return self._read_result(job, time.perf_counter() - started)
        finally:
            shutil.rmtree(job, ignore_errors=True)

    def _write_job(self, job: Path) -> None:
        share_splits(self.splits, job)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(weights, str(job / MODEL_IN_FILE))
        document = {
            "model": {"spec": self.model_spec.model_dump(mode="json"),
                      "in_features": self.in_features, "out_features": self.out_features},
            "optimizer": self.optimizer_spec.model_dump(mode="json"),
            "training": self.spec.model_dump(mode="json"),
            "checkpoints": self.checkpoints,
        }
        (job / JOB_FILE).write_text(json.dumps(document))

    def _launch_config(self, job: Path):
        from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
        from torch.distributed.launcher.api import LaunchConfig

        spec = self.spec
        return LaunchConfig(
            min_nodes=spec.nodes,
            max_nodes=spec.nodes,
            nproc_per_node=spec.processes,
            # Every node of one run must name the same run: the checkpoint folder names the lineage.
            run_id=_run_id(self.checkpoints) if spec.nodes > 1 else uuid.uuid4().hex,
            rdzv_backend="c10d",
            rdzv_endpoint=spec.rendezvous or "localhost:0",
            max_restarts=spec.max_restarts,
            monitor_interval=0.1,
            start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=str(job / "logs")),
        )

    def _launch_and_replay(self, job: Path) -> BaseException | None:
        """Run the launcher here and replay rank 0's events to the callbacks on a thread.

        The launcher stays on the calling thread so that, on the main thread, it installs
        its signal handlers (a terminated card takes its workers with it). The replay
        thread runs in a copy of this thread's context, so callbacks log and publish
        as the card.
        """
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import elastic_launch

        self.log.info(
            "launching %d training processes (%d per node x %d nodes, %s) with global batch %d",
            self.world, self.spec.processes, self.spec.nodes, backend_for(self.device), global_batch_size(self.spec),
        )
        replay = _Replay(self, job / EVENTS_FILE)
        thread = threading.Thread(target=contextvars.copy_context().run, args=(replay.run,),
                                  name="prefect-torch-events", daemon=True)
        thread.start()
        error: BaseException | None = None
        try:
            elastic_launch(self._launch_config(job), sys.executable)("-c", _WORKER_COMMAND, str(job))
        except ChildFailedError as exc:
            error = worker_error(exc, self.checkpoints)
        finally:
            replay.done.set()
            thread.join()
        if replay.error is not None:
            raise replay.error
        return error

    def _replay(self, event: dict[str, Any]) -> None:
        self.state = LoopState.from_state_dict(event["state"])
        hook = event["hook"]
        if hook == "start":
            if event["resumed"]:
                self.log.info("resuming from the checkpoint after %d steps (epoch %d, batch %d) in %s",
                              self.state.step, self.state.epoch + 1, self.state.batch, self.checkpoints)
        elif hook == "on_epoch_end":
            self.emit(hook, EpochRecord(**event["record"]))
        else:
            self.emit(hook)

    def _read_result(self, job: Path, seconds: float) -> FitResult:
        path = job / RESULT_FILE
        if not path.exists():
            raise TrainingError(
                "The training processes ended without a result on this node (its local rank 0 wrote none). "
                "Check the workers' output above; run the card again to resume from the last checkpoint."
            )
        document = json.loads(path.read_text())
        self.model.load_state_dict(load_file(str(job / MODEL_OUT_FILE)))
        self.state = LoopState.from_state_dict(document["state"])
        # Only whether there were best weights matters here (the summary mentions a restore).
        self.best_weights = {} if document["had_best_weights"] else None
        return FitResult(
            history=list(self.state.history), state=self.state, seconds=seconds,
            stopped_early=document["stopped_early"], stop_reason=document["stop_reason"],
            restored_best=document["restored_best"],
        )


class _Replay:
    """Reads rank 0's events until told the launch is over, then drains the rest."""

    def __init__(self, trainer: "ParallelTrainer", path: Path):
        self.trainer, self.reader = trainer, _EventReader(path)
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.done.wait(POLL_INTERVAL_S):
                self._replay_new()
            self._replay_new()
        except BaseException as exc:  # a callback failed: raised by the card once the launch ends
            self.error = exc

    def _replay_new(self) -> None:
        for event in self.reader.read():
            self.trainer._replay(event)


class _EventReader:
    """Complete JSON lines appended to a file since the last read."""

    def __init__(self, path: Path):
        self.path, self.offset, self.pending = path, 0, b""

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as stream:
            stream.seek(self.offset)
            chunk = stream.read()
        self.offset += len(chunk)
        lines = (self.pending + chunk).split(b"\n")
        self.pending = lines.pop()
        return [json.loads(line) for line in lines if line.strip()]


def _run_id(checkpoints: str) -> str:
    import hashlib

    return hashlib.sha256(checkpoints.encode()).hexdigest()[:24]


def _root_failure(exc: Any) -> tuple[int, Any]:
    """The failure that caused the others: a process killed by a signal other than the
    launcher's SIGTERM (its peers then fail on a broken connection), else the earliest."""
    import signal

    killed = [(rank, f) for rank, f in exc.failures.items() if f.exitcode < 0 and -f.exitcode != signal.SIGTERM]
    return killed[0] if killed else exc.get_first_failure()


def worker_error(exc: BaseException, checkpoints: str) -> errors.PrefectTorchError:
    """The first failed worker's own error and traceback, as the card's error.

    A worker that raised a prefect-torch error gives the same class, with its message
    and traceback; a worker killed by a signal gives a TrainingError that says how to
    resume.
    """
    rank, failure = _root_failure(exc)
    if failure.exitcode < 0:
        return TrainingError(
            f"Training process rank {rank} (pid {failure.pid}) was killed by {failure.signal_name()}; the "
            f"other processes were stopped. Run the card again to resume from the last checkpoint in "
            f"{checkpoints}, or set max_restarts so the launcher restarts the processes itself."
        )
    message = failure.message
    if isinstance(message, dict):
        text = str(message.get("message", ""))
        trace = str(message.get("extraInfo", {}).get("py_callstack", ""))
    else:
        text, trace = str(message), ""
    name, _, detail = text.partition(": ")
    error_class = getattr(errors, name, None)
    if isinstance(error_class, type) and issubclass(error_class, errors.PrefectTorchError) and detail:
        error: errors.PrefectTorchError = error_class(
            f"{detail}\n\n(raised in training process rank {rank}; its traceback:)\n{trace}".rstrip()
        )
    else:
        error = TrainingError(
            f"Training process rank {rank} failed (exit code {failure.exitcode}): {text}\n\nIts traceback:\n"
            f"{trace or '(none recorded)'}".rstrip()
        )
    error.__cause__ = exc
    return error


__all__ = [
    "DistributedTrainer",
    "ParallelTrainer",
    "check_parallel",
    "global_batch_size",
    "is_parallel",
    "lineage_spec",
    "open_shared_splits",
    "rank_zero_only",
    "shard_plans",
    "share_splits",
    "world_size",
]
