"""Optimizers and learning-rate schedulers from typed specs."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from prefect_torch.engine.spec import Spec
from prefect_torch.errors import ConfigError

OptimizerName = Literal["adam", "adamw", "sgd", "rmsprop"]
# Optimizers PyTorch offers a fused CUDA kernel for.
_FUSED = ("adam", "adamw", "sgd")
SchedulerName = Literal["none", "step", "cosine", "plateau"]


class OptimizerSpec(Spec):
    """Which optimizer updates the weights, and how fast."""

    name: OptimizerName = Field(default="adam", description="Optimizer: adam, adamw, sgd or rmsprop.")
    lr: float = Field(default=1e-3, title="Learning rate", gt=0.0, le=10.0, description="Learning rate.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="L2 penalty (decoupled for adamw).")
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0, description="Momentum (sgd, rmsprop).")

    def short_name(self) -> str:
        return f"{self.name} lr={self.lr:g}"


class SchedulerSpec(Spec):
    """How the learning rate changes during training."""

    name: SchedulerName = Field(default="none", description="none, step, cosine or plateau (reduce on plateau).")
    interval: Literal["epoch", "step"] = Field(
        default="epoch", description="Step the schedule after every epoch or every optimizer step (not plateau)."
    )
    step_size: int = Field(default=10, ge=1, description="step: epochs (or steps) between decays.")
    gamma: float = Field(default=0.1, gt=0.0, le=1.0, description="step: factor applied at each decay.")
    min_lr: float = Field(default=0.0, title="Min learning rate", ge=0.0, description="cosine / plateau: the lowest learning rate.")
    factor: float = Field(default=0.1, gt=0.0, lt=1.0, description="plateau: factor applied when progress stalls.")
    patience: int = Field(default=5, ge=0, description="plateau: epochs without improvement before a decay.")


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
               "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}
    if name not in classes:
        raise ConfigError(f"Unknown optimizer {name!r}. Use one of: {', '.join(classes)}.")
    return classes[name]


def build_optimizer(spec: OptimizerSpec, model: nn.Module) -> torch.optim.Optimizer:
    cls = _optimizer_class(spec.name)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("The model has no trainable parameters; there is nothing to optimise.")
    return cls(params, **optimizer_options(spec, params[0].device.type))


def optimizer_options(spec: OptimizerSpec, device_type: str) -> dict:
    """Keyword arguments of the torch optimizer for parameters on ``device_type``.

    On CUDA the update runs as one fused kernel (adam, adamw, sgd) or as a few
    multi-tensor launches (rmsprop: foreach), instead of a launch per parameter.
    Fused Adam also keeps its step counter on the GPU, so a step never reads
    anything back to the host. On CPU the defaults stay, so CPU results do not
    depend on this choice.
    """
    kwargs: dict = {"lr": spec.lr, "weight_decay": spec.weight_decay}
    if spec.name in ("sgd", "rmsprop"):
        kwargs["momentum"] = spec.momentum
    if device_type == "cuda":
        if spec.name in _FUSED:
            kwargs["fused"] = True
        else:
            kwargs["foreach"] = True
    return kwargs


def build_scheduler(
    spec: SchedulerSpec, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int
):
    """A torch LR scheduler, or None for ``name='none'``."""
    if spec.name == "none":
        return None
    if spec.name == "plateau":
        if spec.interval != "epoch":
            raise ConfigError("The plateau scheduler follows the validation loss, so interval must be 'epoch'.")
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=spec.factor, patience=spec.patience, min_lr=spec.min_lr
        )
    if spec.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=spec.step_size, gamma=spec.gamma)
    if spec.name == "cosine":
        horizon = epochs if spec.interval == "epoch" else max(1, epochs * steps_per_epoch)
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=horizon, eta_min=spec.min_lr)
    raise ConfigError(f"Unknown scheduler {spec.name!r}. Use one of: none, step, cosine, plateau.")


def step_scheduler(scheduler, val_loss: float | None) -> None:
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if val_loss is None:
            raise ConfigError("The plateau scheduler needs a validation split; set val_fraction > 0.")
        scheduler.step(val_loss)
    else:
        scheduler.step()


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
