"""Search spaces for sweeps, and the bridge from the training loop to an Optuna trial.

A search space maps a field of ``ModelSpec``, ``OptimizerSpec`` or ``TrainSpec``
(``lr``, ``dropout``, ``hidden``, ``batch_size``, ...) to one distribution::

    lr: {log_uniform: [1.0e-4, 1.0e-1]}
    dropout: {uniform: [0.0, 0.5]}
    epochs: {int: [2, 8]}
    hidden: {choice: [[32], [64, 64]]}

Every name and range is checked against the specs' own rules before any trial
runs: a typo, an empty choice, a log range reaching zero or a range the field
refuses (``dropout`` up to 1.5) is a ``ConfigError`` naming the field and the fix.

This module is plain Python and pydantic; Optuna is imported only where a trial is
sampled or reported to. It imports nothing from Prefect.
"""

from __future__ import annotations

import builtins
import json
import math
from typing import TYPE_CHECKING, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

from prefect_torch.engine.loop import Callback, EpochRecord, TrainSpec
from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec
from prefect_torch.errors import ConfigError, TrainingStopped

if TYPE_CHECKING:
    from prefect_torch.engine.loop import Trainer

# Which spec owns a searchable field; the prefix that names it when the bare name is ambiguous.
SPECS: dict[str, type[BaseModel]] = {"model": ModelSpec, "optimizer": OptimizerSpec, "training": TrainSpec}
# Fields that are not a hyperparameter to search (structure, devices, bookkeeping).
_NOT_SEARCHABLE = {
    "model": {"module", "kwargs"},
    "training": {"scheduler", "device", "data_placement", "checkpoint_every", "progress_every", "compile"},
}
# The metric a sweep optimises: the validation loss, or the problem's validation metric per epoch.
VAL_LOSS = "val_loss"
HIGHER_IS_BETTER = {"r2": True, "accuracy": True, VAL_LOSS: False}
USER_ATTR_PRUNED = "pruned_at_epoch"


class _Distribution(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogUniform(_Distribution):
    """A float drawn log-uniformly between two positive bounds."""

    log_uniform: tuple[float, float] = Field(description="Lowest and highest value, both above zero.")


class Uniform(_Distribution):
    """A float drawn uniformly between two bounds."""

    uniform: tuple[float, float] = Field(description="Lowest and highest value.")


class IntRange(_Distribution):
    """An integer drawn uniformly between two bounds, both included."""

    # The key users write is `int`; builtins.int because the field shadows the name here.
    int: tuple[builtins.int, builtins.int] = Field(description="Lowest and highest value, both included.")


class Choice(_Distribution):
    """One of a list of values (numbers, strings, booleans or lists such as layer sizes)."""

    choice: list[Any] = Field(description="The values to choose from; at least one.")


Distribution = Union[LogUniform, Uniform, IntRange, Choice]


class SearchSpace(RootModel[dict[str, Distribution]]):
    """Hyperparameters to search: a field of the model, optimizer or training spec
    (``lr``, ``dropout``, ``batch_size``; ``model.seed`` where a name is in two specs)
    mapped to ``{log_uniform: [lo, hi]}``, ``{uniform: [lo, hi]}``, ``{int: [lo, hi]}``
    or ``{choice: [...]}``."""

    root: dict[str, Distribution] = Field(description="Field name to distribution.")


def parse_space(raw: Any) -> SearchSpace:
    """A search space from its mapping (as read from YAML or JSON), or a ConfigError."""
    if isinstance(raw, SearchSpace):
        return raw
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            "The search space must be a non-empty mapping of field name to distribution, "
            "e.g. {lr: {log_uniform: [1e-4, 1e-1]}}."
        )
    entries: dict[str, Distribution] = {}
    kinds = {"log_uniform": LogUniform, "uniform": Uniform, "int": IntRange, "choice": Choice}
    for name, value in raw.items():
        if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in kinds:
            raise ConfigError(
                f"Search space entry {name!r} must be one of {{log_uniform: [lo, hi]}}, {{uniform: [lo, hi]}}, "
                f"{{int: [lo, hi]}} or {{choice: [...]}}; got {value!r}."
            )
        kind = next(iter(value))
        try:
            entries[str(name)] = kinds[kind].model_validate(value)
        except ValidationError as exc:
            problem = "; ".join(error["msg"] for error in exc.errors())
            raise ConfigError(
                f"Search space entry {name!r}: {kind} needs {'a list of values' if kind == 'choice' else '[lo, hi]'} "
                f"({problem}); got {value[kind]!r}."
            ) from None
    return SearchSpace(entries)


def resolve_field(name: str) -> tuple[str, str]:
    """``(spec, field)`` that a search-space name sets, or a ConfigError naming the fix."""
    if "." in name:
        prefix, field = name.split(".", 1)
        owners = [prefix] if prefix in SPECS and field in _searchable(prefix) else []
    else:
        field = name
        owners = [spec for spec in SPECS if field in _searchable(spec)]
    if len(owners) == 1:
        return owners[0], field
    if len(owners) > 1:
        raise ConfigError(
            f"Search space name {name!r} is a field of {' and '.join(owners)}; "
            f"say which: {', '.join(f'{spec}.{field}' for spec in owners)}."
        )
    known = sorted({field for spec in SPECS for field in _searchable(spec)})
    raise ConfigError(
        f"Unknown search space parameter {name!r}: it is not a field of ModelSpec, OptimizerSpec or "
        f"TrainSpec. Use one of: {', '.join(known)}."
    )


def _searchable(spec: str) -> set[str]:
    return set(SPECS[spec].model_fields) - _NOT_SEARCHABLE.get(spec, set())


def check_space(space: SearchSpace, model: ModelSpec, optimizer: OptimizerSpec, training: TrainSpec) -> None:
    """Refuse a space that cannot be sampled, or whose values the specs would refuse.

    Each range is checked at both ends (and each choice value) by building the specs
    with that value, so ``dropout: {uniform: [0, 1.5]}`` fails here, not in trial 7.
    """
    base = {"model": model, "optimizer": optimizer, "training": training}
    for name, dist in space.root.items():
        spec, field = resolve_field(name)
        if isinstance(dist, Choice):
            if not dist.choice:
                raise ConfigError(f"Search space entry {name!r} has an empty choice: list at least one value.")
            values = list(dist.choice)
        else:
            lo, hi = _bounds(dist)
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
                raise ConfigError(
                    f"Search space entry {name!r} has the range [{lo}, {hi}]: the low bound must be finite "
                    "and not above the high one."
                )
            if isinstance(dist, LogUniform) and lo <= 0:
                raise ConfigError(
                    f"Search space entry {name!r} is log_uniform over [{lo}, {hi}]: a log range needs both "
                    "bounds above zero. Raise the low bound (e.g. 1e-6) or use uniform."
                )
            if isinstance(dist, (Uniform, LogUniform)) and _is_int_field(spec, field):
                raise ConfigError(
                    f"Search space entry {name!r} is an integer field: use {{int: [{int(lo)}, {int(hi)}]}} "
                    "or a choice instead of a float range."
                )
            values = [lo, hi]
        for value in values:
            try:
                _with_value(base[spec], field, value)
            except ConfigError as exc:
                raise ConfigError(f"Search space entry {name!r} allows {value!r}, which {spec} refuses: {exc}") from None


def _bounds(dist: Distribution) -> tuple[float, float]:
    return next(iter(dist.model_dump().values()))


def _is_int_field(spec: str, field: str) -> bool:
    annotation = SPECS[spec].model_fields[field].annotation
    return annotation is int or annotation == (int | None)


def _with_value(spec: BaseModel, field: str, value: Any) -> BaseModel:
    current = getattr(spec, field)
    if isinstance(current, list) and isinstance(value, int) and not isinstance(value, bool):
        value = [value] * max(1, len(current))  # an int for layer sizes: every layer that wide
    return type(spec).model_validate({**spec.model_dump(), field: value})


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """Sample every parameter of ``space`` from an Optuna trial (``trial.suggest_*``)."""
    params: dict[str, Any] = {}
    for name, dist in space.root.items():
        if isinstance(dist, LogUniform):
            params[name] = trial.suggest_float(name, *dist.log_uniform, log=True)
        elif isinstance(dist, Uniform):
            params[name] = trial.suggest_float(name, *dist.uniform)
        elif isinstance(dist, IntRange):
            params[name] = trial.suggest_int(name, *dist.int)
        else:
            # Optuna's categorical values are scalars: lists (layer sizes) travel as JSON text.
            options = [_categorical(value) for value in dist.choice]
            params[name] = _from_categorical(trial.suggest_categorical(name, options))
    return params


def _categorical(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _from_categorical(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value


def decode_params(params: dict[str, Any]) -> dict[str, Any]:
    """A finished trial's parameters as the space's values (layer-size lists decoded)."""
    return {name: _from_categorical(value) for name, value in params.items()}


def apply_params(
    params: dict[str, Any], model: ModelSpec, optimizer: OptimizerSpec, training: TrainSpec
) -> tuple[ModelSpec, OptimizerSpec, TrainSpec]:
    """The base specs with a trial's parameters set."""
    specs: dict[str, BaseModel] = {"model": model, "optimizer": optimizer, "training": training}
    for name, value in params.items():
        spec, field = resolve_field(name)
        specs[spec] = _with_value(specs[spec], field, value)
    return specs["model"], specs["optimizer"], specs["training"]  # type: ignore[return-value]


# -- the metric ------------------------------------------------------------------------


def check_metric(metric: str) -> None:
    if metric not in HIGHER_IS_BETTER:
        raise ConfigError(
            f"Unknown sweep metric {metric!r}: use val_loss (the default), r2 (regression) or "
            "accuracy (classification), all measured on the validation split each epoch."
        )


def default_direction(metric: str) -> Literal["minimize", "maximize"]:
    return "maximize" if HIGHER_IS_BETTER.get(metric, False) else "minimize"


def epoch_value(record: dict[str, Any] | EpochRecord, metric: str) -> float | None:
    """The sweep metric of one epoch's record, or None when it has no validation split."""
    row = record.to_dict() if isinstance(record, EpochRecord) else record
    if metric == VAL_LOSS:
        value = row.get("val_loss")
    else:
        value = (row.get("val_metrics") or {}).get(metric)
    return None if value is None else float(value)


def trial_value(history: list[dict[str, Any]], metric: str, training: TrainSpec) -> float:
    """What a finished training run scores: the metric of the epoch whose weights it kept
    (the best epoch when early stopping restored it, else the last)."""
    values = [epoch_value(row, metric) for row in history]
    if not values or values[-1] is None:
        raise ConfigError(
            f"The sweep metric {metric!r} is measured on the validation split, which is empty: "
            "set dataset.val_fraction above 0."
        )
    if training.early_stopping_patience is not None and training.restore_best:
        losses = [row.get("val_loss") for row in history]
        best = min(range(len(losses)), key=lambda i: losses[i])
        return float(values[best])  # type: ignore[arg-type]
    return float(values[-1])


# -- pruning ---------------------------------------------------------------------------


class TrialPruned(TrainingStopped):
    """A trial the pruner stopped; carries the epoch it stopped after."""

    def __init__(self, epoch: int, value: float):
        super().__init__(f"pruned after epoch {epoch}: {value:.6g} is worse than the pruner's threshold")
        self.epoch = epoch
        self.value = value


class ReportToTrial(Callback):
    """Reports each epoch's validation metric to an Optuna trial and stops the run
    when the pruner says so (the pattern of Optuna's Lightning pruning callback).

    ``trial`` is anything with Optuna's ``report(value, step)`` and ``should_prune()``:
    a live trial in this process, or ``optuna.trial.Trial(study, trial_id)`` for a trial
    another process asked for (its study in shared RDB storage). Stopping raises
    ``TrialPruned`` out of the loop, so a stopped run is never cached as a finished one.
    """

    def __init__(self, trial: Any, metric: str = VAL_LOSS):
        self.trial = trial
        self.metric = metric
        self.may_prune = _may_prune(trial)

    def on_epoch_end(self, trainer: "Trainer", record: EpochRecord) -> None:
        value = epoch_value(record, self.metric)
        if value is None or not math.isfinite(value):
            return
        self.trial.report(value, step=record.epoch)
        if record.epoch < trainer.spec.epochs and self.may_prune and self.trial.should_prune():
            self.trial.set_user_attr(USER_ATTR_PRUNED, record.epoch)
            raise TrialPruned(record.epoch, value)


def _may_prune(trial: Any) -> bool:
    """False when the trial's study prunes nothing (Optuna's NopPruner): asking it each
    epoch would only read the trial back from the study's storage to answer no."""
    pruner = getattr(getattr(trial, "study", None), "pruner", None)
    if pruner is None:
        return True
    from optuna.pruners import NopPruner

    return not isinstance(pruner, NopPruner)


__all__ = [
    "SearchSpace", "LogUniform", "Uniform", "IntRange", "Choice", "Distribution",
    "parse_space", "check_space", "resolve_field", "suggest", "apply_params", "decode_params",
    "check_metric", "default_direction", "epoch_value", "trial_value",
    "ReportToTrial", "TrialPruned", "VAL_LOSS", "USER_ATTR_PRUNED",
]
