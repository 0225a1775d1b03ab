"""The CUDA training path, checked on CPU.

There is no GPU in CI, so what makes the CUDA path fast is pinned down here by
properties that hold on any device: the step loop never reads a value back to
the host, the streaming batch source gives the resident one's batches exactly,
auto placement follows free memory, CUDA optimizer options are fused, and
torch.compile either works or fails with a message that says what to do.
The same checks on a real GPU are in tests/gpu/.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import traceback

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from prefect_torch.engine import compilation, streaming
from prefect_torch.engine.batching import epoch_order, plan_epoch
from prefect_torch.engine.device import check_precision
from prefect_torch.engine.loop import Callback, Trainer, TrainSpec
from prefect_torch.engine.models import ModelSpec, build_model
from prefect_torch.engine.optim import OptimizerSpec, build_optimizer, optimizer_options
from prefect_torch.engine.persist import load_model, save_model
from prefect_torch.engine.split import TensorSplit
from prefect_torch.engine.steps import DeviceScalar
from prefect_torch.engine.streaming import (
    Placement,
    ResidentSource,
    StreamingSource,
    choose_placement,
    resident_bytes,
)
from prefect_torch.errors import ConfigError, DeviceError, TrainingError
from tests.datasets import signal_splits

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only a name here: nothing below allocates on it


def make_splits(problem: str, rows: int = 203, seed: int = 0):
    return signal_splits(problem, rows, features=5, seed=seed)


def make_trainer(splits, spec: TrainSpec, optimizer: OptimizerSpec = OptimizerSpec(), callbacks=(),
                 cuda_optimizer: bool = False, model_spec: ModelSpec = ModelSpec(hidden=[16, 16])) -> Trainer:
    model = build_model(model_spec, splits.info.n_features, splits.info.n_outputs)
    if cuda_optimizer:
        # The options build_optimizer picks on CUDA (fused kernels, no host-side step counter).
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer.name]
        optim = cls(model.parameters(), **optimizer_options(optimizer, "cuda"))
    else:
        optim = build_optimizer(optimizer, model)
    return Trainer(model, optim, splits, spec, list(callbacks))


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ in {different}"


# -- no host sync in the step loop ----------------------------------------------

# Tensor operations that copy a value from the device to the host; on CUDA each
# one waits for every kernel queued before it.
HOST_READS = {"item", "tolist", "numpy", "cpu", "__float__", "__int__", "__index__", "__bool__",
              "__format__", "__array__"}


class HostReadRecorder(TorchFunctionMode):
    """Records tensor operations that read device values on the host, while ``active``.

    Torch function modes are per thread, so the streaming source's background
    thread (which only gathers host rows) is not recorded: only the loop is.
    """

    def __init__(self):
        super().__init__()
        self.active = False
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active and self._reads_host(func, args, kwargs):
            where = "".join(traceback.format_list(traceback.extract_stack(limit=6)[:-1]))
            self.reads.append(f"{getattr(func, '__name__', func)} at\n{where}")
        return func(*args, **kwargs)

    @staticmethod
    def _reads_host(func, args, kwargs) -> bool:
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            return True
        if name == "to":
            # An explicit move to the host. (A torch.device('cpu') argument is not flagged:
            # on this CPU-only run it is also the training device, which clipping and the
            # optimizer rightly move tensors to.)
            return "cpu" in (*args[1:], kwargs.get("device"))
        return False


class StepWindow(Callback):
    """Turns the recorder on after an epoch's first optimizer step, off after its last."""

    def __init__(self, recorder: HostReadRecorder):
        self.recorder = recorder
        self.windows = 0

    def on_step_end(self, trainer: Trainer) -> None:
        inside = trainer.state.batch < len(trainer.plans)
        self.windows += inside and not self.recorder.active
        self.recorder.active = inside


def host_reads_during_steps(trainer: Trainer, recorder: HostReadRecorder) -> list[str]:
    with recorder:
        trainer.fit()
    return recorder.reads


@pytest.mark.parametrize("placement", ["resident", "stream"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("optimizer,problem", [("adam", "regression"), ("adamw", "binary"), ("sgd", "multiclass")])
def test_step_loop_reads_nothing_back_from_the_device(placement, precision, optimizer, problem):
    recorder = HostReadRecorder()
    window = StepWindow(recorder)
    spec = TrainSpec(epochs=2, batch_size=16, accumulate=2, clip=1.0, precision=precision,
                     data_placement=placement, device="cpu")
    trainer = make_trainer(make_splits(problem), spec, OptimizerSpec(name=optimizer, momentum=0.9),
                           [window], cuda_optimizer=True)
    trainer.check_every_step = False  # what the loop does on CUDA

    reads = host_reads_during_steps(trainer, recorder)

    assert window.windows == 2  # the recorder watched both epochs' step loops
    assert not reads, "the step loop read from the device:\n" + "\n".join(reads)


def test_recorder_sees_the_per_step_nan_check():
    # The control for the test above: with the CPU-style check on, it must find the read.
    recorder = HostReadRecorder()
    spec = TrainSpec(epochs=1, batch_size=16, device="cpu")
    trainer = make_trainer(make_splits("regression"), spec, callbacks=[StepWindow(recorder)])
    assert trainer.check_every_step  # the default on CPU

    reads = host_reads_during_steps(trainer, recorder)

    assert any(read.startswith("__bool__") for read in reads)


class NaNAfter(nn.Module):
    """Fine for a few calls, then NaN: a run that diverges mid-epoch."""

    def __init__(self, in_features: int = 5, out_features: int = 1, fine_calls: int = 3):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.calls, self.fine_calls = 0, fine_calls

    def forward(self, x):
        self.calls += 1
        out = self.linear(x)
        return out if self.calls <= self.fine_calls else out * float("nan")


def test_without_per_step_checks_a_nan_loss_stops_the_run_at_the_epoch_end():
    spec = TrainSpec(epochs=3, batch_size=16, device="cpu")
    trainer = make_trainer(make_splits("regression"), spec,
                           model_spec=ModelSpec(module=f"{__name__}:NaNAfter"))
    trainer.check_every_step = False

    with pytest.raises(TrainingError, match=r"became nan at epoch 1\b.*Lower the learning rate"):
        trainer.fit()
    assert trainer.model.calls > trainer.model.fine_calls + 1  # it ran on past the bad step


def test_the_latest_loss_stays_on_the_device_for_progress_callbacks():
    seen = []

    class Progress(Callback):
        def on_step_end(self, trainer):
            seen.append(trainer.last_loss)

    trainer = make_trainer(make_splits("regression"), TrainSpec(epochs=1, batch_size=64, device="cpu"),
                           callbacks=[Progress()])
    trainer.fit()
    assert len(seen) == trainer.steps_per_epoch
    assert all(isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad for loss in seen)


# -- resident and streaming sources ---------------------------------------------


@pytest.mark.parametrize("problem", ["regression", "binary", "multiclass"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_streaming_and_resident_training_give_bitwise_identical_weights(problem, precision):
    # Ragged last batch, a partial accumulation group, clipping, a schedule and validation.
    spec = dict(epochs=3, batch_size=13, accumulate=3, clip=0.5, precision=precision, device="cpu",
                scheduler={"name": "cosine", "interval": "step"})
    splits = make_splits(problem)
    resident = make_trainer(splits, TrainSpec(**spec, data_placement="resident"))
    streamed = make_trainer(splits, TrainSpec(**spec, data_placement="stream"))

    resident_result, streamed_result = resident.fit(), streamed.fit()

    assert resident.placement.kind == "resident" and streamed.placement.kind == "stream"
    assert_same_weights(weights(resident), weights(streamed))
    strip = lambda history: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in history]
    assert strip(resident_result.history) == strip(streamed_result.history)


@pytest.mark.parametrize("shuffle", [True, False])
def test_sources_yield_the_same_batches_from_any_batch_of_an_epoch(shuffle):
    data = TensorSplit(torch.randn(101, 4), torch.randint(0, 3, (101,)))
    plans = plan_epoch(101, 10, 2)
    resident = ResidentSource(data, CPU, seed=7, shuffle=shuffle)
    streamed = StreamingSource(data, CPU, batch_size=10, seed=7, shuffle=shuffle)
    for epoch, first in [(0, 0), (2, 4)]:  # a whole epoch, and one resumed at batch 4
        with contextlib.closing(resident.batches(epoch, plans[first:])) as a, \
             contextlib.closing(streamed.batches(epoch, plans[first:])) as b:
            pairs = list(zip(a, b, strict=True))
        assert len(pairs) == len(plans) - first
        for (xa, ya), (xb, yb) in pairs:
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def batch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "prefect-torch-batches"]


def test_an_interrupted_epoch_stops_the_background_thread():
    source = StreamingSource(TensorSplit(torch.randn(500, 3), torch.randn(500, 1)), CPU, 5, 0, True)
    with contextlib.closing(source.batches(0, plan_epoch(500, 5, 1))) as batches:
        next(batches)
        assert len(batch_threads()) == 1
        next(batches)  # the loop stops here, e.g. a callback raised; 98 batches never read
    assert not batch_threads()


def test_the_next_epochs_order_is_ready_before_it_is_needed():
    orders = streaming.EpochOrders(rows=1000, seed=5, shuffle=True, pin=False)
    first = orders.get(0)
    ahead = orders._ahead[1]
    assert torch.equal(ahead.result(), epoch_order(1000, 5, 1))
    assert torch.equal(first, epoch_order(1000, 5, 0))
    assert orders.get(1) is ahead.result()
    assert torch.equal(orders.get(7), epoch_order(1000, 5, 7))  # a jump (resume) computes it directly


def test_an_error_in_the_background_thread_reaches_the_training_loop(monkeypatch):
    source = StreamingSource(TensorSplit(torch.randn(20, 3), torch.randn(20, 1)), CPU, 5, 0, True)
    monkeypatch.setattr(streaming, "epoch_order", lambda rows, *_: torch.arange(rows) * 100)  # rows out of range
    with contextlib.closing(source.batches(0, plan_epoch(20, 5, 1))) as batches:
        with pytest.raises(IndexError):
            next(batches)


def test_auto_placement_keeps_data_that_fits_on_the_gpu():
    placement = choose_placement("auto", CUDA, needed_bytes=3 * 2**30, free_bytes=40 * 2**30)
    assert placement == Placement("resident", placement.reason)
    assert "3.00 GiB" in placement.reason and "40.00 GiB" in placement.reason


def test_auto_placement_streams_data_larger_than_its_share_of_free_gpu_memory():
    placement = choose_placement("auto", CUDA, needed_bytes=30 * 2**30, free_bytes=40 * 2**30)
    assert placement.kind == "stream"
    assert "streaming" in placement.reason and "data_placement='resident'" in placement.reason


def test_placement_honours_an_explicit_choice_and_keeps_cpu_data_in_place():
    assert choose_placement("resident", CUDA, 10**15, free_bytes=1).kind == "resident"
    assert choose_placement("stream", CUDA, 1, free_bytes=10**15).kind == "stream"
    assert choose_placement("auto", CPU, 10**15).kind == "resident"
    with pytest.raises(ConfigError, match="Use one of: auto, resident, stream"):
        choose_placement("gpu", CUDA, 1, free_bytes=1)


def test_resident_bytes_count_the_epochs_shuffled_copy():
    train = TensorSplit(torch.zeros(100, 8), torch.zeros(100, 1))  # 3200 + 400 bytes
    val = TensorSplit(torch.zeros(10, 8), torch.zeros(10, dtype=torch.int64))  # 320 + 80 bytes
    assert resident_bytes(train, val) == 2 * 3600 + 400


def test_trainer_logs_the_placement_it_chose(caplog):
    with caplog.at_level(logging.INFO, logger="prefect_torch.engine.loop"):
        trainer = make_trainer(make_splits("regression"), TrainSpec(device="cpu", data_placement="stream"))
    assert trainer.placement.kind == "stream"
    assert "data placement: stream (data_placement='stream' was asked for)" in caplog.text


# -- optimizers and precision -----------------------------------------------------


@pytest.mark.parametrize("name,expected", [("adam", {"fused": True}), ("adamw", {"fused": True}),
                                           ("sgd", {"fused": True}), ("rmsprop", {"foreach": True})])
def test_cuda_optimizers_use_fused_or_multi_tensor_kernels(name, expected):
    options = optimizer_options(OptimizerSpec(name=name), "cuda")
    assert expected.items() <= options.items()
    cpu = optimizer_options(OptimizerSpec(name=name), "cpu")
    assert "fused" not in cpu and "foreach" not in cpu  # CPU keeps PyTorch's defaults


def test_bf16_is_refused_on_a_gpu_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(DeviceError, match=r"bfloat16.*Tesla T4.*precision='fp32'"):
        check_precision(CUDA, "bf16")
    check_precision(CUDA, "fp32")
    check_precision(CPU, "bf16")  # CPU autocast runs bf16


# -- torch.compile ----------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_training_matches_eager_and_saves_loadable_weights(monkeypatch, tmp_path, fresh_dynamo):
    # The 'eager' backend runs the traced graph without generating code: it checks our
    # compile wiring in seconds (the inductor run is the slow test below).
    monkeypatch.setattr(compilation, "BACKEND", "eager")
    splits = make_splits("binary")
    spec = dict(epochs=2, batch_size=32, device="cpu")
    plain = make_trainer(splits, TrainSpec(**spec))
    compiled = make_trainer(splits, TrainSpec(**spec, compile=True))
    plain.fit()
    compiled.fit()
    assert_same_weights(weights(plain), weights(compiled))

    uri = save_model(compiled.model, ModelSpec(hidden=[16, 16]), splits.info, str(tmp_path / "model"))
    loaded = load_model(uri)
    assert_same_weights(weights(compiled), {k: v for k, v in loaded.model.state_dict().items()})


def test_a_missing_cpp_compiler_fails_with_what_to_do(fresh_dynamo):
    trainer = make_trainer(make_splits("regression"), TrainSpec(epochs=1, device="cpu", compile=True))
    with torch._inductor.config.patch({"cpp.cxx": ("no-such-compiler-g++",)}):
        with pytest.raises(DeviceError) as failure:
            trainer.fit()
    message = str(failure.value)
    assert "could not compile the model on this machine" in message
    assert "No working C++ compiler" in message  # PyTorch's own cause, not its trace
    assert "compile=False" in message and "apt-get install g++" in message


def test_compile_unavailable_at_wrap_time_is_a_device_error(monkeypatch):
    def unsupported(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported on Python 3.99+")

    monkeypatch.setattr(torch, "compile", unsupported)
    with pytest.raises(DeviceError, match=r"not available here.*Python 3\.99.*compile=False"):
        make_trainer(make_splits("regression"), TrainSpec(device="cpu", compile=True))


def test_a_model_error_under_compile_is_reported_as_the_models_own(monkeypatch, fresh_dynamo):
    monkeypatch.setattr(compilation, "BACKEND", "eager")
    splits = make_splits("regression")
    model = nn.Linear(3, 1)  # the data has 5 features
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), splits,
                      TrainSpec(epochs=1, device="cpu", compile=True))
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied") as failure:
        trainer.fit()
    assert not isinstance(failure.value, DeviceError)


@pytest.mark.slow
def test_inductor_compiled_training_runs_on_cpu_and_its_weights_load(tmp_path, fresh_dynamo):
    splits = make_splits("multiclass")
    trainer = make_trainer(splits, TrainSpec(epochs=2, batch_size=32, device="cpu", compile=True))
    result = trainer.fit()
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] * 1.5
    uri = save_model(trainer.model, ModelSpec(hidden=[16, 16]), splits.info, str(tmp_path / "model"))
    loaded = load_model(uri)
    assert_same_weights(weights(trainer), dict(loaded.model.state_dict()))
    frame = pd.DataFrame(np.zeros((2, 5)), columns=[f"x{i}" for i in range(5)])
    assert len(loaded.predict(frame)) == 2


# -- values handed between cards ---------------------------------------------------


def test_device_scalar_reads_the_device_once_and_acts_as_a_number():
    recorder = HostReadRecorder()
    value = DeviceScalar(torch.tensor(2.5))
    with recorder:
        recorder.active = True
        assert (value + 1, 1 + value, value * 2, value / 2, -value) == (3.5, 3.5, 5.0, 1.25, -2.5)
        assert value < 3 and value == 2.5 and round(value) == 2 and f"{value:.2f}" == "2.50"
        assert sum([value, value]) == 5.0
    assert len(recorder.reads) == 1  # the first use copied it; the rest used the cached float
    assert value.tensor.dim() == 0
    with pytest.raises(ValueError, match="one-element tensor"):
        DeviceScalar(torch.zeros(3))


def test_loss_card_hands_on_the_loss_value_without_reading_it():
    from prefect_torch.tasks.steps import training_loss

    recorder = HostReadRecorder()
    batch = type("B", (), {"y": torch.randn(8, 1), "problem": "regression"})()
    with recorder:
        recorder.active = True
        out = training_loss.fn(torch.randn(8, 1, requires_grad=True), batch, "mse")
        recorder.active = False
    assert not recorder.reads
    assert isinstance(out.loss_value, DeviceScalar)
    assert float(out.loss_value) == pytest.approx(float(out.loss.detach()))
