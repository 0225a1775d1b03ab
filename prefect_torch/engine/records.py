"""A self-verifying record: the one byte format prefect-torch persists.

A record holds named tensors and a JSON-able ``meta`` dict. It never uses pickle,
so reading one cannot run code, and it verifies itself on every read::

    b"PTREC1\\n"                      magic: what this is, and the format generation
    {"format":1,...}\\n                header: canonical JSON, one line
    <safetensors bytes><meta JSON>    payload

The header names the payload's length, the split between tensors and meta, and
the payload's SHA-256. ``decode_record`` checks the magic, that the header is the
canonical encoding of its own fields (so no byte of it can change unnoticed), the
length and the digest before parsing anything; any mismatch, truncation or extra
byte raises ``IntegrityError`` naming what failed.

This module imports nothing from Prefect.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any


from pydantic import BaseModel
from typing_extensions import Self

from prefect_torch.errors import IntegrityError

if TYPE_CHECKING:  # torch is imported where records are made, so blocks stay torch-free
    import torch

MAGIC = b"PTREC1\n"
FORMAT_VERSION = 1
# A header is ~150 bytes; a bound keeps a corrupt record from making us scan it all.
_MAX_HEADER_BYTES = 4096
_HEADER_KEYS = ("format", "payload_bytes", "sha256", "tensor_bytes")


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """The lowercase hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def encode_record(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """Encode tensors and JSON-able metadata into one self-verifying record.

    Tensors are stored detached, contiguous and on the CPU. ``meta`` must be
    JSON-serialisable (str keys; lists, numbers, strings, bools, None).
    """
    if not isinstance(meta, dict):
        raise TypeError(f"`meta` must be a dict, got {type(meta).__name__}.")
    from safetensors.torch import save as _save_safetensors

    tensor_bytes = _save_safetensors(_prepare_tensors(tensors)) if tensors else b""
    try:
        # Key order is kept: it is part of the value (dicts are ordered).
        meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"Record metadata must be JSON-serialisable: {exc}") from exc
    payload = tensor_bytes + meta_bytes
    header = _header_bytes(
        {
            "format": FORMAT_VERSION,
            "payload_bytes": len(payload),
            "sha256": sha256_hex(payload),
            "tensor_bytes": len(tensor_bytes),
        }
    )
    return MAGIC + header + b"\n" + payload


def decode_record(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verify and decode a record made by ``encode_record``.

    Returns ``(tensors, meta)`` with every tensor on the CPU. Raises
    ``IntegrityError`` if the record is corrupt, truncated or not a record at all.
    """
    header, payload = _split_verified(data)
    tensor_part = payload[: header["tensor_bytes"]]
    meta_part = payload[header["tensor_bytes"] :]
    try:
        from safetensors.torch import load as _load_safetensors

        tensors = _load_safetensors(bytes(tensor_part)) if tensor_part else {}
        meta = json.loads(bytes(meta_part))
    except Exception as exc:  # digest matched, so the writer produced bad bytes
        raise IntegrityError(f"Record payload could not be parsed: {exc}") from exc
    if not isinstance(meta, dict):
        raise IntegrityError("Record metadata is not a JSON object.")
    return tensors, meta


def verify_record(data: bytes) -> dict[str, Any]:
    """Check a record's magic, header, length and SHA-256 without decoding it.

    Returns the header. Raises ``IntegrityError`` naming what failed.
    """
    header, _ = _split_verified(data)
    return header


def is_record(data: bytes) -> bool:
    """Whether ``data`` starts like a record (says nothing about its integrity)."""
    return bytes(data[: len(MAGIC)]) == MAGIC


def _prepare_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch

    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"Tensor names must be str, got {name!r}.")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"Record entry {name!r} must be a torch.Tensor, got "
                f"{type(tensor).__name__}."
            )
        if tensor.layout != torch.strided:
            raise TypeError(
                f"Tensor {name!r} has layout {tensor.layout}; records store dense "
                "tensors only. Convert it with `.to_dense()` first."
            )
        cpu = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (tied weights, views of
        # one buffer); each gets its own copy so the record stays self-contained.
        storage = cpu.untyped_storage().data_ptr()
        if storage in seen_storages:
            cpu = cpu.clone()
            storage = cpu.untyped_storage().data_ptr()
        seen_storages.add(storage)
        prepared[name] = cpu
    return prepared


def _header_bytes(header: dict[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":"), sort_keys=True).encode()


def _split_verified(data: bytes) -> tuple[dict[str, Any], memoryview]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise IntegrityError(f"A record must be bytes, got {type(data).__name__}.")
    view = memoryview(data)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise IntegrityError(
            "Not a prefect-torch record: bad magic bytes "
            f"(expected {MAGIC!r}, found {bytes(view[: len(MAGIC)])!r})."
        )
    end = bytes(view[: len(MAGIC) + _MAX_HEADER_BYTES]).find(b"\n", len(MAGIC))
    if end < 0:
        raise IntegrityError("Record header is truncated or missing its end of line.")
    raw_header = bytes(view[len(MAGIC) : end])
    header = _parse_header(raw_header)
    payload = view[end + 1 :]
    if len(payload) != header["payload_bytes"]:
        problem = "truncated" if len(payload) < header["payload_bytes"] else "too long"
        raise IntegrityError(
            f"Record payload is {problem}: header says {header['payload_bytes']} "
            f"bytes, found {len(payload)}."
        )
    digest = sha256_hex(payload)
    if digest != header["sha256"]:
        raise IntegrityError(
            f"Record payload SHA-256 mismatch: header says {header['sha256']}, "
            f"payload hashes to {digest}."
        )
    return header, payload


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"Record header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or tuple(sorted(header)) != _HEADER_KEYS:
        raise IntegrityError(f"Record header has unexpected fields: {raw[:200]!r}.")
    if type(header["format"]) is not int or header["format"] != FORMAT_VERSION:
        raise IntegrityError(
            f"Record format {header['format']!r} is not supported (this version of "
            f"prefect-torch reads format {FORMAT_VERSION})."
        )
    sizes_ok = all(
        type(header[key]) is int and header[key] >= 0
        for key in ("payload_bytes", "tensor_bytes")
    )
    if not sizes_ok or header["tensor_bytes"] > header["payload_bytes"]:
        raise IntegrityError(f"Record header has invalid sizes: {raw[:200]!r}.")
    # Only the canonical encoding is accepted, so a changed byte in the header can
    # never yield an equivalent header (spacing, escapes, digit case, key order).
    if _header_bytes(header) != raw:
        raise IntegrityError("Record header is not in canonical form (corrupted).")
    return header


__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "encode_record",
    "decode_record",
    "verify_record",
    "is_record",
    "sha256_hex",
]


class Recordable:
    """Base class of objects the prefect-torch serializer may store and re-create.

    Subclass it and implement both methods; ``meta`` must be JSON-serialisable.
    The class must be importable as ``module:QualName`` where it is read back::

        class Scaler(Recordable):
            def __record__(self):
                return {"mean": self.mean, "std": self.std}, {"eps": self.eps}

            @classmethod
            def __from_record__(cls, tensors, meta):
                return cls(tensors["mean"], tensors["std"], eps=meta["eps"])

    A pydantic model needs neither method: ``class Spec(BaseModel, Recordable)`` is
    stored as its JSON dump and re-created with ``model_validate``.
    """

    def __record__(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Return ``(tensors, meta)``: named tensors and JSON-able metadata."""
        if isinstance(self, BaseModel):
            return {}, self.model_dump(mode="json")
        raise NotImplementedError(
            f"{type(self).__name__} must implement __record__ to be persisted."
        )

    @classmethod
    def __from_record__(
        cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> Self:
        """Re-create an object from what ``__record__`` returned."""
        if issubclass(cls, BaseModel):
            return cls.model_validate(meta)
        raise NotImplementedError(
            f"{cls.__name__} must implement __from_record__ to be loaded."
        )
