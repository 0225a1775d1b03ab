"""The prefect-torch result serializer and the result storage that refuses pickle."""

from __future__ import annotations

import base64
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from prefect import flow, task
from prefect.blocks.core import Block
from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
from prefect.cache_policies import INPUTS
from prefect.results import ResultStore
from prefect.serializers import PickleSerializer, Serializer
from prefect.testing.utilities import prefect_test_harness
from pydantic import BaseModel

from prefect_torch.blocks import (
    Recordable,
    TorchResultStorage,
    TorchSerializer,
    TorchStorage,
    check_result_bytes,
    decode_value,
    encode_value,
    result_options,
    result_store,
)
from prefect_torch.engine.records import decode_record, encode_record
from prefect_torch.errors import IntegrityError
from tests.support.s3 import S3Server


class Scaler(Recordable):
    """A small Recordable used by these tests."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, eps: float) -> None:
        self.mean, self.std, self.eps = mean, std, eps

    def __record__(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"mean": self.mean, "std": self.std}, {"eps": self.eps}

    @classmethod
    def __from_record__(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "Scaler":
        return cls(tensors["mean"], tensors["std"], meta["eps"])


class Spec(BaseModel, Recordable):
    """A pydantic spec: Recordable with no methods of its own."""

    lr: float
    layers: list[int]


class NotRecordable:
    @classmethod
    def __from_record__(cls, tensors: Any, meta: Any) -> Any:
        raise AssertionError("a record must never reach a non-Recordable class")


class Explodes:
    """Unpickling this creates a marker folder: proof that pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> Any:
        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def round_trip(value: Any) -> Any:
    serializer = TorchSerializer()
    blob = serializer.dumps(value)
    blob.decode("ascii")  # Prefect embeds it in a JSON envelope as text
    return Serializer(type="prefect-torch").loads(blob)


# -- values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [None, True, False, 0, -7, 2**70, 1.5, "text", "", [], {}, [1, "a", None, [2.5]],
     {"a": {"b": [1, {"c": None}]}}, (1, (2, "x")), {1: "int key", (2, 3): "tuple key"},
     {"__ptorch__": "a user key that looks like our tag"}, b"\x00\x80raw", b""],
    ids=repr,
)
def test_plain_values_round_trip_exactly(value: Any) -> None:
    decoded = round_trip(value)
    assert decoded == value
    assert type(decoded) is type(value)


def test_special_floats_round_trip() -> None:
    decoded = round_trip([float("inf"), float("-inf"), float("nan"), -0.0])
    assert decoded[:2] == [float("inf"), float("-inf")]
    assert math.isnan(decoded[2]) and math.copysign(1, decoded[3]) == -1


def test_tensors_inside_containers_round_trip() -> None:
    value = {
        "weights": {"w": torch.randn(3, 4), "b": torch.zeros(4, dtype=torch.float64)},
        "history": [{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.5}],
        "pair": (torch.arange(3), "label"),
        "same_twice": [torch.ones(2)] * 2,
    }
    decoded = round_trip(value)
    assert torch.equal(decoded["weights"]["w"], value["weights"]["w"])
    assert decoded["weights"]["b"].dtype == torch.float64
    assert decoded["history"] == value["history"]
    assert isinstance(decoded["pair"], tuple) and decoded["pair"][1] == "label"
    assert torch.equal(decoded["pair"][0], torch.arange(3))
    assert all(torch.equal(t, torch.ones(2)) for t in decoded["same_twice"])


def test_parameters_and_requires_grad_are_kept() -> None:
    param = torch.nn.Parameter(torch.randn(2, 2))
    leaf = torch.randn(3, requires_grad=True)
    decoded = round_trip({"param": param, "leaf": leaf, "plain": torch.ones(1)})
    assert isinstance(decoded["param"], torch.nn.Parameter)
    assert decoded["param"].requires_grad
    assert torch.equal(decoded["param"].detach(), param.detach())
    assert decoded["leaf"].requires_grad and not decoded["plain"].requires_grad


def test_numpy_and_dataframes_round_trip() -> None:
    frame = pd.DataFrame({"x": [1.0, 2.5, None], "label": ["a", "b", "c"]})
    array = np.arange(6, dtype=np.int32).reshape(2, 3)
    decoded = round_trip({"frame": frame, "array": array, "metric": np.float64(0.25)})
    pd.testing.assert_frame_equal(decoded["frame"], frame)
    np.testing.assert_array_equal(decoded["array"], array)
    assert decoded["array"].dtype == np.int32
    assert decoded["metric"] == 0.25 and type(decoded["metric"]) is float


def test_exceptions_keep_type_and_message_but_run_no_foreign_code() -> None:
    decoded = round_trip([ValueError("bad lr"), IntegrityError("corrupt"), _Custom("x")])
    assert type(decoded[0]) is ValueError and str(decoded[0]) == "bad lr"
    assert type(decoded[1]) is IntegrityError and str(decoded[1]) == "corrupt"
    assert type(decoded[2]) is RuntimeError and "_Custom: x" in str(decoded[2])


class _Custom(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)


def test_recordables_round_trip_inside_containers() -> None:
    first = Scaler(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]), eps=1e-6)
    second = Scaler(torch.tensor([3.0]), torch.tensor([2.0]), eps=0.1)
    decoded = round_trip({"scalers": [first, second], "epoch": 4})
    restored = decoded["scalers"]
    assert [type(s) for s in restored] == [Scaler, Scaler]
    assert torch.equal(restored[0].mean, first.mean) and restored[0].eps == 1e-6
    assert torch.equal(restored[1].std, second.std) and restored[1].eps == 0.1


def test_pydantic_recordables_round_trip() -> None:
    spec = Spec(lr=1e-3, layers=[8, 4])
    assert round_trip({"spec": spec}) == {"spec": spec}


def test_unsupported_values_fail_with_a_fix() -> None:
    with pytest.raises(TypeError, match="Recordable"):
        TorchSerializer().dumps({"when": object()})
    with pytest.raises(TypeError, match="importable"):
        encode_value(_local_recordable())


def _local_recordable() -> Recordable:
    class Local(Recordable):
        def __record__(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            return {}, {}

    return Local()


# -- refusing what is not ours --------------------------------------------------------


def crafted_value_record(tree: Any) -> bytes:
    """A record with a valid digest whose value tree we choose: what an attacker
    with write access to the storage could produce."""
    return encode_record({}, {"kind": "prefect-torch.value", "value": tree})


@pytest.mark.parametrize(
    "type_name",
    ["os:system", "builtins:eval", "subprocess:Popen",
     f"{NotRecordable.__module__}:NotRecordable",
     "prefect_torch.blocks.serializer:Recordable", "os", "not a name:x", 42],
)
def test_records_cannot_recreate_anything_but_recordables(type_name: Any) -> None:
    tree = {"__ptorch__": "record", "type": type_name, "tensors": {}, "meta": {}}
    with pytest.raises(IntegrityError, match="(?i)untrusted|malformed"):
        decode_value(crafted_value_record(tree))


def test_malformed_value_trees_are_integrity_errors() -> None:
    for tree in (
        {"__ptorch__": "tensor", "key": "missing"},
        {"__ptorch__": "no-such-kind"},
        {"__ptorch__": "dict", "items": [[[1], 2]]},  # unhashable key
    ):
        with pytest.raises(IntegrityError):
            decode_value(crafted_value_record(tree))
    with pytest.raises(IntegrityError, match="not a prefect-torch value"):
        decode_value(encode_record({}, {"kind": "something-else"}))


def test_any_change_to_serialized_text_is_detected() -> None:
    blob = TorchSerializer().dumps({"w": torch.randn(8), "epoch": 3})
    for position in range(0, len(blob), 3):
        changed = bytearray(blob)
        changed[position] = ord("A") if changed[position] != ord("A") else ord("B")
        with pytest.raises(IntegrityError):
            TorchSerializer().loads(bytes(changed))
    with pytest.raises(IntegrityError):
        TorchSerializer().loads(blob[: len(blob) // 2])


def pickle_envelope(marker: Path, key: str = "planted") -> bytes:
    """A genuine Prefect result record written with the pickle serializer."""
    record = ResultRecord(
        result=Explodes(marker),
        metadata=ResultRecordMetadata(serializer=PickleSerializer(), storage_key=key),
    )
    return record.serialize()


def test_check_refuses_other_serializers_without_deserialising(tmp_path: Path) -> None:
    marker = tmp_path / "pickle-ran"
    envelope = pickle_envelope(marker)
    document = json.loads(envelope)
    ours = {"type": "prefect-torch"}
    good_result = TorchSerializer().dumps(1).decode()
    attempts = {
        "pickle envelope": envelope,
        "raw pickle": base64.b64decode(document["result"]),
        "base64 pickle": document["result"].encode(),
        "no serializer named": json.dumps({"result": document["result"]}).encode(),
        "json serializer": json.dumps(
            {"metadata": {"serializer": {"type": "json"}}, "result": "1"}
        ).encode(),
        "old-format override": json.dumps(
            {"metadata": {"serializer": ours}, "serializer": {"type": "pickle"},
             "result": good_result}
        ).encode(),
        "extra serializer options": json.dumps(
            {"metadata": {"serializer": {**ours, "picklelib": "pickle"}},
             "result": good_result}
        ).encode(),
        "duplicate keys": (
            b'{"metadata":{"serializer":{"type":"pickle"}},'
            b'"metadata":{"serializer":{"type":"prefect-torch"}},"result":"x"}'
        ),
        "result not text": json.dumps({"metadata": {"serializer": ours}, "result": [1]}).encode(),
        "data key with pickle": json.dumps(
            {"metadata": {"serializer": ours}, "result": good_result,
             "data": document["result"]}
        ).encode(),
    }
    for name, content in attempts.items():
        with pytest.raises(IntegrityError, match="(?i)untrusted"):
            check_result_bytes(content)
    assert not marker.exists()
    # What prefect-torch itself writes passes.
    check_result_bytes(encode_value({"ok": True}))
    check_result_bytes(TorchSerializer().dumps({"ok": True}))


# -- Prefect integration -----------------------------------------------------------------


def stored_results(storage: TorchStorage) -> list[str]:
    return storage.list("results")


def test_result_store_round_trip_and_write_refusal(tmp_path: Path) -> None:
    storage = TorchStorage(basepath=str(tmp_path))
    store = result_store(storage)
    store.write({"w": torch.ones(3), "step": 7}, key="state-1")
    assert store.exists("state-1")
    value = store.read("state-1").result
    assert value["step"] == 7 and torch.equal(value["w"], torch.ones(3))
    assert stored_results(storage) == ["results/state-1"]

    pickling = ResultStore(
        result_storage=TorchResultStorage(storage=storage), serializer=PickleSerializer()
    )
    with pytest.raises(IntegrityError, match='result_serializer="prefect-torch"'):
        pickling.write({"w": 1}, key="state-2")
    assert not storage.exists("results/state-2")


def test_the_planted_pickle_is_live_without_the_guard(tmp_path: Path) -> None:
    # Control for the tests below: plain Prefect result storage over the same
    # folder runs the planted payload. TorchResultStorage is what stops it.
    storage = TorchStorage(basepath=str(tmp_path / "store"))
    marker = tmp_path / "pickle-ran"
    storage.write_path("results/planted", pickle_envelope(marker))
    unguarded = ResultStore(result_storage=storage, serializer=TorchSerializer())
    unguarded.read("results/planted")
    assert marker.exists()


def test_planted_pickle_result_is_refused_and_never_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = TorchStorage(basepath=str(tmp_path / "store"))
    marker = tmp_path / "pickle-ran"
    storage.write_path("results/planted", pickle_envelope(marker))
    store = result_store(storage)

    with caplog.at_level(logging.WARNING):
        assert not store.exists("planted")  # a cache miss, not a crash
        with pytest.raises(IntegrityError, match="Untrusted record.*'pickle'"):
            store.read("planted")

    assert not marker.exists()
    assert "Untrusted record" in caplog.text and "cache miss" in caplog.text


call_count = {"train": 0}


@task(cache_policy=INPUTS)
def train_step(seed: int) -> dict[str, Any]:
    call_count["train"] += 1
    torch.manual_seed(seed)
    return {"weights": torch.randn(4), "loss": 0.5, "seed": seed}


def run_training(storage: TorchStorage, seed: int = 0) -> dict[str, Any]:
    options = result_options(storage)

    @flow(persist_result=True)
    def training() -> dict[str, Any]:
        return train_step.with_options(**options)(seed)

    return training()


def test_result_options_save_a_loadable_result_storage(
    prefect_api: None, tmp_path: Path
) -> None:
    storage = TorchStorage(basepath=str(tmp_path), aws_secret_access_key="s3cr3t-value")
    options = result_options(storage)
    saved = options["result_storage"]
    # A saved block, so Prefect needs no API call to resolve it for each task run.
    assert isinstance(saved, TorchResultStorage) and saved._block_document_id is not None
    again = result_options(storage)["result_storage"]
    assert again._block_document_id == saved._block_document_id  # same place, same block
    assert isinstance(options["result_serializer"], TorchSerializer)
    loaded = Block.load(f"torch-result-storage/{saved._block_document_name}")
    assert isinstance(loaded, TorchResultStorage)
    assert loaded.storage.basepath == str(tmp_path)
    assert loaded.storage.aws_secret_access_key.get_secret_value() == "s3cr3t-value"


def test_result_storage_is_written_only_when_its_settings_change(prefect_api: None, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    def document(block: TorchResultStorage):
        with get_client(sync_client=True) as client:
            return client.read_block_document_by_name(
                block._block_document_name, block_type_slug="torch-result-storage", include_secrets=True
            )

    first = result_options(TorchStorage(basepath=str(tmp_path), aws_secret_access_key="one"))["result_storage"]
    written = document(first).updated
    same = result_options(TorchStorage(basepath=str(tmp_path), aws_secret_access_key="one"))["result_storage"]
    assert document(same).updated == written  # read back, not saved again
    assert same.storage.aws_secret_access_key.get_secret_value() == "one"

    # Same place (so the same block), a new secret: saved, and tasks get the new one.
    rotated = result_options(TorchStorage(basepath=str(tmp_path), aws_secret_access_key="two"))["result_storage"]
    assert rotated._block_document_name == first._block_document_name
    assert document(rotated).updated > written
    assert document(rotated).data["storage"]["aws_secret_access_key"] == "two"
    assert rotated.storage.aws_secret_access_key.get_secret_value() == "two"


def test_tasks_cache_with_prefect_torch_records(prefect_api: None, tmp_path: Path) -> None:
    storage = TorchStorage(basepath=str(tmp_path))
    call_count["train"] = 0

    first = run_training(storage)
    second = run_training(storage)

    assert call_count["train"] == 1  # the second run was a cache hit
    assert torch.equal(first["weights"], second["weights"])
    [key] = stored_results(storage)
    envelope = json.loads(storage.read_path(key))
    assert envelope["metadata"]["serializer"] == {"type": "prefect-torch"}
    assert decode_record(base64.b64decode(envelope["result"]))[1]["kind"] == (
        "prefect-torch.value"
    )


@task
def failing_step() -> None:
    raise ValueError("learning rate must be positive")


def test_failed_task_keeps_its_error_and_persists_it(
    prefect_api: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = TorchStorage(basepath=str(tmp_path))
    options = result_options(storage)

    @flow
    def training() -> None:
        failing_step.with_options(**options)()

    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="positive"):
        training()
    assert "Failed to write result" not in caplog.text
    [key] = stored_results(storage)
    error = result_store(storage).read(key.removeprefix("results/")).result
    assert type(error) is ValueError and "positive" in str(error)


def test_task_recomputes_over_a_planted_pickle_result(
    prefect_api: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = TorchStorage(basepath=str(tmp_path / "store"))
    marker = tmp_path / "pickle-ran"
    call_count["train"] = 0
    expected = run_training(storage, seed=1)
    [key] = stored_results(storage)
    # An attacker (or an old pickle-based run) replaces the cached result.
    storage.write_path(key, pickle_envelope(marker, key=key))

    with caplog.at_level(logging.WARNING):
        again = run_training(storage, seed=1)

    assert not marker.exists(), "the planted pickle ran"
    assert call_count["train"] == 2  # refused, so recomputed
    assert torch.equal(again["weights"], expected["weights"])
    assert "Untrusted record" in caplog.text
    check_result_bytes(storage.read_path(key))  # overwritten with a good record


def test_task_recomputes_over_a_corrupted_result(
    prefect_api: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = TorchStorage(basepath=str(tmp_path))
    call_count["train"] = 0
    expected = run_training(storage, seed=2)
    [key] = stored_results(storage)
    envelope = json.loads(storage.read_path(key))
    record = bytearray(base64.b64decode(envelope["result"]))
    record[-5] ^= 0x10  # one flipped bit in the payload
    envelope["result"] = base64.b64encode(bytes(record)).decode()
    storage.write_path(key, json.dumps(envelope).encode())

    with caplog.at_level(logging.WARNING):
        again = run_training(storage, seed=2)

    assert call_count["train"] == 2
    assert torch.equal(again["weights"], expected["weights"])
    assert "SHA-256 mismatch" in caplog.text and "cache miss" in caplog.text


@pytest.mark.s3
def test_results_on_s3_round_trip_and_refuse_pickle(
    s3_server: S3Server, tmp_path: Path
) -> None:
    storage = TorchStorage(**s3_server.block_fields("results-test"))
    store = result_store(storage)
    store.write({"w": torch.arange(4.0)}, key="good")
    assert torch.equal(store.read("good").result["w"], torch.arange(4.0))

    marker = tmp_path / "pickle-ran"
    storage.write_path("results/planted", pickle_envelope(marker))
    fresh_store = result_store(TorchStorage(**s3_server.block_fields("results-test")))
    assert not fresh_store.exists("planted")
    with pytest.raises(IntegrityError, match="Untrusted"):
        fresh_store.read("planted")
    assert not marker.exists()
