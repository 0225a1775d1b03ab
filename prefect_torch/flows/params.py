"""Typed flow parameters: the Prefect UI renders these as forms."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from prefect_torch.engine.dataset import DatasetSpec
from prefect_torch.engine.records import Recordable
from prefect_torch.engine.spec import Spec


class TrainFlowResult(BaseModel, Recordable):
    """What a training flow returns."""

    metrics: dict[str, float] = Field(description="Metrics on the test split.")
    history: list[dict[str, Any]] = Field(description="One record per epoch: losses, validation metric, LR, speed.")
    model_uri: str = Field(description="Folder the model was saved to; load it with prefect_torch.load_model.")
    problem: str = Field(description="regression, binary or multiclass.")
    loss: str = Field(description="The loss that was minimised.")
    stop_reason: str | None = Field(default=None, description="Why training stopped.")
    data_key: str = Field(description="Content key of the dataset trained on.")
    device: str = Field(description="Device the model trained on.")
    steps: int = Field(description="Optimizer steps taken.")
    train_seconds: float = Field(description="Wall time of the training loop.")


class PrunerSpec(Spec):
    """How poor trials are stopped early: Optuna's median pruner, or none."""

    name: Literal["median", "none"] = Field(
        default="median", description="median: stop a trial whose epoch is worse than the median of earlier trials."
    )
    startup_trials: int = Field(default=5, ge=0, description="Trials that finish before any is pruned.")
    warmup_epochs: int = Field(default=0, ge=0, description="Epochs of each trial before it may be pruned.")

    def build(self):
        """The Optuna pruner."""
        import optuna

        if self.name == "none":
            return optuna.pruners.NopPruner()
        return optuna.pruners.MedianPruner(n_startup_trials=self.startup_trials, n_warmup_steps=self.warmup_epochs)


class TrialLink(Spec):
    """The Optuna trial a training run reports its epochs to, so the sweep's pruner can
    stop it; set by ``sweep_flow`` when it sends a trial to a work pool."""

    study_name: str = Field(description="Name of the Optuna study the trial belongs to.")
    trial_number: int = Field(ge=0, description="Number of the trial within its study.")
    storage_block: str | None = Field(
        default=None,
        description="Saved Torch Sweep Storage block holding the study; the SQLite file under the "
        "worker's Prefect home when empty (only when the worker shares this machine's Prefect home).",
    )
    metric: str = Field(default="val_loss", description="Validation metric reported each epoch: val_loss, r2 or accuracy.")
    pruner: PrunerSpec = Field(default=PrunerSpec(), title="Pruner", description="The sweep's pruner, which decides whether to stop the run.")
