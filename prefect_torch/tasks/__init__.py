"""Every training card as a Prefect task, named by its card type."""

from prefect_torch._prefect_defaults import apply_library_defaults

apply_library_defaults()  # before any flow starts Prefect's temporary server

from prefect_torch.tasks.data import data_load, data_split
from prefect_torch.tasks.evaluate import evaluate
from prefect_torch.tasks.model import model_define, training_init_optimizer
from prefect_torch.tasks.schedule import training_lr_schedule
from prefect_torch.tasks.steps import (
    training_backward,
    training_forward,
    training_loss,
    training_optimizer_step,
    training_prepare_batch,
    training_zero_grad,
)
from prefect_torch.tasks.train import train

__all__ = [
    "data_load",
    "data_split",
    "model_define",
    "training_init_optimizer",
    "training_prepare_batch",
    "training_zero_grad",
    "training_forward",
    "training_loss",
    "training_backward",
    "training_optimizer_step",
    "training_lr_schedule",
    "train",
    "evaluate",
]
