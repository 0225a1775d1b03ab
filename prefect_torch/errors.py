"""Exceptions raised by prefect-torch.

Every error a user can cause is a ``PrefectTorchError`` whose message names the
problem and the fix::

    PrefectTorchError
    ├── DataError            the dataset: missing file, bad format, bad columns, NaNs
    ├── ConfigError          a spec or argument: unknown optimizer, loss, shape rules
    ├── DeviceError          the device asked for is not available
    ├── TrainingError        training diverged (NaN/inf loss) or cannot proceed
    ├── StaleHandleError     a model/optimizer handle whose live object moved on
    ├── IntegrityError       a stored record failed its checksum or is untrusted
    ├── StorageError         a result or checkpoint could not be read or written
    └── PrefectHomeError     the Prefect home's database cannot be used by this Prefect

This module imports nothing from torch or Prefect.
"""

from __future__ import annotations


class PrefectTorchError(Exception):
    """Base class of every error prefect-torch raises on purpose."""


class DataError(PrefectTorchError, ValueError):
    """The dataset cannot be used as given."""


class ConfigError(PrefectTorchError, ValueError):
    """A spec or argument is invalid or inconsistent."""


class DeviceError(PrefectTorchError, RuntimeError):
    """The requested device is not available here."""


class TrainingError(PrefectTorchError, RuntimeError):
    """Training cannot continue (for example the loss became NaN)."""


class TrainingStopped(PrefectTorchError):
    """A callback stopped training on purpose (a sweep's pruner, for example). Not a
    failure: the Train card ends ``Cancelled`` with this message, without a traceback,
    and nothing is cached, so a stopped run is never taken for a finished one."""


class StaleHandleError(PrefectTorchError, RuntimeError):
    """A handle refers to a model or optimizer state that has since changed."""


class IntegrityError(PrefectTorchError):
    """A stored record is corrupt, truncated or of an untrusted kind."""


class StorageError(PrefectTorchError, OSError):
    """A result, checkpoint or model could not be persisted or read."""


class PrefectHomeError(PrefectTorchError, RuntimeError):
    """The Prefect home's database cannot be used by the installed Prefect."""


__all__ = [
    "PrefectTorchError",
    "DataError",
    "ConfigError",
    "DeviceError",
    "TrainingError",
    "StaleHandleError",
    "IntegrityError",
    "StorageError",
    "PrefectHomeError",
]
