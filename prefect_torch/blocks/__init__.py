"""Prefect blocks of prefect-torch: where results, checkpoints, models and datasets
are stored, and the safe result serializer.

Prefect imports this package (the ``prefect.collections`` entry point) on every
block lookup, which also registers the ``"prefect-torch"`` serializer type. It
must stay free of torch at import time.
"""

from prefect_torch.blocks.registry import (
    ModelRegistry,
    RegistryConflictError,
    RegistryLookupError,
)
from prefect_torch.blocks.results import (
    TorchResultStorage,
    check_result_bytes,
    result_options,
    result_storage,
    result_store,
    save_result_storage,
)
from prefect_torch.blocks.serializer import (
    Recordable,
    TorchSerializer,
    decode_value,
    encode_value,
)
from prefect_torch.blocks.sweeps import SweepStorage
from prefect_torch.blocks.storage import (
    StorageNotFoundError,
    TorchStorage,
    default_storage,
)

__all__ = [
    "TorchStorage",
    "TorchResultStorage",
    "SweepStorage",
    "TorchSerializer",
    "ModelRegistry",
    "RegistryLookupError",
    "RegistryConflictError",
    "Recordable",
    "StorageNotFoundError",
    "default_storage",
    "result_storage",
    "result_store",
    "save_result_storage",
    "result_options",
    "check_result_bytes",
    "encode_value",
    "decode_value",
]
