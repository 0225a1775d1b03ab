"""Tensor files: written once by streaming, mapped back, and verified."""

import pytest
import safetensors.torch
import torch

from prefect_torch.engine.tensorfile import forget_verified, map_tensor_file, write_tensor_file
from prefect_torch.errors import IntegrityError


def tensors():
    return {
        "X": torch.arange(12, dtype=torch.float32).reshape(4, 3),
        "codes": torch.tensor([3, 1, 2], dtype=torch.int64),
        "flags": torch.tensor([True, False]),
        "half": torch.ones(3, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3),
    }


def test_a_tensor_file_is_plain_safetensors_and_maps_back_equal(tmp_path):
    ref = write_tensor_file(str(tmp_path), "split-abc", tensors())
    assert ref["uri"].startswith(str(tmp_path / "split-abc.")) and ref["algorithm"] == "xxh3_128"
    by_library = safetensors.torch.load_file(ref["uri"])
    mapped = map_tensor_file(ref)
    for name, tensor in tensors().items():
        assert by_library[name].equal(tensor) and mapped[name].equal(tensor), name
        assert mapped[name].dtype == tensor.dtype and mapped[name].shape == tensor.shape


def test_a_changed_byte_or_a_truncation_is_refused(tmp_path):
    ref = write_tensor_file(str(tmp_path), "split-abc", tensors())
    path = tmp_path / ref["uri"].rsplit("/", 1)[-1]
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x10
    path.write_bytes(raw)
    forget_verified()
    with pytest.raises(IntegrityError, match="is damaged"):
        map_tensor_file(ref)
    path.write_bytes(raw[:-1])
    with pytest.raises(IntegrityError, match="bytes; its record says"):
        map_tensor_file(ref)
    path.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        map_tensor_file(ref)


def test_a_write_to_a_mapped_tensor_never_reaches_the_file(tmp_path):
    ref = write_tensor_file(str(tmp_path), "split-abc", tensors())
    mapped = map_tensor_file(ref)
    mapped["X"].add_(1)
    forget_verified()
    assert map_tensor_file(ref)["X"].equal(tensors()["X"])
