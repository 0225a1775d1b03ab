"""Building models from a typed spec: an MLP, or any importable nn.Module class."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from prefect_torch.engine.spec import Spec
from prefect_torch.errors import ConfigError

Activation = Literal["relu", "gelu", "silu", "tanh", "leaky_relu", "elu", "sigmoid"]
Norm = Literal["none", "batch", "layer"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "sigmoid": nn.Sigmoid,
}


class ModelSpec(Spec):
    """The network to train: an MLP by default, or your own ``package.module:Class``."""

    hidden: list[int] = Field(
        # Defaults as values (pydantic copies them per instance): the UI form shows defaults only.
        default=[64, 64], description="Sizes of the MLP's hidden layers, e.g. [256, 256]."
    )
    activation: Activation = Field(default="relu", description="Activation after each hidden layer.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout probability after each hidden layer.")
    norm: Norm = Field(default="none", description="Normalisation after each hidden linear layer.")
    module: str | None = Field(
        default=None,
        description="Use your own nn.Module instead of the MLP: 'package.module:ClassName'.",
    )
    kwargs: dict[str, Any] = Field(
        default={},
        description="Keyword arguments for the custom module (in_features/out_features are filled in if it takes them).",
    )
    seed: int = Field(default=0, ge=0, description="Seed of the weight initialisation.")

    @field_validator("hidden")
    @classmethod
    def _positive_sizes(cls, sizes: list[int]) -> list[int]:
        bad = [s for s in sizes if s < 1]
        if bad:
            raise ValueError(f"hidden layer sizes must be positive integers; got {sizes}.")
        return sizes

    @field_validator("module")
    @classmethod
    def _module_path_shape(cls, path: str | None) -> str | None:
        if path is not None and (":" not in path or path.startswith(":") or path.endswith(":")):
            raise ValueError(f"module must look like 'package.module:ClassName'; got {path!r}.")
        return path

    def short_name(self) -> str:
        """A compact label for run names, e.g. ``mlp-64x64``."""
        if self.module:
            return self.module.rsplit(":", 1)[-1]
        return "mlp-" + ("x".join(map(str, self.hidden)) or "linear")


def build_model(spec: ModelSpec, in_features: int, out_features: int) -> nn.Module:
    """A freshly initialised model; the same spec always gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if spec.module:
            return _build_custom(spec, in_features, out_features)
        return _build_mlp(spec, in_features, out_features)


def _build_mlp(spec: ModelSpec, in_features: int, out_features: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for size in spec.hidden:
        layers.append(nn.Linear(width, size))
        if spec.norm == "batch":
            layers.append(nn.BatchNorm1d(size))
        elif spec.norm == "layer":
            layers.append(nn.LayerNorm(size))
        layers.append(_ACTIVATIONS[spec.activation]())
        if spec.dropout > 0:
            layers.append(nn.Dropout(spec.dropout))
        width = size
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def _build_custom(spec: ModelSpec, in_features: int, out_features: int) -> nn.Module:
    module_name, _, class_name = spec.module.partition(":")  # type: ignore[union-attr]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"Cannot import {module_name!r} for model {spec.module!r}: {exc}. "
            "Make sure the package is installed or on PYTHONPATH."
        ) from exc
    cls = getattr(module, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise ConfigError(f"{spec.module!r} is not an nn.Module class. Point module= at a torch.nn.Module subclass.")
    kwargs = dict(spec.kwargs)
    params = inspect.signature(cls).parameters
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if name in params and name not in kwargs:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"Cannot build {spec.module!r} with kwargs {kwargs}: {exc}.") from exc


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
