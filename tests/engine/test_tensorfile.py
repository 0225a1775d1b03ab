"""Tensor files: written once by streaming, mapped back, and verified."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from prefect_torch.engine.tensorfile import forget_verified, map_tensor_file, stage_tensor_file, write_tensor_file
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


# Staged files: written ahead (the CLI's early split, while Prefect starts), renamed into place.

def test_a_staged_file_is_renamed_into_place_not_written_again(tmp_path):
    staged = stage_tensor_file(tmp_path / "cache", tensors())
    inode = staged.path.stat().st_ino
    ref = write_tensor_file(str(tmp_path / "store"), "split-abc", tensors(), staged=staged)
    assert os.stat(ref["uri"]).st_ino == inode and not staged.path.exists()
    assert ref == write_tensor_file(str(tmp_path / "unstaged"), "split-abc", tensors()) | {"uri": ref["uri"]}
    forget_verified()
    mapped = map_tensor_file(ref)  # the checksum the staging computed is the file's
    assert all(mapped[name].equal(tensor) for name, tensor in tensors().items())


def test_a_staged_file_cut_short_or_gone_is_written_afresh(tmp_path):
    cut = stage_tensor_file(tmp_path / "cache", tensors())
    with open(cut.path, "r+b") as handle:
        handle.truncate(cut.bytes - 1)
    ref = write_tensor_file(str(tmp_path / "store"), "split-abc", tensors(), staged=cut)
    assert not cut.path.exists()
    forget_verified()
    assert map_tensor_file(ref)["X"].equal(tensors()["X"])

    gone = stage_tensor_file(tmp_path / "cache", tensors())
    gone.discard()
    assert write_tensor_file(str(tmp_path / "store2"), "split-abc", tensors(), staged=gone)["checksum"] == ref["checksum"]


def test_a_staged_file_on_another_file_system_is_written_afresh_and_removed(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a file system other than the test's folder")
    staging = shm / f"prefect-torch-test-{os.getpid()}"
    try:
        staged = stage_tensor_file(staging, tensors())
        ref = write_tensor_file(str(tmp_path / "store"), "split-abc", tensors(), staged=staged)
        assert not staged.path.exists() and Path(ref["uri"]).parent == tmp_path / "store"
        forget_verified()
        assert map_tensor_file(ref)["codes"].equal(tensors()["codes"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def test_staging_removes_the_staged_files_of_processes_that_are_gone(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    orphan = folder / f".staged.{ended.pid}.0123456789ab.ptw-tmp"
    alive = folder / f".staged.{os.getpid()}.ba9876543210.ptw-tmp"
    other = folder / "0123.safetensors"
    for path in (orphan, alive, other):
        path.write_bytes(b"x")
    staged = stage_tensor_file(folder, tensors())
    assert not orphan.exists() and alive.exists() and other.exists() and staged.path.exists()
