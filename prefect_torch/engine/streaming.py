"""Where the training rows live while the loop runs, and how batches reach the device.

Two batch sources give the Trainer the same batches in the same order:

- ``ResidentSource``: the split is copied to the device once; each epoch's
  shuffled order is gathered once on the device and batches are slices of it.
  No per-sample collation and no host round trip per step.
- ``StreamingSource``: for splits larger than GPU memory. The rows stay in host
  memory; a background thread gathers each batch's rows into one of a few pinned
  staging buffers and copies it to the GPU on a side stream, while the GPU trains
  on the previous batch. The training stream waits on an event, never the host.

``choose_placement`` picks one: resident when the split fits in free GPU memory
with room to spare, streaming otherwise. On CPU there is no copy to hide, so
there the thread only gathers batches (no pinning, no streams); streaming exists
on CPU so the code path runs, and is tested, on machines without a GPU.

Both sources take each epoch's shuffle from ``EpochOrders``, which computes it
one epoch ahead in the background.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import Literal

import torch

from prefect_torch.engine.batching import BatchPlan, epoch_order
from prefect_torch.engine.split import TensorSplit
from prefect_torch.errors import ConfigError

DataPlacement = Literal["auto", "resident", "stream"]

# Resident data may use at most this share of the GPU's free memory; the rest is
# left for the model, optimizer state, activations and the allocator's slack.
RESIDENT_SHARE_OF_FREE = 0.5

# Batches the background thread may prepare ahead of the training loop.
PREFETCH_DEPTH = 2


@dataclass(frozen=True)
class Placement:
    """The batch source chosen for a run, and why (the reason is logged)."""

    kind: Literal["resident", "stream"]
    reason: str


def resident_bytes(train: TensorSplit, val: TensorSplit) -> int:
    """Device memory a resident run needs for its data.

    The train split counts twice: the epoch's shuffled copy sits beside the
    original while the epoch runs.
    """
    return 2 * _split_bytes(train) + _split_bytes(val)


def choose_placement(
    choice: str, device: torch.device, needed_bytes: int, free_bytes: int | None = None
) -> Placement:
    """Resident or streaming, from the user's choice and (for 'auto') free GPU memory."""
    if choice == "resident":
        return Placement("resident", "data_placement='resident' was asked for")
    if choice == "stream":
        return Placement("stream", "data_placement='stream' was asked for")
    if choice != "auto":
        raise ConfigError(f"Unknown data_placement {choice!r}. Use one of: auto, resident, stream.")
    if device.type != "cuda":
        return Placement("resident", f"training on {device.type}: the data is already in this memory")
    if free_bytes is None:
        free_bytes, _total = torch.cuda.mem_get_info(device)
    budget = int(free_bytes * RESIDENT_SHARE_OF_FREE)
    sizes = f"the data needs {_gib(needed_bytes)} on the GPU, {_gib(free_bytes)} is free"
    if needed_bytes <= budget:
        return Placement("resident", f"{sizes}: copied to the GPU once")
    return Placement(
        "stream",
        f"{sizes} (at most {RESIDENT_SHARE_OF_FREE:.0%} of it is used for data): streaming batches "
        "from host memory; set data_placement='resident' to force the data onto the GPU",
    )


def make_source(
    placement: Placement, train: TensorSplit, device: torch.device, batch_size: int, seed: int, shuffle: bool
) -> "ResidentSource | StreamingSource":
    """The batch source for ``placement``: both have ``data``, ``batches()``, ``epoch_data()`` and ``settle()``."""
    if placement.kind == "resident":
        return ResidentSource(train, device, seed, shuffle)
    return StreamingSource(train, device, batch_size, seed, shuffle)


class EpochOrders:
    """Each epoch's row order, computed one epoch ahead on a background thread.

    ``batching.epoch_order`` is a CPU randperm, so that the fast loop and the
    step-wise cards shuffle alike on any device. For millions of rows it takes
    tens of milliseconds, which at an epoch boundary the GPU would spend idle;
    computed during the previous epoch, it is ready when needed.
    """

    def __init__(self, rows: int, seed: int, shuffle: bool, pin: bool):
        self.rows, self.seed, self.shuffle, self.pin = rows, seed, shuffle, pin
        self._ahead: dict[int, Future] = {}

    def get(self, epoch: int) -> torch.Tensor:
        future = self._ahead.pop(epoch, None)
        order = future.result() if future is not None else self._compute(epoch)
        self._ahead = {epoch + 1: self._in_background(epoch + 1)}
        return order

    def settle(self) -> None:
        """Wait for the order being computed ahead, if any, so that no thread of ours is
        still inside torch when training ends (at the process's exit that can abort it)."""
        wait(list(self._ahead.values()))

    def _in_background(self, epoch: int) -> Future:
        # A daemon thread per epoch, not an executor: an executor's idle worker is a
        # non-daemon thread that outlives training and holds up the process's exit.
        future: Future = Future()

        def compute() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(self._compute(epoch))
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on it
                    future.set_exception(exc)

        threading.Thread(target=compute, name="prefect-torch-order", daemon=True).start()
        return future

    def _compute(self, epoch: int) -> torch.Tensor:
        order = epoch_order(self.rows, self.seed, epoch, self.shuffle)
        # Pinned, so its copy to the GPU can be non_blocking.
        return order.pin_memory() if self.pin else order


class ResidentSource:
    """The split on the device; each epoch gathered once, batches sliced from it."""

    kind = "resident"

    def __init__(self, train: TensorSplit, device: torch.device, seed: int, shuffle: bool):
        self.data = train.to(device)
        self.device = device
        self.shuffle = shuffle
        self.orders = EpochOrders(len(self.data), seed, shuffle, pin=device.type == "cuda")

    def __len__(self) -> int:
        return len(self.data)

    def settle(self) -> None:
        self.orders.settle()

    def epoch_data(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The split in this epoch's order: one gather on the device."""
        if not self.shuffle:
            return self.data.X, self.data.y
        order = self.orders.get(epoch).to(self.device, non_blocking=True)
        return self.data.X.index_select(0, order), self.data.y.index_select(0, order)

    def batches(self, epoch: int, plans: Sequence[BatchPlan]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        features, target = self.epoch_data(epoch)
        for plan in plans:
            yield features[plan.start:plan.stop], target[plan.start:plan.stop]


class StreamingSource:
    """The split in host memory; batches gathered on the host and copied ahead."""

    kind = "stream"

    def __init__(self, train: TensorSplit, device: torch.device, batch_size: int, seed: int, shuffle: bool):
        # index_select needs contiguous rows to copy them fast.
        self.data = TensorSplit(train.X.to("cpu").contiguous(), train.y.to("cpu").contiguous())
        self.device = device
        self.batch_size = batch_size
        self.orders = EpochOrders(len(self.data), seed, shuffle, pin=False)
        self._staging: list[_Staging] = []
        self._copy_stream = None
        if device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(device)
            # Refilling a buffer first waits for its previous H2D copy; with one more
            # buffer than batches queued, that copy started batches ago and is done.
            self._staging = [_Staging.pinned(self.data, batch_size) for _ in range(PREFETCH_DEPTH + 1)]

    def __len__(self) -> int:
        return len(self.data)

    def settle(self) -> None:
        self.orders.settle()

    def epoch_data(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split in this epoch's order, on the host."""
        order = self.orders.get(epoch)
        return self.data.X.index_select(0, order), self.data.y.index_select(0, order)

    def batches(self, epoch: int, plans: Sequence[BatchPlan]) -> "_Prefetcher":
        return _Prefetcher(self, self.orders.get(epoch), list(plans))


@dataclass
class _Staging:
    """A pinned host buffer for one batch, and the event of its last H2D copy."""

    X: torch.Tensor
    y: torch.Tensor
    copied: "torch.cuda.Event | None" = None

    @classmethod
    def pinned(cls, data: TensorSplit, rows: int) -> "_Staging":
        return cls(
            torch.empty((rows, *data.X.shape[1:]), dtype=data.X.dtype, pin_memory=True),
            torch.empty((rows, *data.y.shape[1:]), dtype=data.y.dtype, pin_memory=True),
        )


class _Done:
    pass


@dataclass
class _Failed:
    error: BaseException


class _Prefetcher:
    """Iterator over one epoch's batches, loaded by a background thread.

    The thread runs ``PREFETCH_DEPTH`` batches ahead. Use it as a context manager
    (or call ``close``) so an interrupted epoch stops the thread.
    """

    def __init__(self, source: StreamingSource, order: torch.Tensor, plans: list[BatchPlan]):
        self._source = source
        self._order = order
        self._plans = plans
        self._ready: queue.Queue = queue.Queue(maxsize=PREFETCH_DEPTH)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._produce, name="prefect-torch-batches", daemon=True)
        self._thread.start()

    # -- consumer side (the training loop) -------------------------------------

    def __iter__(self) -> "_Prefetcher":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._finished:
            raise StopIteration
        item = self._ready.get()
        if isinstance(item, _Done):
            self._finish()
            raise StopIteration
        if isinstance(item, _Failed):
            self._finish()
            raise item.error
        xb, yb, copied = item
        if copied is not None:
            # The training stream waits for the copy on the GPU; the host does not wait.
            stream = torch.cuda.current_stream(self._source.device)
            stream.wait_event(copied)
            # The batch was allocated on the copy stream: keep its memory from being
            # reused there until the training stream is done with it.
            xb.record_stream(stream)
            yb.record_stream(stream)
        return xb, yb

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            self._drain()
            self._thread.join(timeout=0.05)
        self._drain()
        self._finished = True

    def __enter__(self) -> "_Prefetcher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _finish(self) -> None:
        self._finished = True
        self._thread.join()

    def _drain(self) -> None:
        try:
            while True:
                self._ready.get_nowait()
        except queue.Empty:
            pass

    # -- producer side (the background thread) -------------------------------

    def _produce(self) -> None:
        try:
            source = self._source
            if source.device.type == "cuda":
                with torch.cuda.device(source.device):
                    self._produce_cuda()
            else:
                for plan in self._plans:
                    rows = self._order[plan.start:plan.stop]
                    batch = (source.data.X.index_select(0, rows), source.data.y.index_select(0, rows), None)
                    if not self._put(batch):
                        return
            self._put(_Done())
        except BaseException as error:  # handed to the training loop, which re-raises it
            self._put(_Failed(error))

    def _produce_cuda(self) -> None:
        source = self._source
        stream = source._copy_stream
        for number, plan in enumerate(self._plans):
            staging = source._staging[number % len(source._staging)]
            if staging.copied is not None:
                # Its previous H2D copy must finish before the buffer is refilled. This
                # waits on the copy stream only, in this thread, never on training.
                staging.copied.synchronize()
            rows = self._order[plan.start:plan.stop]
            count = len(rows)
            torch.index_select(source.data.X, 0, rows, out=staging.X[:count])
            torch.index_select(source.data.y, 0, rows, out=staging.y[:count])
            with torch.cuda.stream(stream):
                xb = staging.X[:count].to(source.device, non_blocking=True)
                yb = staging.y[:count].to(source.device, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(stream)
            staging.copied = copied
            if not self._put((xb, yb, copied)):
                return

    def _put(self, item) -> bool:
        """Queue ``item`` unless the loop has stopped listening; False when stopped."""
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False


def _split_bytes(split: TensorSplit) -> int:
    return split.X.element_size() * split.X.nelement() + split.y.element_size() * split.y.nelement()


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"
