"""Model Define and Initialize Optimizer cards."""

from __future__ import annotations

from prefect import task

from prefect_torch.engine.handles import ModelHandle, OptimizerHandle, lineage_key
from prefect_torch.engine.models import ModelSpec, build_model
from prefect_torch.engine.optim import OptimizerSpec, build_optimizer
from prefect_torch.engine.split import Splits
from prefect_torch.reporting.names import init_optimizer_run_name, model_define_run_name
from prefect_torch.tasks._common import STEP_CARD, coarse_card


@task(name="model_define", task_run_name=model_define_run_name, **coarse_card("1"))
def model_define(spec: ModelSpec, splits: Splits) -> ModelHandle:
    """Model Define: build the network, sized for the split's features and outputs."""
    info = splits.info
    module = build_model(spec, info.n_features, info.n_outputs)
    key = lineage_key("model_define", spec.model_dump(mode="json"), splits.key)
    return ModelHandle(module, spec, key, 0, info.n_features, info.n_outputs)


@task(name="training_init_optimizer", task_run_name=init_optimizer_run_name, **STEP_CARD)
def training_init_optimizer(model: ModelHandle, spec: OptimizerSpec = OptimizerSpec()) -> OptimizerHandle:
    """Initialize Optimizer: adam, adamw, sgd or rmsprop over the model's parameters."""
    optimizer = build_optimizer(spec, model.model)
    key = lineage_key("training_init_optimizer", spec.model_dump(mode="json"), model.key)
    return OptimizerHandle(optimizer, spec, key, model.module)
