"""The training step captured once as CUDA graphs and replayed, or the eager step.

On a GPU, a small model's step is bound by launching kernels, not by running
them: forward, backward, clipping and the optimizer are a hundred or so launches
of a few microseconds of work each. A CUDA graph records them once and replays
them as one launch. ``make_step(trainer)`` chooses how the fast loop trains a
batch and returns a ``StepFn`` -- ``step(plan, xb, yb, loss_sum)``, the same
contract as ``Trainer.train_batch`` -- with a ``reason`` saying why:

- ``EagerStep``: ``Trainer.train_batch`` itself. Always on CPU, so the CPU path is
  exactly the one it was (same calls, same order, bitwise the same weights).
- ``GraphedStep``: at the first full batch it warms the step up on a side stream
  (as PyTorch's docs require: lazy state, cuBLAS handles, the optimizer's state),
  puts the weights, optimizer state and RNG back as they were, and captures one
  graph per kind of full batch: (opens its accumulation group, closes it, loss
  weight). A graph holds forward and loss under autocast, backward into gradient
  tensors that stay in place, and -- when the batch closes its group -- gradient
  clipping (``clip_grad_norm_``, foreach, no host read) and the fused optimizer
  step. Every full batch then copies its rows into static input buffers and
  replays its graph. The ragged last batch runs eagerly into the same gradient
  tensors and steps the same optimizer. Learning-rate schedules work: during
  capture the optimizer reads its lr from a device tensor, which is refilled
  (one tiny kernel, no sync) whenever the schedule has changed the lr.

When capture is not possible, training goes on with the eager step and ONE log
line says why (``TrainSpec.cuda_graphs='auto'``), or a ``DeviceError`` names the
reason and the fix (``'on'``); ``'off'`` never captures. The reasons, checked in
order: graphs turned off; not a CUDA device; DistributedDataParallel (gradient
all-reduce hooks fire per bucket from autograd, and capturing them needs NCCL
set up for it, so DDP stays eager); torch.compile (its ``mode='reduce-overhead'``
is the graphed path for compiled models); a per-step loss check that reads the
GPU; CUDA sync debug mode on (capture synchronises once while setting up); an
optimizer without a fused CUDA step (only adam, adamw and sgd with fused=True);
an lr that is already a tensor; a callback with a per-step hook that has not
declared ``cuda_graph_safe = True`` (it may read the GPU every step, which would
stall the pipeline the graphs fill, or move tensors the graphs point to); no
full batch at all; and, at the first full batch, any error raised while warming
up or capturing (dynamic shapes, a module that synchronises, ...), after which
the weights and optimizer state are put back and the eager step carries on.

Reproducibility: the graphs replay the same kernels in the same order each run,
so a seeded run is bitwise the same run to run on the same GPU. Against the
eager step it agrees within rounding: a scheduled lr reaches the fused kernel
as a float32 tensor rather than a double, and with accumulation the second kind
of group-opening batch (and the ragged one) zeroes the gradients and adds into
them where the eager step sets them to None first.

Do not replace the optimizer's state or the model's parameters after the first
epoch starts (``optimizer.load_state_dict`` allocates new state tensors): the
graphs point at the tensors that existed at capture. Resuming from a checkpoint
loads it before the first epoch, so that is fine; ``model.load_state_dict`` copies
in place and is fine too.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from torch import nn

from prefect_torch.engine import steps
from prefect_torch.engine.batching import BatchPlan
from prefect_torch.errors import DeviceError

if TYPE_CHECKING:
    from prefect_torch.engine.loop import Trainer

logger = logging.getLogger(__name__)

CudaGraphs = Literal["auto", "on", "off"]

# Eager iterations of every graph's body on the side stream before capture.
WARMUP_ITERATIONS = 3
# Optimizers whose fused CUDA step runs inside a graph (and reads lr from a tensor).
_GRAPHABLE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


class StepFn(Protocol):
    """Trains one batch: forward, loss, backward and, when its group closes, the optimizer step."""

    reason: str

    @property
    def graphed(self) -> bool: ...

    def __call__(self, plan: BatchPlan, xb: torch.Tensor, yb: torch.Tensor, loss_sum: torch.Tensor) -> None: ...


# -- the decision -------------------------------------------------------------------


def blocker(trainer: "Trainer", device: torch.device | None = None) -> str | None:
    """Why the trainer's step cannot be captured, or None when it can be tried.

    ``device`` overrides ``trainer.device`` (tests check the CUDA reasons on a CPU
    machine; nothing here allocates on the device).
    """
    spec = trainer.spec
    device = device or trainer.device
    if spec.cuda_graphs == "off":
        return "cuda_graphs='off'"
    if device.type != "cuda":
        return f"the device is {device.type}; CUDA graphs need a CUDA GPU"
    if _distributed(trainer):
        return ("the model trains under DistributedDataParallel, whose gradient all-reduce is not "
                "captured here")
    if spec.compile:
        return "compile=True; torch.compile's mode='reduce-overhead' is the graphed path for compiled models"
    if trainer.check_every_step:
        return "the loop checks the loss on the host after every batch (check_every_step)"
    if torch.cuda.is_available() and torch.cuda.get_sync_debug_mode() != 0:
        return "CUDA sync debug mode is on, and setting up a capture synchronises once"
    optimizer = trainer.optimizer
    if not isinstance(optimizer, _GRAPHABLE_OPTIMIZERS):
        return (f"the optimizer {type(optimizer).__name__} has no fused CUDA step to capture "
                "(adam, adamw and sgd have one)")
    if not all(group.get("fused") for group in optimizer.param_groups):
        return f"the optimizer {type(optimizer).__name__} was built without fused=True"
    if any(isinstance(group["lr"], torch.Tensor) for group in optimizer.param_groups):
        return "the optimizer's lr is a tensor already; give it a float"
    for callback in trainer.callbacks:
        if _steps_hook_unsafe(callback):
            return (f"the callback {type(callback).__name__} runs after every step and may read the GPU "
                    "(set cuda_graph_safe = True on it if its on_step_end reads host state only)")
    if not any(_full(plan, spec.batch_size) for plan in trainer.plans):
        return (f"no batch is full: {len(trainer.train_data)} training rows in batches of "
                f"{spec.batch_size}")
    return None


def _distributed(trainer: "Trainer") -> bool:
    from torch.nn.parallel import DistributedDataParallel

    for module in (trainer.model, trainer.forward_model):
        if isinstance(module, DistributedDataParallel):
            return True
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _steps_hook_unsafe(callback) -> bool:
    from prefect_torch.engine.loop import Callback

    declared = getattr(callback, "cuda_graph_safe", None)
    if declared is not None:
        return not declared
    return type(callback).on_step_end is not Callback.on_step_end


def _full(plan: BatchPlan, batch_size: int) -> bool:
    return plan.stop - plan.start == batch_size


def make_step(trainer: "Trainer") -> StepFn:
    """The step the fast loop runs: graphed when it can be, else eager (one log line says why)."""
    reason = blocker(trainer)
    if reason is None:
        return GraphedStep(trainer)
    return _fall_back(trainer, reason, quiet=trainer.spec.cuda_graphs == "off" or trainer.device.type != "cuda")


def _fall_back(trainer: "Trainer", reason: str, quiet: bool = False, failed: bool = False) -> "EagerStep":
    if trainer.spec.cuda_graphs == "on":
        raise DeviceError(
            f"cuda_graphs='on', but the training step cannot be captured as CUDA graphs: {reason}. "
            "Set cuda_graphs='auto' to train with the eager step where capture is not possible, or "
            "remove the cause."
        )
    message = "CUDA graphs not used (%s); training with the eager step"
    if failed:
        logger.warning(message, reason)
    elif quiet:  # expected (CPU, or turned off): not worth a line at INFO
        logger.debug(message, reason)
    else:
        logger.info(message, reason)
    return EagerStep(trainer, reason)


# -- the eager step -------------------------------------------------------------------


class EagerStep:
    """``Trainer.train_batch``, unchanged."""

    graphed = False

    def __init__(self, trainer: "Trainer", reason: str):
        self.trainer = trainer
        self.reason = reason

    def __call__(self, plan: BatchPlan, xb: torch.Tensor, yb: torch.Tensor, loss_sum: torch.Tensor) -> None:
        self.trainer.train_batch(plan, xb, yb, loss_sum)


# -- the graphed step -------------------------------------------------------------------

GraphKey = tuple[bool, bool, float]  # (opens its group, closes it, loss weight)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    loss: torch.Tensor  # the graph's output: this replay's loss


@dataclass
class _Snapshot:
    """Weights, buffers, optimizer state and RNG, to put back after the warm-up."""

    tensors: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    had_state: set[int] = field(default_factory=set)
    cuda_rng: torch.Tensor | None = None
    cpu_rng: torch.Tensor | None = None

    @classmethod
    def take(cls, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> "_Snapshot":
        snap = cls()
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                snap.tensors.append((tensor, tensor.detach().clone()))
            for param, state in optimizer.state.items():
                snap.had_state.add(id(param))
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        snap.tensors.append((value, value.detach().clone()))
        snap.cuda_rng = torch.cuda.get_rng_state(device)
        snap.cpu_rng = torch.get_rng_state()
        return snap

    def restore(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        with torch.no_grad():
            for live, saved in self.tensors:
                live.copy_(saved)
            # State the warm-up created is a fresh start again: zeros (step 0, zero moments and
            # momentum), which is what the first real step would have created.
            for param, state in optimizer.state.items():
                if id(param) not in self.had_state:
                    for value in state.values():
                        if isinstance(value, torch.Tensor):
                            value.zero_()
        torch.cuda.set_rng_state(self.cuda_rng, device)
        torch.set_rng_state(self.cpu_rng)


class GraphedStep:
    """Captures the step at the first full batch, then replays it (see the module docstring)."""

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer
        self.reason = "captured at the first full batch"
        self.fallback: EagerStep | None = None
        self.graphs: dict[GraphKey, _Captured] = {}
        self.static_x: torch.Tensor | None = None
        self.static_y: torch.Tensor | None = None
        # (parameter, its gradient tensor), fixed at capture: the graphs write into these.
        self.grads: list[tuple[nn.Parameter, torch.Tensor]] = []
        # A scheduled lr reaches the captured optimizer through these device tensors.
        self.lr_tensors: list[torch.Tensor] | None = None
        self.lr_values: list[float] = []

    @property
    def graphed(self) -> bool:
        return self.fallback is None

    def __call__(self, plan: BatchPlan, xb: torch.Tensor, yb: torch.Tensor, loss_sum: torch.Tensor) -> None:
        if self.fallback is not None:
            return self.fallback(plan, xb, yb, loss_sum)
        trainer = self.trainer
        if not _full(plan, trainer.spec.batch_size):
            return self.eager_batch(plan, xb, yb, loss_sum)
        if not self.graphs and not self.capture(xb, yb):
            return self.fallback(plan, xb, yb, loss_sum)  # type: ignore[misc]
        self.static_x.copy_(xb)  # type: ignore[union-attr]
        self.static_y.copy_(yb)  # type: ignore[union-attr]
        self.refresh_lr()
        captured = self.graphs[_key(plan)]
        captured.graph.replay()
        trainer.last_loss = captured.loss
        loss_sum.add_(captured.loss, alpha=plan.stop - plan.start)
        if plan.closes_group:
            trainer.after_optimizer_step(plan)

    # -- capture ----------------------------------------------------------------

    def capture(self, xb: torch.Tensor, yb: torch.Tensor) -> bool:
        """Warm up, restore, capture every kind of full batch; False (and eager from now on) on failure."""
        trainer = self.trainer
        device = trainer.device
        keys = sorted({_key(p) for p in trainer.plans if _full(p, trainer.spec.batch_size)},
                      key=lambda k: (not k[0], k[1], k[2]))
        self.static_x, self.static_y = xb.detach().clone(), yb.detach().clone()
        snapshot = _Snapshot.take(trainer.model, trainer.optimizer, device)
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            try:
                with torch.cuda.stream(side):
                    # The first pass lets autograd create the gradients; the graphs keep them.
                    trainer.optimizer.zero_grad(set_to_none=True)
                    for iteration in range(WARMUP_ITERATIONS):
                        for key in keys:
                            self.body(key)
                            if not self.grads:
                                self.grads = [(p, p.grad) for p in trainer.model.parameters()
                                              if p.grad is not None]
            finally:
                torch.cuda.current_stream(device).wait_stream(side)
                snapshot.restore(trainer.optimizer, device)
            if not self.grads:
                raise RuntimeError("the loss produced no gradient for any parameter")
            self.make_lr_tensors()
            torch.cuda.synchronize(device)
            for index, key in enumerate(keys):
                # The first graph (it opens a group) lets backward write the gradients, as the
                # eager step does after zero_grad(set_to_none=True): no zeroing pass, and the
                # tensors autograd makes in that graph's memory are the gradients from then on.
                # The other graphs zero (if they open a group) and accumulate into them in place.
                fresh = index == 0 and key[0]
                if fresh:
                    for param, _ in self.grads:
                        param.grad = None
                graph = torch.cuda.CUDAGraph()
                with self.capturing():
                    loss = self._capture(graph, lambda: self.body(key, zero=not fresh))
                if fresh:
                    self.grads = [(param, param.grad) for param, _ in self.grads]
                if any(grad is None or param.grad is not grad for param, grad in self.grads):
                    raise RuntimeError("autograd replaced or dropped a gradient tensor during capture")
                self.graphs[key] = _Captured(graph, loss)
        except Exception as exc:  # anything: the eager step still trains correctly
            self.graphs.clear()
            self.static_x = self.static_y = None
            self.grads = []
            self.lr_tensors = None
            try:
                torch.cuda.synchronize(device)
            except Exception as sync_exc:  # the device itself is broken: nothing can carry on
                raise DeviceError(f"CUDA graph capture left the GPU unusable: {sync_exc}") from exc
            snapshot.restore(trainer.optimizer, device)
            trainer.optimizer.zero_grad(set_to_none=True)
            first_line = (str(exc).strip().splitlines() or ["(no message)"])[0]
            self.reason = f"capture failed: {type(exc).__name__}: {first_line}"
            self.fallback = _fall_back(trainer, self.reason, failed=True)
            return False
        self.reason = (f"replaying {len(self.graphs)} CUDA graph(s) of the step; "
                       "the ragged last batch runs eagerly")
        logger.info("CUDA graphs: captured %d graph(s) of the training step (batch %d, accumulate %d)",
                    len(self.graphs), trainer.spec.batch_size, trainer.spec.accumulate)
        return True

    def _capture(self, graph: torch.cuda.CUDAGraph, body):
        """``torch.cuda.graph`` without its gc.collect() and empty_cache(), which cost more than
        the capture on a big Python heap; capture runs on a side stream as it requires."""
        device = self.trainer.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                out = body()
            except BaseException:
                with contextlib.suppress(Exception):  # the body's error says more than the end's
                    graph.capture_end()
                raise
            graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(stream)
        return out

    def body(self, key: GraphKey, zero: bool = True) -> torch.Tensor:
        """One full batch from the static buffers: what each graph records."""
        opens, closes, scale = key
        trainer = self.trainer
        if opens and zero and self.grads:
            torch._foreach_zero_([g for _, g in self.grads])
        with self.autocast():
            predictions = steps.forward(trainer.model, self.static_x)
            loss = steps.compute_loss(trainer.loss_fn, predictions, self.static_y)
        steps.backward(loss, scale=scale)
        if closes:
            if trainer.spec.clip is not None and trainer.spec.clip > 0:
                nn.utils.clip_grad_norm_(trainer.model.parameters(), max_norm=trainer.spec.clip, foreach=True)
            trainer.optimizer.step()
        return loss.detach()

    def autocast(self):
        # The autocast weight cache must not outlive a capture; within one forward it changes nothing.
        if self.trainer.spec.precision == "bf16":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def make_lr_tensors(self) -> None:
        """Device tensors for the lr when a schedule changes it; a constant lr stays a float."""
        if self.trainer.scheduler is None:
            return
        groups = self.trainer.optimizer.param_groups
        self.lr_values = [float(group["lr"]) for group in groups]
        self.lr_tensors = [torch.full((), lr, dtype=torch.float32, device=self.trainer.device)
                           for lr in self.lr_values]

    @contextlib.contextmanager
    def capturing(self):
        """During capture only: capturable=True (a check of torch's; the fused kernels ignore it)
        and the lr read from its tensor. Outside, the optimizer's param groups are untouched."""
        groups = self.trainer.optimizer.param_groups
        saved = [(group.get("capturable"), group["lr"]) for group in groups]
        try:
            for index, group in enumerate(groups):
                if "capturable" in group:
                    group["capturable"] = True
                if self.lr_tensors is not None:
                    group["lr"] = self.lr_tensors[index]
            yield
        finally:
            for group, (capturable, lr) in zip(groups, saved):
                if capturable is not None:
                    group["capturable"] = capturable
                group["lr"] = lr

    def refresh_lr(self) -> None:
        """Copy a changed lr into its tensor: a fill kernel, no host sync."""
        if self.lr_tensors is None:
            return
        for index, group in enumerate(self.trainer.optimizer.param_groups):
            lr = group["lr"]
            if lr != self.lr_values[index]:
                self.lr_tensors[index].fill_(lr)
                self.lr_values[index] = lr

    # -- the ragged batch ----------------------------------------------------------

    def eager_batch(self, plan: BatchPlan, xb: torch.Tensor, yb: torch.Tensor, loss_sum: torch.Tensor) -> None:
        """A batch no graph fits: eagerly, into the graphs' gradient tensors."""
        trainer = self.trainer
        if not self.graphs:  # nothing captured yet: the plain eager step
            return trainer.train_batch(plan, xb, yb, loss_sum)
        if plan.opens_group:
            torch._foreach_zero_([g for _, g in self.grads])
        with trainer.autocast():
            predictions = steps.forward(trainer.model, xb)
            loss = steps.compute_loss(trainer.loss_fn, predictions, yb)
        steps.backward(loss, scale=plan.loss_scale)
        for param, grad in self.grads:  # backward accumulates in place; make sure it stays so
            if param.grad is not grad:
                grad.copy_(param.grad)
                param.grad = grad
        trainer.last_loss = loss.detach()
        loss_sum.add_(trainer.last_loss, alpha=plan.stop - plan.start)
        if plan.closes_group:
            steps.optimizer_step(trainer.optimizer, trainer.model, trainer.spec.clip, trainer.state.step + 1)
            trainer.after_optimizer_step(plan)


def _key(plan: BatchPlan) -> GraphKey:
    return (plan.opens_group, plan.closes_group, plan.loss_scale)
