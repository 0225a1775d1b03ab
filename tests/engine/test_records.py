"""The record format: round trips, and every corruption is caught."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from prefect_torch.engine.records import (
    MAGIC,
    decode_record,
    encode_record,
    is_record,
    sha256_hex,
    verify_record,
)
from prefect_torch.errors import IntegrityError


def small_record() -> bytes:
    return encode_record(
        {"weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": torch.tensor(7)},
        {"epoch": 2, "loss": 0.25, "names": ["a", "b"]},
    )


def test_round_trip_keeps_values_dtypes_shapes_and_meta() -> None:
    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "i64": torch.arange(10),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
    }
    meta = {"epoch": 3, "nested": {"lr": 1e-3, "ok": True, "none": None}, "z": [1, 2]}

    decoded, decoded_meta = decode_record(encode_record(tensors, meta))

    assert decoded_meta == meta
    assert list(decoded_meta) == list(meta)  # key order is part of the value
    assert set(decoded) == set(tensors)
    for name, tensor in tensors.items():
        assert decoded[name].dtype == tensor.dtype
        assert decoded[name].shape == tensor.shape
        assert decoded[name].device.type == "cpu"
        assert torch.equal(decoded[name], tensor)


def test_empty_record_round_trips() -> None:
    assert decode_record(encode_record({}, {})) == ({}, {})


def test_non_contiguous_shared_and_grad_tensors_are_stored_as_plain_copies() -> None:
    base = torch.arange(12.0).reshape(3, 4)
    weight = torch.nn.Parameter(torch.ones(2, 2))
    tensors = {"t": base.t(), "view": base[1], "base": base, "param": weight * 2}

    decoded, _ = decode_record(encode_record(tensors, {}))

    for name, tensor in tensors.items():
        assert torch.equal(decoded[name], tensor.detach())
        assert decoded[name].is_contiguous()
        assert not decoded[name].requires_grad


def test_record_starts_with_magic_and_a_canonical_header() -> None:
    record = small_record()
    assert record.startswith(MAGIC) and is_record(record)
    header_line = record[len(MAGIC) : record.index(b"\n", len(MAGIC))]
    header = json.loads(header_line)
    payload = record[len(MAGIC) + len(header_line) + 1 :]
    assert header["format"] == 1
    assert header["payload_bytes"] == len(payload)
    assert header["sha256"] == sha256_hex(payload)
    assert verify_record(record) == header


def test_every_single_byte_change_is_detected() -> None:
    record = small_record()
    for position in range(len(record)):
        for flip in (0x01, 0x80, 0xFF):
            corrupted = bytearray(record)
            corrupted[position] ^= flip
            with pytest.raises(IntegrityError):
                decode_record(bytes(corrupted))


def test_byte_changes_in_a_large_record_are_detected() -> None:
    record = encode_record({"w": torch.randn(256, 256)}, {"note": "x" * 1000})
    positions = range(0, len(record), max(1, len(record) // 500))
    for position in positions:
        corrupted = bytearray(record)
        corrupted[position] = (corrupted[position] + 1) % 256
        with pytest.raises(IntegrityError):
            decode_record(bytes(corrupted))


@pytest.mark.parametrize("keep", [0, 3, len(MAGIC), len(MAGIC) + 20, -1, -100])
def test_truncated_record_is_detected(keep: int) -> None:
    record = small_record()
    with pytest.raises(IntegrityError, match="truncated|magic|header"):
        decode_record(record[:keep])


def test_trailing_bytes_are_detected() -> None:
    with pytest.raises(IntegrityError, match="too long"):
        decode_record(small_record() + b"\x00")


def test_errors_name_what_failed() -> None:
    record = small_record()
    payload_start = record.index(b"\n", len(MAGIC)) + 1
    corrupted = bytearray(record)
    corrupted[payload_start + 10] ^= 0xFF
    with pytest.raises(IntegrityError, match="SHA-256 mismatch"):
        decode_record(bytes(corrupted))
    with pytest.raises(IntegrityError, match="magic"):
        decode_record(b"\x80\x04\x95pickle bytes")
    newer = record.replace(b'"format":1', b'"format":2', 1)
    with pytest.raises(IntegrityError, match="format 2 is not supported"):
        decode_record(newer)


def test_pickle_is_never_used() -> None:
    # Decoding must work with pickle unavailable (and never call it).
    code = (
        "import sys, torch\n"
        "from prefect_torch.engine.records import encode_record, decode_record\n"
        "data = encode_record({'w': torch.ones(2)}, {'a': 1})\n"
        "import pickle\n"
        "def refuse(*a, **k): raise AssertionError('pickle used')\n"
        "pickle.loads = pickle.load = pickle.Unpickler = refuse\n"
        "print(decode_record(data)[1])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "{'a': 1}" in result.stdout


def test_meta_must_be_json() -> None:
    with pytest.raises(TypeError, match="JSON"):
        encode_record({}, {"when": object()})
    with pytest.raises(TypeError, match="torch.Tensor"):
        encode_record({"x": [1, 2]}, {})  # type: ignore[dict-item]
