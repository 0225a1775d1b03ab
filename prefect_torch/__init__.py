"""prefect-torch: PyTorch training cards as Prefect 3 tasks and flows.

Import flows from ``prefect_torch.flows`` and cards from ``prefect_torch.tasks``;
``load_model`` loads what a flow saved.
"""

from prefect_torch.errors import (
    ConfigError,
    DataError,
    DeviceError,
    IntegrityError,
    PrefectTorchError,
    StaleHandleError,
    StorageError,
    TrainingError,
)

__version__ = "0.1.0"


def load_model(uri: str, storage_options: dict | None = None):
    """Load a model saved by a prefect-torch flow (its ``model_uri``) for prediction."""
    from prefect_torch.engine.persist import load_model as _load

    return _load(uri, storage_options)


__all__ = [
    "__version__",
    "load_model",
    "PrefectTorchError",
    "DataError",
    "ConfigError",
    "DeviceError",
    "TrainingError",
    "StaleHandleError",
    "IntegrityError",
    "StorageError",
]
