"""Flows: the fast-path ``train_flow``, the per-batch ``stepwise_train_flow``, GPU
routing (``pipeline_flow`` → ``pool_train_flow`` on a work pool), ``retrain_flow``
and ``sweep_flow`` (hyperparameter search)."""

from prefect_torch._prefect_defaults import apply_library_defaults

apply_library_defaults()  # before any flow starts Prefect's temporary server

from prefect_torch.flows.params import DatasetSpec, TrainFlowResult
from prefect_torch.flows.retrain import NewestDataset, PromotionSpec, RetrainResult, retrain_flow
from prefect_torch.flows.routing import PipelineResult, RoutingSpec, StoredTrainResult, pipeline_flow, pool_train_flow
from prefect_torch.flows.stepwise import stepwise_train_flow
from prefect_torch.flows.sweep import SweepResult, SweepSpec, sweep_flow
from prefect_torch.flows.train import train_flow

__all__ = [
    "train_flow", "stepwise_train_flow", "DatasetSpec", "TrainFlowResult",
    "pool_train_flow", "pipeline_flow", "retrain_flow", "RoutingSpec", "StoredTrainResult",
    "PipelineResult", "NewestDataset", "PromotionSpec", "RetrainResult",
    "sweep_flow", "SweepSpec", "SweepResult",
]
