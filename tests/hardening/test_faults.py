"""Faults during training, with real components only: signals to a real
``prefect-torch train`` process, a real SeaweedFS stopped and restarted mid-run, a
writer SIGKILLed mid-upload, and a task timeout on a CPU-bound step.

Each ends in a typed error or a correct result: never a hang, a run left Running,
a silent wrong answer, or a damaged stored result.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefect_torch.engine.loop import Callback
from tests.datasets import noisy_linear
from tests.support.s3 import retry_figures

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _flow_runs_named(name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))


def _wait_for(condition, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# -- 1. SIGTERM and Ctrl-C during training ----------------------------------------------

# 900 training rows in batches of 8: ~110 steps an epoch, 12 epochs: long enough that a
# signal sent after the first checkpoint lands mid-training, short enough for CI.
CLI_OPTIONS = ["--target", "y", "--epochs", "12", "--batch-size", "8", "--hidden", "16,16", "--dropout", "0.1",
               "--seed", "5", "--device", "cpu", "--lr", "0.01", "--json"]


# `prefect-torch` as started from a terminal, where Ctrl-C raises KeyboardInterrupt: a
# test run started in the background (`cmd &` in a script) hands its children SIGINT
# ignored, and Python keeps an ignored SIGINT ignored.
_CLI_WITH_CTRL_C = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'prefect-torch'; runpy.run_module('prefect_torch.cli', run_name='__main__', alter_sys=True)"
)


def _cli(csv: Path, home: Path, output: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": _api_url(),
           "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_TORCH_STORAGE_BLOCK", None)
    args = ["train", str(csv), *CLI_OPTIONS, "--output", str(output)]
    return subprocess.Popen(
        [sys.executable, "-c", _CLI_WITH_CTRL_C, *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _swallowed(output: str) -> str:
    """The run's "Exception ignored in ..." reports: where a signal's exception was lost."""
    lines = output.splitlines()
    found = [i for i, line in enumerate(lines) if line.startswith("Exception ignored")]
    return "".join("\n".join(lines[i:i + 12]) + "\n...\n" for i in found)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = list(folder.glob("*.safetensors"))
    assert len(files) == 1, f"expected one weights file in {folder}, found {files}"
    return load_file(files[0])


@pytest.fixture(scope="module")
def signal_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("signals")
    frame = noisy_linear(1300, features=4, seed=11)
    csv = folder / "reference.csv"
    frame.to_csv(csv, index=False)
    return folder, frame


@pytest.fixture(scope="module")
def uninterrupted(signal_dataset, prefect_harness):
    """The weights of the same training run without a signal (shared by both signals)."""
    folder, _ = signal_dataset
    child = _cli(folder / "reference.csv", folder / "home-reference", folder / "model-reference")
    out, _ = child.communicate(timeout=240)
    assert child.returncode == 0, out[-3000:]
    return _weights(folder / "model-reference")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_training_run_ends_final_and_resumes_bitwise(signal_dataset, uninterrupted, tmp_path, signum):
    folder, frame = signal_dataset
    # Same rows, own file name: the flow run is named after it, so the test finds its run.
    csv = tmp_path / f"signal-{signum.name.lower()}.csv"
    frame.to_csv(csv, index=False)
    home, output = tmp_path / "home", tmp_path / "model"
    checkpoints = home / "prefect-torch" / "checkpoints"

    child = _cli(csv, home, output)
    try:
        _wait_for(lambda: list(checkpoints.rglob("ckpt-*.json")) or child.poll() is not None,
                  timeout=180, what="the first checkpoint")
        assert child.poll() is None, "the run ended before it could be signalled:\n" + child.stdout.read()[-3000:]
        child.send_signal(signum)
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode != 0, "a signalled run must not report success:\n" + _swallowed(out) + out[-3000:]
    assert not output.exists(), "an interrupted run must not save a model"

    # The API knows the run ended: Crashed or Cancelled, never left Running.
    runs = _flow_runs_named(f"train[{csv.name}]")
    assert len(runs) == 1, runs
    state = runs[0].state
    assert state is not None and state.type.value in {"CRASHED", "CANCELLED"}, (state, out[-3000:])

    # The last checkpoint is complete, and a re-run resumes from it to the same weights.
    assert list(checkpoints.rglob("ckpt-*.json")), "the interrupted run left no checkpoint"
    rerun = _cli(csv, home, output)
    out, _ = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, out[-3000:]
    assert "resuming from the checkpoint" in out, out[-3000:]
    resumed = _weights(output)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


# -- 2. The S3 server stopped mid-run and restarted --------------------------------------


class _Outage(Callback):
    """A training callback that stops the S3 server at the end of epoch ``at`` and
    brings it back ``seconds`` later from another thread, so the writes at the end
    of the Train task (its result) meet a dead endpoint.

    The server dies with the thread that started it (PR_SET_PDEATHSIG), so that
    thread waits for ``done`` and the test then restarts the server from its own
    thread (``hand_back``).
    """

    def __init__(self, s3, at: int, seconds: float):
        self.s3, self.at, self.seconds = s3, at, seconds
        self.restarted: threading.Thread | None = None
        self.done = threading.Event()
        self.trained_at = self.back_at = 0.0  # wall clock: training over; S3 answering again

    def hand_back(self) -> None:
        self.done.set()
        if self.restarted is not None:
            self.restarted.join(timeout=120)
            self.s3.stop()
        self.s3.start()

    def on_epoch_end(self, trainer, record) -> None:
        self.trained_at = time.time()
        if record.epoch != self.at or self.restarted is not None:  # epochs count from 1
            return
        self.s3.stop()

        def restart() -> None:
            time.sleep(self.seconds)
            self.s3.start()
            self.back_at = time.time()
            self.done.wait(timeout=600)

        self.restarted = threading.Thread(target=restart, name="s3-restart", daemon=True)
        self.restarted.start()


def _s3_run(storage, csv: Path, home: Path, callbacks: list):
    """Load → split → define → train → evaluate with every result on ``storage``,
    then the model saved into it; returns (weights, metrics, the model read back)."""
    from prefect import flow
    from prefect.settings import PREFECT_HOME, temporary_settings

    from prefect_torch.blocks.registry import load_stored_model, save_model_folder
    from prefect_torch.engine.data import LoadSpec
    from prefect_torch.engine.loop import TrainSpec
    from prefect_torch.engine.models import ModelSpec
    from prefect_torch.engine.optim import OptimizerSpec
    from prefect_torch.engine.persist import save_model
    from prefect_torch.engine.split import SplitSpec
    from prefect_torch.tasks import data_load, data_split, evaluate, model_define, train
    from prefect_torch.tasks._common import persisted_in

    @flow(name="s3-outage")
    def pipeline():
        load, split, define, fit, score = persisted_in(storage, data_load, data_split, model_define, train, evaluate)
        splits = split(load(LoadSpec(uri=str(csv))), SplitSpec(target="y"))
        handle = define(ModelSpec(hidden=[16], dropout=0.1), splits)
        trained = fit(splits, handle, OptimizerSpec(lr=0.02), TrainSpec(epochs=3, batch_size=16, seed=2, device="cpu"),
                      callbacks=callbacks)
        metrics = score(trained.model, splits, "test")
        local = save_model(trained.model.model, trained.model.spec, splits.info, str(home / "model"))
        save_model_folder(storage, local, "models/run")
        return trained, metrics

    with temporary_settings({PREFECT_HOME: str(home)}):  # own checkpoints: no resume across runs
        trained, metrics = pipeline()
    stored = load_stored_model(storage, "models/run")
    return trained.model.model.state_dict(), metrics, stored.model.state_dict()


@pytest.mark.s3
def test_an_s3_restart_mid_run_is_ridden_through_with_the_same_result(s3_server, prefect_harness, tmp_path):
    from prefect_torch.blocks import TorchStorage

    csv = tmp_path / "data.csv"
    noisy_linear(300, features=4, seed=4).to_csv(csv, index=False)
    reference = _s3_run(TorchStorage(**s3_server.block_fields("outage-reference")), csv, tmp_path / "a", [])

    outage = _Outage(s3_server, at=1, seconds=3.0)
    storage = TorchStorage(**s3_server.block_fields("outage-faulted"))
    try:
        faulted = _s3_run(storage, csv, tmp_path / "b", [outage])
    finally:
        outage.hand_back()  # whatever happened, the session's server is left running
    assert outage.restarted is not None, "the outage never happened"
    # Training was over while S3 was down, and the Train card's result, written right
    # after, only landed once S3 was back: that write met the outage and rode it out.
    assert outage.trained_at < outage.back_at - 2, (outage.trained_at, outage.back_at)
    results = [p for p in storage.list("results") if p.rsplit("/", 1)[-1].startswith("train-")]
    assert len(results) == 1, results
    landed = s3_server.filesystem().info(storage.url(results[0]))["LastModified"].timestamp()
    assert landed >= outage.trained_at + 2, (landed, outage.trained_at)

    for a, b in zip(reference, faulted):
        if isinstance(a, dict) and all(isinstance(v, torch.Tensor) for v in a.values()):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert a == b
    assert all(torch.equal(faulted[0][k], faulted[2][k]) for k in faulted[0])  # what S3 holds is what trained


@pytest.mark.s3
def test_an_s3_outage_beyond_the_retry_bound_is_a_storage_error(s3_server, tmp_path):
    from prefect_torch.blocks import TorchStorage
    from prefect_torch.errors import StorageError

    from prefect_torch.blocks.storage import _RETRY_DEADLINE_S as RETRY_DEADLINE_S
    from prefect_torch.blocks.storage import _S3_CONNECT_TIMEOUT_S as CONNECT_TIMEOUT_S

    storage = TorchStorage(**s3_server.block_fields("outage-bound"))
    storage.write_path("kept.rec", b"kept")
    s3_server.stop()
    try:
        with pytest.raises(StorageError, match=r"after \d+ attempts over \d+ s.*S3 endpoint is running") as caught:
            storage.write_path("lost.rec", b"lost")
    finally:
        s3_server.start()
    # It rode out several seconds of backoff (0.5, 1, 2 s, ...), then gave up within its window
    # (overrun by at most one attempt slower than expected: a connect timeout).
    attempts, seconds = retry_figures(str(caught.value))
    assert attempts >= 4 and seconds <= RETRY_DEADLINE_S + CONNECT_TIMEOUT_S, (attempts, seconds)
    assert s3_server.endpoint_url in str(caught.value)
    assert storage.read_path("kept.rec") == b"kept"
    assert not storage.exists("lost.rec")


# -- 3. A writer SIGKILLed mid-upload to S3 ---------------------------------------------

_UPLOAD_MB = 96
_WRITER = """
import json, os, sys
from prefect_torch.blocks import TorchStorage
storage = TorchStorage(**json.loads(os.environ["TEST_STORAGE_FIELDS"]))
payload = bytes([2]) * ({mb} * 2**20)
print("UPLOADING", flush=True)
storage.write_path("big.bin", payload)
print("DONE", flush=True)
"""


def _unsent_bytes_to(pid: int, port: int) -> int:
    """Bytes the process has queued on TCP connections to ``port`` that the peer has
    not yet acknowledged (0 when it has no such connection): a request body in flight."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    queued = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if fields[9] in inodes and remote_port == port:
                    queued += int(fields[4].split(":")[0], 16)
    return queued


def _kill_a_writer_mid_upload(fields: dict, port: int, log: Path) -> bool:
    """Start a writer of a new ``big.bin`` and SIGKILL it while the PUT's body is on the
    wire. False if its upload finished before it could be caught; fails if it crashed."""
    env = {**os.environ, "TEST_STORAGE_FIELDS": json.dumps(fields)}
    with open(log, "w") as errors:
        child = subprocess.Popen([sys.executable, "-c", _WRITER.format(mb=_UPLOAD_MB)], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        assert child.stdout.readline().strip() == "UPLOADING", log.read_text()
        _wait_for(lambda: child.poll() is not None or _unsent_bytes_to(child.pid, port) > 0,
                  timeout=60, what="the upload to start", every=0.001)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
        rest = child.stdout.read()
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode == -signal.SIGKILL:
        assert "DONE" not in rest
        return True
    assert child.returncode == 0 and "DONE" in rest, f"the writer failed ({child.returncode}):\n{log.read_text()}"
    return False


@pytest.mark.s3
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc to see the upload in flight")
def test_a_writer_killed_mid_upload_leaves_the_previous_s3_object_whole(s3_server, tmp_path):
    import hashlib

    from prefect_torch.blocks import TorchStorage

    fields = s3_server.block_fields("killed-writer")
    storage = TorchStorage(**fields)
    previous = bytes([1]) * (_UPLOAD_MB * 2**20)
    storage.write_path("big.bin", previous)
    digest = hashlib.sha256(previous).hexdigest()
    finished = hashlib.sha256(bytes([2]) * (_UPLOAD_MB * 2**20)).hexdigest()  # what the writer uploads

    seen: list[str] = []
    reading = threading.Event()

    def reader() -> None:  # a reader during the upload sees the old object whole, or the new one whole
        while not reading.is_set():
            seen.append(hashlib.sha256(TorchStorage(**fields).read_path("big.bin")).hexdigest())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        # On a busy machine the watcher may not get the CPU while the body is on the wire,
        # and a kill after the whole body reached the kernel lets the upload complete: an
        # upload that completed proves nothing, so that attempt is repeated.
        for attempt in range(3):
            killed = _kill_a_writer_mid_upload(fields, s3_server.ports["s3.port"], tmp_path / f"writer-{attempt}.log")
            time.sleep(1)  # what the kernel still had queued for the dead writer arrives
            stored = hashlib.sha256(storage.read_path("big.bin")).hexdigest()
            assert stored in (digest, finished), "a killed upload left a partial object"
            if killed and stored == digest:
                break
            storage.write_path("big.bin", previous)  # the upload completed: put the old object back
        else:
            raise AssertionError("three uploads completed before the kill; none was caught mid-request")
    finally:
        reading.set()
        thread.join(timeout=60)

    assert hashlib.sha256(storage.read_path("big.bin")).hexdigest() == digest
    # Whole objects only: the old one, or the new one of an upload that completed first.
    assert set(seen) <= {digest, finished}, "a reader saw a partial or mixed object"
    assert storage.list("") == ["big.bin"]  # no stray part left listed
    storage.write_path("big.bin", b"next")  # and the key still takes writes
    assert storage.read_path("big.bin") == b"next"


# -- 4. A task timeout on a CPU-bound step ----------------------------------------------


def test_a_train_timeout_is_enforced_and_persists_no_result(prefect_home, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from prefect_torch.engine.data import LoadSpec
    from prefect_torch.engine.loop import TrainSpec
    from prefect_torch.engine.models import ModelSpec
    from prefect_torch.engine.optim import OptimizerSpec
    from prefect_torch.engine.split import SplitSpec
    from prefect_torch.tasks import data_load, data_split, model_define, train
    from prefect_torch.tasks._common import persisted_in

    csv = tmp_path / "data.csv"
    noisy_linear(400, features=4, seed=8).to_csv(csv, index=False)

    @flow(name="timed-train")
    def timed():
        load, split, define, fit = persisted_in(None, data_load, data_split, model_define, train)
        splits = split(load(LoadSpec(uri=str(csv))), SplitSpec(target="y"))
        handle = define(ModelSpec(hidden=[32, 32]), splits)
        # ~70 steps an epoch for 100k epochs: hours of CPU, against a 3 s limit.
        return fit.with_options(timeout_seconds=3)(
            splits, handle, OptimizerSpec(), TrainSpec(epochs=100_000, batch_size=4, device="cpu"))

    # Without the timeout this would train for hours (pytest-timeout stops a hang).
    state = timed(return_state=True)
    assert state.is_failed(), state
    with pytest.raises(TimeoutError):
        state.result()

    def train_run():
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        found = [r for r in runs if r.task_key.startswith("train") or r.name.startswith("train[")]
        return found[0] if found and found[0].state and found[0].state.is_final() else None

    run = _wait_for(train_run, timeout=30, what="the train task run's final state", every=0.2)
    assert run.state.name == "TimedOut", run.state
    assert run.state.type.value == "FAILED"

    records = [p.name for p in (prefect_home / "prefect-torch" / "results").iterdir()]
    assert any(name.startswith("data_split-") for name in records), records  # the cards before it did persist
    assert not [name for name in records if name.startswith("train-")], records  # the timed-out one did not
