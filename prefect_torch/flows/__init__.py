"""Flows: the fast-path ``train_flow``, the per-batch ``stepwise_train_flow``, GPU
routing (``pipeline_flow`` → ``pool_train_flow`` on a work pool), ``retrain_flow``
and ``sweep_flow`` (hyperparameter search).

Each flow is imported from its module on first use (``from prefect_torch.flows
import train_flow`` works as usual): defining a Prefect flow builds its parameter
schema, so importing all of them costs half a second a command needs only one of.
"""

from importlib import import_module
from typing import Any

from prefect_torch._prefect_defaults import apply_library_defaults

apply_library_defaults()  # before any flow starts Prefect's temporary server

_MODULE_OF = {
    "DatasetSpec": "params", "TrainFlowResult": "params",
    "NewestDataset": "retrain", "PromotionSpec": "retrain", "RetrainResult": "retrain", "retrain_flow": "retrain",
    "PipelineResult": "routing", "RoutingSpec": "routing", "StoredTrainResult": "routing",
    "pipeline_flow": "routing", "pool_train_flow": "routing",
    "stepwise_train_flow": "stepwise",
    "SweepResult": "sweep", "SweepSpec": "sweep", "sweep_flow": "sweep",
    "train_flow": "train",
}

__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
