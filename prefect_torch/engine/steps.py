"""The five steps of a training iteration, each one plain function.

The fast loop and the step-wise cards call exactly these, in the same order, so
both drivers produce bitwise-identical weights.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import nn

from prefect_torch.errors import ConfigError

_LOSSES = {
    "mse": nn.MSELoss,
    "mae": nn.L1Loss,
    "huber": nn.HuberLoss,
    "bce": nn.BCEWithLogitsLoss,
    "cross_entropy": nn.CrossEntropyLoss,
}


def make_loss(name: str) -> nn.Module:
    if name not in _LOSSES:
        raise ConfigError(f"Unknown loss {name!r}. Use one of: {', '.join(_LOSSES)}.")
    return _LOSSES[name]()


def zero_grad(optimizer: torch.optim.Optimizer) -> None:
    # set_to_none frees the gradient memory and skips a fill kernel.
    optimizer.zero_grad(set_to_none=True)


def forward(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return model(features)


def compute_loss(loss_fn: nn.Module, predictions: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    _check_shapes(loss_fn, predictions, target)
    return loss_fn(predictions.float(), target)


def backward(loss: torch.Tensor, scale: float = 1.0, retain_graph: bool = False) -> None:
    # scale < 1 weights this batch inside an accumulation group (see batching.plan_epoch).
    (loss * scale if scale != 1.0 else loss).backward(retain_graph=retain_graph)


@dataclass
class StepInfo:
    """What an optimizer step did; grad_norm stays a tensor to avoid a host sync."""

    step: int
    lr: float
    grad_norm: torch.Tensor | None


def optimizer_step(
    optimizer: torch.optim.Optimizer, model: nn.Module, clip: float | None, step: int
) -> StepInfo:
    grad_norm = None
    if clip is not None and clip > 0:
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip)
    optimizer.step()
    return StepInfo(step=step, lr=float(optimizer.param_groups[0]["lr"]), grad_norm=grad_norm)


def _check_shapes(loss_fn: nn.Module, predictions: torch.Tensor, target: torch.Tensor) -> None:
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        ok = predictions.dim() == 2 and target.dim() == 1 and predictions.shape[0] == target.shape[0]
        rule = "predictions (N, classes) and integer targets (N,)"
    else:
        ok = predictions.shape == target.shape
        rule = "predictions and targets of the same shape"
    if not ok:
        raise ConfigError(
            f"The loss {type(loss_fn).__name__} needs {rule}; got predictions {tuple(predictions.shape)} "
            f"and targets {tuple(target.shape)}. Check the model's output size and the loss/problem type."
        )


class DeviceScalar:
    """A number that stays on the device until someone reads it.

    Cards hand one to the next card instead of a float: turning a CUDA tensor
    into a float waits for the GPU to finish everything queued, so doing it per
    card would stall the GPU between cards. Reading it -- ``float(v)``, an
    f-string, arithmetic, comparisons -- copies it to the host once and caches
    it. A ``numbers.Real``; ``.tensor`` gives the device tensor itself.
    """

    __slots__ = ("tensor", "_value")

    def __init__(self, tensor: torch.Tensor):
        if tensor.numel() != 1:
            raise ValueError(f"DeviceScalar wraps a one-element tensor; got shape {tuple(tensor.shape)}.")
        self.tensor = tensor.detach()
        self._value: float | None = None

    def __float__(self) -> float:
        if self._value is None:
            self._value = float(self.tensor)  # the one host sync, on first read
        return self._value

    def __repr__(self) -> str:
        return repr(float(self))

    def __format__(self, spec: str) -> str:
        return format(float(self), spec)

    def __hash__(self) -> int:
        return hash(float(self))

    def __bool__(self) -> bool:
        return bool(float(self))


def _delegate(name: str):
    def method(self: DeviceScalar, *args):
        args = tuple(float(a) if isinstance(a, DeviceScalar) else a for a in args)
        return getattr(float(self), name)(*args)

    method.__name__ = name
    return method


# Everything else a real number does, done by the float it holds.
for _name in (
    "__str__", "__int__", "__trunc__", "__floor__", "__ceil__", "__round__", "__abs__", "__neg__", "__pos__",
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__divmod__", "__rdivmod__", "__pow__", "__rpow__",
    "__complex__", "conjugate", "is_integer",
):
    setattr(DeviceScalar, _name, _delegate(_name))
DeviceScalar.real = property(lambda self: float(self))  # type: ignore[attr-defined]
DeviceScalar.imag = property(lambda self: 0.0)  # type: ignore[attr-defined]
numbers.Real.register(DeviceScalar)
