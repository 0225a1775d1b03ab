"""Handles: small values that cards pass instead of re-serialising live state.

A handle wraps a live model or optimizer with its lineage key and a version.
Cards may change the live object in place for speed; each such card bumps the
object's version and returns a new handle. An older handle is then *stale*, and
using it raises ``StaleHandleError`` instead of silently training the wrong state.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec
from prefect_torch.engine.records import Recordable
from prefect_torch.errors import ConfigError, StaleHandleError

_VERSION_ATTR = "_prefect_torch_version"


def lineage_key(card: str, config: Any = None, *inputs: str, code_version: str = "1") -> str:
    """hash(card, its config, its code version, its inputs' keys): O(1) in model size."""
    payload = json.dumps([card, code_version, config, list(inputs)], sort_keys=True, default=str)
    return f"{card}-" + hashlib.sha256(payload.encode()).hexdigest()[:32]


def live_version(obj: Any) -> int:
    return getattr(obj, _VERSION_ATTR, 0)


def _bump(obj: Any) -> int:
    version = live_version(obj) + 1
    setattr(obj, _VERSION_ATTR, version)  # nn.Module and Optimizer both take plain attributes
    return version


@dataclass(frozen=True)
class ModelHandle(Recordable):
    """A live model, the spec it was built from, its lineage key and version."""

    module: nn.Module = field(repr=False, compare=False)
    spec: ModelSpec
    key: str
    version: int = 0
    in_features: int = 0
    out_features: int = 0

    @property
    def model(self) -> nn.Module:
        """The live model; raises if a later card has changed it since this handle."""
        current = live_version(self.module)
        if current != self.version:
            raise StaleHandleError(
                f"This model handle (version {self.version}, key {self.key[:24]}…) is stale: a later card "
                f"changed the model in place (now version {current}). Pass the handle the most recent card "
                "returned, or fork the state first with handle.fork() to branch from this point."
            )
        return self.module

    def advance(self, card: str, config: Any = None, *inputs: str) -> "ModelHandle":
        """The handle after ``card`` changed the live model in place."""
        self.model  # refuse to advance from a stale handle
        version = _bump(self.module)
        key = lineage_key(card, config, self.key, *inputs)
        return ModelHandle(self.module, self.spec, key, version, self.in_features, self.out_features)

    def fork(self) -> "ModelHandle":
        """An independent deep copy of the live model, to branch training from here."""
        import copy

        clone = copy.deepcopy(self.model)
        setattr(clone, _VERSION_ATTR, 0)
        return ModelHandle(clone, self.spec, lineage_key("fork", None, self.key), 0,
                           self.in_features, self.out_features)

    def __record__(self):
        # Persisting copies weights to the host; live handles between cards never do.
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        meta = {"spec": self.spec.model_dump(mode="json"), "key": self.key,
                "in_features": self.in_features, "out_features": self.out_features}
        return tensors, meta

    @classmethod
    def __from_record__(cls, tensors, meta):
        from prefect_torch.engine.models import build_model

        spec = ModelSpec.model_validate(meta["spec"])
        module = build_model(spec, meta["in_features"], meta["out_features"])
        module.load_state_dict(tensors)
        return cls(module, spec, meta["key"], 0, meta["in_features"], meta["out_features"])

    def __repr__(self) -> str:
        return f"ModelHandle({self.spec.short_name()}, version={self.version}, key={self.key[:20]}…)"


@dataclass(frozen=True)
class OptimizerHandle:
    """A live optimizer bound to one model."""

    optimizer: torch.optim.Optimizer = field(repr=False, compare=False)
    spec: OptimizerSpec
    key: str
    model_module: nn.Module = field(repr=False, compare=False)
    version: int = 0

    @property
    def live(self) -> torch.optim.Optimizer:
        current = live_version(self.optimizer)
        if current != self.version:
            raise StaleHandleError(
                f"This optimizer handle (version {self.version}) is stale: a later card changed the "
                f"optimizer in place (now version {current}). Pass the handle the most recent card returned."
            )
        return self.optimizer

    def check_model(self, model: ModelHandle) -> None:
        if model.module is not self.model_module:
            raise ConfigError(
                "This optimizer was built for a different model: its parameters are not the model's. "
                "Initialise the optimizer (training_init_optimizer) from the model you are training."
            )

    def advance(self, card: str, *inputs: str) -> "OptimizerHandle":
        self.live
        version = _bump(self.optimizer)
        key = lineage_key(card, None, self.key, *inputs)
        return OptimizerHandle(self.optimizer, self.spec, key, self.model_module, version)

    def __repr__(self) -> str:
        return f"OptimizerHandle({self.spec.short_name()}, version={self.version})"
