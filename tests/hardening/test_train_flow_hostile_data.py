"""Hostile data through the whole train_flow: the run ends Failed with the
DataError's message, before any training step, and leaves no model or cached
result behind. A well-formed file through the same path is the positive control.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from prefect_torch.engine.loop import TrainSpec
from prefect_torch.errors import DataError
from prefect_torch.flows.params import DatasetSpec
from prefect_torch.flows.train import train_flow

pytestmark = pytest.mark.timeout(300)


def _rows(n: int = 60) -> str:
    rng = np.random.default_rng(0)
    return "".join(f"{a:.3f},{b:.3f},{int(a + b > 0)}\n" for a, b in rng.normal(size=(n, 2)))


def _parquet(n: int = 60) -> bytes:
    frame = pd.read_csv(io.StringIO("a,b,y\n" + _rows(n)))
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    return buffer.getvalue()


HOSTILE = {
    "ragged-row": ("data.csv", ("a,b,y\n" + _rows(40) + "1.0,2.0\n" + _rows(5)).encode(),
                   "line 42: 2 fields, but the header has 3"),
    "latin-1": ("data.csv", ("a,b,y\n" + _rows(20)).encode() + b"0.5,0.1,caf\xe9\n",
                "line 22, character 12: byte 0xe9 is not valid UTF-8"),
    "unclosed-quote": ("data.csv", ('a,b,y\n' + _rows(10) + '1,"2,0\n' + _rows(3)).encode(),
                       "line 12, character 3: the quoted field that starts here is never closed"),
    "nan-feature": ("data.csv", ("a,b,y\n" + _rows(8) + "0.1,NaN,1\n" + _rows(20)).encode(),
                    "Feature column 'b' is empty or NaN at line 10 of"),
    "formula-feature": ("data.csv", ("a,b,y\n" + _rows(8) + "0.1,=cmd|' /C calc'!A0,1\n" + _rows(20)).encode(),
                        "Column 'b' has \"=cmd|' /C calc'!A0\" at line 10 of"),
    "truncated-parquet": ("data.parquet", _parquet()[:-100], "is not a readable Parquet file"),
}


def _run(path: Path):
    return train_flow(
        dataset=DatasetSpec(uri=str(path), target="y"),
        training=TrainSpec(epochs=2, batch_size=16, device="cpu"),
        return_state=True,
    )


def _task_names(flow_run_id, wait_for: str, timeout: float = 120.0) -> list[str]:
    """Names of the flow run's task runs, once the one named ``wait_for`` is final
    (task run states reach the API as events, a moment after the run)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            final = [r for r in runs if r.name.startswith(wait_for) and r.state and r.state.is_final()]
            if final or time.monotonic() > deadline:
                return [r.name for r in runs]
            time.sleep(0.25)


def _stored_value(path: Path):
    """The value a result record holds (a failed card stores its exception, nothing else)."""
    import json

    from prefect_torch.blocks.serializer import TorchSerializer

    return TorchSerializer().loads(json.loads(path.read_bytes())["result"].encode())


def _stored_files(home: Path) -> set[str]:
    storage = home / "storage"
    return {p.name for p in storage.rglob("*") if p.is_file()} if storage.exists() else set()


def test_valid_data_trains_and_saves_a_model(prefect_home, tmp_path):
    """Positive control: the same flow and checks see a model and a train task."""
    path = tmp_path / "data.csv"
    path.write_text("a,b,y\n" + _rows(80))
    state = _run(path)
    assert state.is_completed(), state.message
    result = state.result()
    assert Path(result.model_uri).is_relative_to(prefect_home / "prefect-torch" / "models")
    assert (Path(result.model_uri) / "model.safetensors").exists()
    assert "train[" in " ".join(_task_names(state.state_details.flow_run_id, "evaluate"))


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_data_fails_the_flow_before_training_and_writes_nothing(prefect_home, tmp_path, case):
    name, content, expected = HOSTILE[case]
    path = tmp_path / name
    path.write_bytes(content)

    state = _run(path)

    assert state.is_failed(), state.message
    assert "Flow run encountered an exception: DataError: " in state.message, state.message
    assert expected in state.message, state.message
    error = state.result(raise_on_failure=False)
    assert isinstance(error, DataError) and expected in str(error)

    # No model folder, no cached card result, and no result but Prefect's record of the failure.
    assert not (prefect_home / "prefect-torch" / "models").exists()
    results = prefect_home / "prefect-torch" / "results"
    stored = [p for p in results.rglob("*") if p.is_file()] if results.exists() else []
    # Only a card that finished (data_load, when the split refuses the rows) is cached,
    # keyed by its lineage; the failing card stored just its exception.
    cached = [p.name for p in stored if not isinstance(_stored_value(p), Exception)]
    assert all(name.startswith("data_load-") for name in cached), cached
    failure_record = Path(state.data.metadata.storage_key).name
    assert _stored_files(prefect_home) <= {failure_record}

    # It failed in a data card: no training task ever started.
    card = "data_split" if "feature" in case else "data_load"
    names = _task_names(state.state_details.flow_run_id, card)
    assert any(n.startswith(card) for n in names), names
    assert not any(n.startswith(("train[", "model_define", "evaluate")) for n in names), names


def test_failed_flow_run_record_is_not_pickle(prefect_home, tmp_path):
    name, content, _ = HOSTILE["ragged-row"]
    path = tmp_path / name
    path.write_bytes(content)
    state = _run(path)
    assert state.is_failed()
    record = Path(state.data.metadata.storage_key).read_bytes()
    # Prefect's pickle serializers write base64 of a pickle stream: protocol 4/5
    # streams start b"\x80\x04"/b"\x80\x05", i.e. "gAS"/"gAW" in base64.
    assert not record.lstrip().startswith((b"gAS", b"gAW")), record[:80]
    # It is a verified prefect-torch record instead (base64, as Prefect stores it).
    import base64

    from prefect_torch.engine.records import MAGIC

    assert base64.b64decode(record.strip()).startswith(MAGIC), record[:80]
