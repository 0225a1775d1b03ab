"""A Prefect result serializer that never runs pickle: ``TorchSerializer``.

Values become one ``prefect_torch.engine.records`` record: tensors as safetensors,
everything else as JSON. Supported values, nested freely:

- ``None``, ``bool``, ``int``, ``float``, ``str``, lists, tuples, dicts (any keys
  that are themselves supported);
- ``torch.Tensor`` (and ``nn.Parameter``), stored on the CPU, ``requires_grad``
  kept;
- ``bytes``, NumPy arrays (not ``object`` dtype), pandas DataFrames (as Parquet);
  NumPy number scalars come back as Python numbers;
- objects of ``Recordable`` subclasses, which say how to take themselves apart
  (``__record__``) and put themselves back together (``__from_record__``);
- exceptions (Prefect persists a failed run's exception): type and message only;
  builtin and prefect-torch exceptions come back as themselves, others as a
  ``RuntimeError`` naming the original type.

Reading only ever re-creates those: a record names the class of a Recordable as
``"module:QualName"``, and it is re-created only if it really inherits from
``Recordable`` (checked on the class's MRO, so ``register``-style tricks do not
count). Importing the named module is the one side effect a record can cause.

Prefect knows the serializer by its type string ``"prefect-torch"`` once this
module is imported (``prefect_torch.blocks`` imports it, and Prefect imports that
package through the ``prefect.collections`` entry point). How stored results of
other serializers are refused is in ``prefect_torch.blocks.results``.

torch, numpy and pandas are imported only when a value needs them.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import importlib
import io
import re
import sys
from typing import TYPE_CHECKING, Any, Literal

from prefect.serializers import Serializer
from pydantic import BaseModel
from typing_extensions import Self

from prefect_torch.engine.records import Recordable
from prefect_torch.errors import IntegrityError

if TYPE_CHECKING:
    import torch

SERIALIZER_TYPE = "prefect-torch"
_VALUE_KIND = "prefect-torch.value"
# Tag key marking a JSON object that stands for something JSON cannot hold.
_TAG = "__ptorch__"
_DOTTED_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_B64_ALPHABET = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")


class TorchSerializer(Serializer):
    """Serializes results as verified prefect-torch records (no pickle).

    Use it as ``result_serializer=TorchSerializer()`` or
    ``result_serializer="prefect-torch"``.
    """

    type: Literal["prefect-torch"] = SERIALIZER_TYPE

    def dumps(self, obj: Any) -> bytes:
        # Base64, because Prefect embeds the bytes in a JSON envelope as UTF-8 text.
        return base64.b64encode(encode_value(obj))

    def loads(self, blob: bytes) -> Any:
        try:
            return decode_value(unwrap_record_bytes(blob))
        except IntegrityError as exc:
            # Prefect's cache check turns any error into a miss, silently: say why.
            from prefect_torch.blocks.results import _warn

            _warn(f"Ignoring a stored result: {exc} prefect-torch treats it as a cache miss and recomputes.")
            raise


def encode_value(value: Any) -> bytes:
    """Encode a supported value (see the module docstring) as one record."""
    from prefect_torch.engine.records import encode_record

    encoder = _Encoder()
    tree = encoder.encode(value, "value")
    return encode_record(encoder.tensors, {"kind": _VALUE_KIND, "value": tree})


def decode_value(data: bytes) -> Any:
    """Verify a record made by ``encode_value`` and re-create its value."""
    from prefect_torch.engine.records import decode_record

    tensors, meta = decode_record(data)
    if meta.get("kind") != _VALUE_KIND or "value" not in meta:
        raise IntegrityError(
            f"Record holds {meta.get('kind')!r}, not a prefect-torch value."
        )
    try:
        return _Decoder(tensors).decode(meta["value"])
    except (KeyError, TypeError, ValueError, IndexError, RecursionError) as exc:
        # (pydantic's ValidationError is a ValueError)
        # A record with a valid digest can still be hand-made: its structure is
        # input like any other, and a bad one is an integrity failure.
        raise IntegrityError(f"Record value is malformed: {exc!r}") from exc


def unwrap_record_bytes(blob: bytes | str) -> bytes:
    """The raw record inside ``blob``, which may be base64 text (as Prefect stores
    it) or already raw. Raises ``IntegrityError`` if it is neither."""
    from prefect_torch.engine.records import is_record

    if isinstance(blob, str):
        blob = blob.encode("ascii", errors="replace")
    blob = bytes(blob)
    if is_record(blob):
        return blob
    compact = blob.strip()
    if not _B64_ALPHABET.match(compact):
        raise IntegrityError("Not a prefect-torch record (neither raw nor base64).")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise IntegrityError(f"Record base64 text is corrupt: {exc}") from exc


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, Any] = {}
        self._records = 0

    def add_tensor(self, tensor: Any, name: str | None = None) -> str:
        key = name or f"t{len(self.tensors)}"
        self.tensors[key] = tensor
        return key

    def encode(self, value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            # Exact builtin types only: subclasses (enums, numpy scalars) would
            # come back as their base type.
            if type(value) in (bool, int, float, str) or value is None:
                return value
        if type(value) is list:
            return [self.encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
        if type(value) is tuple:
            items = [self.encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
            return {_TAG: "tuple", "items": items}
        if type(value) is dict:
            return self._encode_dict(value, where)
        if type(value) is bytes:
            return {_TAG: "bytes", "key": self.add_tensor(_bytes_tensor(value))}
        if isinstance(value, Recordable):
            return self._encode_recordable(value, where)
        if isinstance(value, Exception):
            # Prefect persists the exception of a failed run as its result.
            cls = type(value)
            return {
                _TAG: "exception",
                "type": f"{cls.__module__}:{cls.__qualname__}",
                "message": str(value),
            }
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(value, torch.Tensor):
            return {
                _TAG: "tensor",
                "key": self.add_tensor(value),
                "parameter": isinstance(value, torch.nn.Parameter),
                "requires_grad": bool(value.requires_grad),
            }
        numpy = sys.modules.get("numpy")
        if numpy is not None and type(value) is numpy.ndarray:
            return self._encode_ndarray(value, where)
        if numpy is not None and isinstance(value, numpy.generic) and value.dtype.kind in "biuf":
            # Metrics are often NumPy scalars; they come back as Python numbers.
            return self.encode(value.item(), where)
        pandas = sys.modules.get("pandas")
        if pandas is not None and type(value) is pandas.DataFrame:
            return {_TAG: "dataframe", "key": self.add_tensor(_dataframe_tensor(value))}
        raise TypeError(
            f"prefect-torch cannot persist {where} of type {type(value).__qualname__}. "
            "Return tensors, JSON values (dict, list, str, int, float, bool, None), "
            "tuples, bytes, NumPy arrays or DataFrames, or make the class a "
            "prefect_torch.engine.records.Recordable."
        )

    def _encode_dict(self, value: dict[Any, Any], where: str) -> Any:
        if all(type(key) is str for key in value) and _TAG not in value:
            return {key: self.encode(item, f"{where}[{key!r}]") for key, item in value.items()}
        # Non-str keys (or our tag as a key) do not survive JSON objects: pairs do.
        pairs = [
            [self.encode(key, f"{where} key"), self.encode(item, f"{where}[{key!r}]")]
            for key, item in value.items()
        ]
        return {_TAG: "dict", "items": pairs}

    def _encode_recordable(self, value: Recordable, where: str) -> Any:
        cls = type(value)
        type_name = f"{cls.__module__}:{cls.__qualname__}"
        if "<locals>" in cls.__qualname__ or cls.__module__ == "__main__":
            raise TypeError(
                f"{where} is a {cls.__qualname__} defined in {cls.__module__}; "
                "Recordable classes must be importable. Move it into a module."
            )
        recorded = value.__record__()
        if not (isinstance(recorded, tuple) and len(recorded) == 2):
            raise TypeError(f"{type_name}.__record__ must return (tensors, meta).")
        tensors, meta = recorded
        if not isinstance(tensors, dict) or not isinstance(meta, dict):
            raise TypeError(f"{type_name}.__record__ must return (dict, dict).")
        self._records += 1
        keys = {
            name: self.add_tensor(tensor, f"r{self._records}.{name}")
            for name, tensor in tensors.items()
        }
        return {_TAG: "record", "type": type_name, "tensors": keys, "meta": meta}

    def _encode_ndarray(self, value: Any, where: str) -> Any:
        import numpy
        import torch

        if value.dtype.hasobject or value.dtype.kind in "USV":
            raise TypeError(
                f"prefect-torch cannot persist {where}: NumPy dtype {value.dtype} "
                "holds Python objects or strings. Use a DataFrame or a list."
            )
        tensor = torch.from_numpy(numpy.ascontiguousarray(value))
        return {_TAG: "ndarray", "key": self.add_tensor(tensor)}


class _Decoder:
    def __init__(self, tensors: dict[str, Any]) -> None:
        self.tensors = tensors

    def tensor(self, node: dict[str, Any]) -> Any:
        key = node.get("key")
        if key not in self.tensors:
            raise IntegrityError(f"Record refers to a missing tensor {key!r}.")
        return self.tensors[key]

    def decode(self, node: Any) -> Any:
        if isinstance(node, list):
            return [self.decode(item) for item in node]
        if not isinstance(node, dict):
            return node
        tag = node.get(_TAG)
        if tag is None:
            return {key: self.decode(item) for key, item in node.items()}
        if tag == "tuple":
            return tuple(self.decode(item) for item in node["items"])
        if tag == "dict":
            return {self.decode(key): self.decode(item) for key, item in node["items"]}
        if tag == "tensor":
            return self._tensor_value(node)
        if tag == "bytes":
            return self.tensor(node).numpy().tobytes()
        if tag == "ndarray":
            return self.tensor(node).numpy()
        if tag == "dataframe":
            import pandas

            return pandas.read_parquet(io.BytesIO(self.tensor(node).numpy().tobytes()))
        if tag == "record":
            return self._recordable(node)
        if tag == "exception":
            return _exception(str(node["type"]), str(node["message"]))
        raise IntegrityError(f"Record holds an unknown kind of value {tag!r}.")

    def _tensor_value(self, node: dict[str, Any]) -> Any:
        import torch

        tensor = self.tensor(node)
        if node.get("parameter"):
            return torch.nn.Parameter(tensor, requires_grad=bool(node.get("requires_grad")))
        if node.get("requires_grad") and tensor.is_floating_point():
            tensor.requires_grad_(True)
        return tensor

    def _recordable(self, node: dict[str, Any]) -> Any:
        cls = recordable_class(node.get("type"))
        keys = node.get("tensors") or {}
        meta = node.get("meta")
        if not isinstance(keys, dict) or not isinstance(meta, dict):
            raise IntegrityError(f"Record of {node.get('type')!r} is malformed.")
        tensors = {name: self.tensor({"key": key}) for name, key in keys.items()}
        return cls.__from_record__(tensors, meta)


def recordable_class(type_name: Any) -> type[Recordable]:
    """Resolve ``"module:QualName"`` to a Recordable subclass, or refuse.

    Raises ``IntegrityError`` ("untrusted record") for anything that is not a
    class inheriting from ``Recordable``: a record cannot make us call arbitrary
    callables.
    """
    if not isinstance(type_name, str) or type_name.count(":") != 1:
        raise IntegrityError(f"Untrusted record: malformed type name {type_name!r}.")
    module_name, qualname = type_name.split(":")
    if not (_DOTTED_NAME.match(module_name) and _DOTTED_NAME.match(qualname)):
        raise IntegrityError(f"Untrusted record: malformed type name {type_name!r}.")
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise IntegrityError(
            f"Record names {type_name!r}, which cannot be imported here ({exc}). "
            "Install the package that defines it."
        ) from exc
    if not (isinstance(target, type) and Recordable in target.__mro__[1:]):
        raise IntegrityError(
            f"Untrusted record: {type_name!r} is not a subclass of "
            "prefect_torch.blocks.serializer.Recordable, so it will not be loaded."
        )
    return target


def _exception(type_name: str, message: str) -> Exception:
    """Re-create a stored exception: builtin and prefect-torch exception classes
    come back as themselves, anything else as a RuntimeError naming the type."""
    module_name, _, qualname = type_name.partition(":")
    trusted = {"builtins": builtins, "prefect_torch.errors": None}
    if module_name in trusted and _DOTTED_NAME.match(qualname or "-"):
        module = trusted[module_name] or importlib.import_module(module_name)
        cls = getattr(module, qualname, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls(message)
    return RuntimeError(f"{type_name}: {message}")


def _bytes_tensor(data: bytes) -> Any:
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(
        0, dtype=torch.uint8
    )


def _dataframe_tensor(frame: Any) -> Any:
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    return _bytes_tensor(buffer.getvalue())


__all__ = [
    "SERIALIZER_TYPE",
    "Recordable",
    "TorchSerializer",
    "encode_value",
    "decode_value",
    "unwrap_record_bytes",
    "recordable_class",
]
