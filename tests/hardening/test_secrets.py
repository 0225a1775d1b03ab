"""Canary credentials: a Torch Storage block whose access key and secret are unique
random strings goes through a successful run, a run with S3 down and a run that
crashes, with Prefect, botocore and s3fs logging at DEBUG. Neither canary may
appear anywhere a user or an operator can read: captured logs (in-process records,
a child's stdout and stderr), the runs' API logs, flow-run parameters, task runs
(inputs, names, states), artifacts, state messages, and block documents read
without secrets.

botocore logs every request's ``Authorization`` header at DEBUG, with the access
key in it; prefect-torch redacts registered credentials from every log record
(``prefect_torch.blocks.redaction``). Each channel has a positive control, so a
channel that captured nothing cannot pass for a clean one.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from prefect import flow

from prefect_torch.blocks import TorchStorage
from prefect_torch.engine.data import LoadSpec
from prefect_torch.engine.loop import TrainSpec
from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec
from prefect_torch.engine.persist import save_model
from prefect_torch.engine.split import SplitSpec
from prefect_torch.errors import StorageError
from prefect_torch.flows.routing import model_upload
from prefect_torch.tasks import data_load, data_split, evaluate, model_define, train
from prefect_torch.tasks._common import persisted_in
from tests.datasets import noisy_linear

pytestmark = [pytest.mark.s3, pytest.mark.slow, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]
DEBUG_LOGGERS = ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "prefect", "prefect_torch")


class _Capture(logging.Handler):
    """Every record, formatted with its traceback, from every logger it is attached to."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class _DebugEverywhere:
    """DEBUG on for Prefect, botocore and s3fs, and a capture on every logger that
    does not propagate to the root (Prefect's run loggers among them)."""

    def __enter__(self) -> _Capture:
        self.capture = _Capture()
        self.saved = {}
        for name in DEBUG_LOGGERS:
            logger = logging.getLogger(name)
            self.saved[name] = logger.level
            logger.setLevel(logging.DEBUG)
        self.attached = [logging.getLogger()] + [
            logger for logger in logging.Logger.manager.loggerDict.values()
            if isinstance(logger, logging.Logger) and not logger.propagate
        ]
        for logger in self.attached:
            logger.addHandler(self.capture)
        return self.capture

    def __exit__(self, *exc) -> None:
        for logger in self.attached:
            logger.removeHandler(self.capture)
        for name, level in self.saved.items():
            logging.getLogger(name).setLevel(level)


def _canaries(s3_server) -> dict[str, str]:
    canaries = {"access key": s3_server.access_key, "secret": s3_server.secret_key}
    assert all(len(v) >= 16 for v in canaries.values())  # unique random strings, not words
    return canaries


def _assert_clean(text: str, canaries: dict[str, str], where: str) -> None:
    leaked = [name for name, value in canaries.items() if value in text]
    assert not leaked, f"the canary {', '.join(leaked)} appeared in {where}"


@flow(name="canary-success")
def canary_success(storage: TorchStorage, csv: str, scratch: str):
    load, split, define, fit, score = persisted_in(storage, data_load, data_split, model_define, train, evaluate)
    splits = split(load(LoadSpec(uri=csv)), SplitSpec(target="y"))
    handle = define(ModelSpec(hidden=[8]), splits)
    trained = fit(splits, handle, OptimizerSpec(), TrainSpec(epochs=2, batch_size=16, device="cpu"))
    metrics = score(trained.model, splits, "test")
    local = save_model(trained.model.model, trained.model.spec, splits.info, scratch)
    # The block itself is a task parameter here, as in pool_train_flow.
    return model_upload(local, storage, "models/canary"), metrics


def _api_record(flow_run_ids: list[uuid.UUID], block_name: str) -> dict[str, str]:
    """What the Prefect API holds about these runs, as text, channel by channel."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        flow_runs = [client.read_flow_run(i) for i in flow_run_ids]
        states = [s for i in flow_run_ids for s in client.read_flow_run_states(i)]
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)), limit=200)
        offset = len(logs)
        while True:  # every page
            more = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)),
                                    limit=200, offset=offset)
            if not more:
                break
            logs += more
            offset += len(more)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids)))
        blocks = client.read_block_documents(include_secrets=False, limit=200)
        blocks.append(client.read_block_document_by_name(block_name, "torch-storage", include_secrets=False))
    return {
        "flow-run parameters": "\n".join(r.model_dump_json(include={"parameters"}) for r in flow_runs),
        "flow runs": "\n".join(r.model_dump_json() for r in flow_runs),
        "state messages": "\n".join(s.model_dump_json(exclude={"data"}) for s in states),
        "task runs (inputs, names, states)": "\n".join(r.model_dump_json() for r in task_runs),
        "API logs": "\n".join(log.message for log in logs),
        "artifacts": "\n".join(a.model_dump_json() for a in artifacts),
        "block documents": "\n".join(b.model_dump_json() for b in blocks),
    }


def test_canary_credentials_appear_in_no_log_run_or_block(s3_server, prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    canaries = _canaries(s3_server)
    csv = tmp_path / "data.csv"
    noisy_linear(200, features=3, seed=6).to_csv(csv, index=False)
    tag = uuid.uuid4().hex[:8]
    block_name = f"canary-{tag}"
    TorchStorage(**s3_server.block_fields(f"canary-{tag}")).save(block_name)
    storage = TorchStorage.load(block_name)

    # The success path and the S3-down path, in this process.
    with _DebugEverywhere() as captured:
        ok = canary_success(storage, str(csv), str(tmp_path / "model"), return_state=True)
        s3_server.stop()
        try:
            down = canary_success(TorchStorage(**s3_server.block_fields(f"canary-down-{tag}")), str(csv),
                                  str(tmp_path / "model-down"), return_state=True)
        finally:
            s3_server.start()
    assert ok.is_completed(), ok
    assert down.is_failed(), down
    with pytest.raises(StorageError):
        down.result()
    _assert_clean(captured.text, canaries, "in-process log records")
    # Controls: botocore's request lines (where the key would be) and the outage were captured.
    assert "Credential=***" in captured.text
    assert "EndpointConnectionError" in captured.text

    # The crash path, in a child process, logging to stderr and to the API.
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "home"),
           "PREFECT_LOGGING_LEVEL": "DEBUG", "PREFECT_LOGGING_EXTRA_LOGGERS": "botocore,s3fs,prefect_torch",
           "PYTHONUNBUFFERED": "1"}
    child = subprocess.run([sys.executable, "-m", "tests.hardening.canary_run", block_name, str(csv)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    output = child.stdout + child.stderr
    assert child.returncode != 0, output[-3000:]
    _assert_clean(output, canaries, "the crashed child's stdout/stderr")
    assert "Credential=***" in output and "Traceback" in output, output[-3000:]

    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter

        crashed = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["canary-crash"])),
                                        flow_run_filter=FlowRunFilter())
    crashed = [r for r in crashed if r.parameters.get("csv") == str(csv)]
    assert len(crashed) == 1 and crashed[0].state.is_crashed(), crashed
    ids = [ok.state_details.flow_run_id, down.state_details.flow_run_id, crashed[0].id]

    record = _await_logs(ids, block_name)
    for where, text in record.items():
        _assert_clean(text, canaries, where)
    # Controls: each channel held what a leak would hide in.
    assert "Credential=***" in record["API logs"]  # botocore DEBUG reached the API
    assert "StorageError" in record["state messages"] or "Could not" in record["state messages"]
    assert "storage" in record["flow-run parameters"] and "**********" in record["flow-run parameters"]
    assert record["artifacts"] and record["task runs (inputs, names, states)"]
    assert block_name in record["block documents"] and "********" in record["block documents"]


def _await_logs(ids, block_name: str) -> dict[str, str]:
    # Logs reach the API in batches: wait until the crash's traceback is there.
    deadline = time.monotonic() + 30
    while True:
        record = _api_record(ids, block_name)
        if "Credential=***" in record["API logs"] or time.monotonic() > deadline:
            return record
        time.sleep(0.5)
