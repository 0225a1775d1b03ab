"""Search spaces: every name and range is checked against the specs' own rules."""

from types import SimpleNamespace

import pytest

from prefect_torch.engine.loop import EpochRecord, TrainSpec
from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec
from prefect_torch.engine.search import (
    ReportToTrial,
    TrialPruned,
    apply_params,
    check_metric,
    check_space,
    decode_params,
    default_direction,
    parse_space,
    trial_value,
)
from prefect_torch.errors import ConfigError

BASE = (ModelSpec(hidden=[8, 8]), OptimizerSpec(), TrainSpec())


def check(raw):
    check_space(parse_space(raw), *BASE)


def test_a_space_over_the_three_specs_is_accepted():
    check({"lr": {"log_uniform": [1e-4, 1e-1]}, "dropout": {"uniform": [0.0, 0.5]},
           "batch_size": {"int": [16, 128]}, "hidden": {"choice": [[8], [32, 32]]},
           "activation": {"choice": ["relu", "gelu"]}, "model.seed": {"int": [0, 3]}})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"lrr": {"uniform": [0, 1]}}, "Unknown search space parameter 'lrr'.*Use one of: .*lr"),
        ({"hidden": {"choice": []}}, "empty choice"),
        ({"lr": {"log_uniform": [0, 0.1]}}, "both bounds above zero"),
        ({"weight_decay": {"log_uniform": [-1e-3, 0.1]}}, "both bounds above zero"),
        ({"dropout": {"uniform": [0, 1.5]}}, "allows 1.5, which model refuses: .*dropout"),
        ({"epochs": {"int": [0, 3]}}, "allows 0, which training refuses"),
        ({"activation": {"choice": ["relu", "swishy"]}}, "allows 'swishy'"),
        ({"lr": {"uniform": [0.1, 0.01]}}, "not above the high one"),
        ({"batch_size": {"uniform": [16, 64]}}, "integer field: use {int: \\[16, 64\\]}"),
        ({"seed": {"int": [0, 3]}}, "field of model and training; say which: model.seed, training.seed"),
        ({"lr": {"normal": [0, 1]}}, "must be one of"),
        ({"lr": {"log_uniform": [1e-3]}}, "log_uniform needs \\[lo, hi\\]"),
        ({}, "non-empty mapping"),
    ],
)
def test_a_bad_space_names_the_entry_and_the_fix(raw, message):
    with pytest.raises(ConfigError, match=message):
        check(raw)


def test_trial_parameters_set_the_specs_fields():
    params = decode_params({"lr": 0.01, "hidden": "[32, 16]", "batch_size": 16, "model.seed": 2})
    model, optimizer, training = apply_params(params, *BASE)
    assert (optimizer.lr, model.hidden, training.batch_size, model.seed, training.seed) == (0.01, [32, 16], 16, 2, 0)
    # an int for the layer sizes widens every layer
    model, _, _ = apply_params({"hidden": 24}, *BASE)
    assert model.hidden == [24, 24]


def test_the_metric_and_its_direction():
    assert default_direction("val_loss") == "minimize" and default_direction("r2") == "maximize"
    with pytest.raises(ConfigError, match="Unknown sweep metric 'f1'"):
        check_metric("f1")


def test_a_trial_scores_the_epoch_whose_weights_it_kept():
    history = [{"val_loss": 0.5, "val_metrics": {"r2": 0.5}}, {"val_loss": 0.3, "val_metrics": {"r2": 0.7}},
               {"val_loss": 0.4, "val_metrics": {"r2": 0.6}}]
    assert trial_value(history, "val_loss", TrainSpec()) == 0.4
    restored = TrainSpec(early_stopping_patience=1, restore_best=True)
    assert trial_value(history, "val_loss", restored) == 0.3
    assert trial_value(history, "r2", restored) == 0.7
    with pytest.raises(ConfigError, match="val_fraction"):
        trial_value([{"val_loss": None, "val_metrics": {}}], "val_loss", TrainSpec())


def _epoch(epoch: int, val_loss: float) -> EpochRecord:
    return EpochRecord(epoch=epoch, train_loss=val_loss, val_loss=val_loss, val_metrics={}, lr=1e-3, seconds=0.1,
                       samples_per_s=1.0)


@pytest.mark.parametrize("pruner, pruned", [("median", True), ("none", False)])
def test_reporting_to_a_trial_prunes_only_under_a_pruner(pruner, pruned):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    built = optuna.pruners.NopPruner() if pruner == "none" else optuna.pruners.MedianPruner(n_startup_trials=1)
    study = optuna.create_study(pruner=built)
    trainer = SimpleNamespace(spec=TrainSpec(epochs=3))  # what the callback reads of the Trainer
    first = study.ask()
    for epoch in (1, 2, 3):
        ReportToTrial(first).on_epoch_end(trainer, _epoch(epoch, 0.1))
    study.tell(first, 0.1)
    worse = study.ask()
    callback = ReportToTrial(worse)
    assert callback.may_prune is pruned  # a NopPruner study is not asked each epoch
    if pruned:
        with pytest.raises(TrialPruned):
            callback.on_epoch_end(trainer, _epoch(1, 5.0))
    else:
        for epoch in (1, 2):
            callback.on_epoch_end(trainer, _epoch(epoch, 5.0))
    assert study.trials[1].intermediate_values[1] == 5.0
