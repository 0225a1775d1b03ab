import math
import threading

import numpy as np
import pytest
import torch
from torch import nn

from prefect_torch.engine.batching import plan_epoch
from prefect_torch.engine.device import resolve_device
from prefect_torch.engine.loop import TrainSpec, Trainer, fit
from prefect_torch.engine.metrics import evaluate_split
from prefect_torch.engine.models import ModelSpec, build_model
from prefect_torch.engine.optim import OptimizerSpec, build_optimizer
from prefect_torch.engine.problem import resolve_loss
from prefect_torch.engine.split import SplitSpec, split_table
from prefect_torch.errors import ConfigError, DeviceError, TrainingError
from tests.datasets import noisy_linear, separable_classes


def train(frame, target, model=ModelSpec(hidden=[32, 32]), optimizer=OptimizerSpec(lr=3e-3), **training):
    splits = split_table(frame, SplitSpec(target=target))
    net = build_model(model, splits.info.n_features, splits.info.n_outputs)
    opt = build_optimizer(optimizer, net)
    result = fit(net, opt, splits, TrainSpec(device="cpu", **training))
    return net, splits, result


def test_regression_reaches_r2_095_on_a_noisy_linear_target():
    net, splits, _ = train(noisy_linear(1500), "y", epochs=15, batch_size=32)
    assert evaluate_split(net, splits.test, splits.info)["r2"] >= 0.95


def test_multiclass_reaches_accuracy_095_on_separable_classes():
    net, splits, _ = train(separable_classes(1200, classes=4), "label", epochs=8, batch_size=32)
    metrics = evaluate_split(net, splits.test, splits.info)
    assert metrics["accuracy"] >= 0.95
    assert set(metrics) == {"accuracy", "f1_macro", "log_loss"}


def test_binary_reaches_accuracy_095_and_reports_roc_auc():
    net, splits, _ = train(separable_classes(1000, classes=2, labels=["no", "yes"]), "label", epochs=8, batch_size=32)
    metrics = evaluate_split(net, splits.test, splits.info)
    assert metrics["accuracy"] >= 0.95 and metrics["roc_auc"] >= 0.95


def test_seeded_runs_reproduce_bitwise():
    spec = dict(epochs=3, batch_size=16, seed=5)
    model = ModelSpec(hidden=[16], dropout=0.2)
    a, _, ra = train(noisy_linear(300), "y", model=model, **spec)
    b, _, rb = train(noisy_linear(300), "y", model=model, **spec)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert [h["train_loss"] for h in ra.history] == [h["train_loss"] for h in rb.history]


def test_training_leaves_no_thread_that_would_hold_up_the_exit():
    # The CLI ends without the interpreter's teardown only when no non-daemon thread is
    # left; the next epoch's order, computed ahead, must not leave one behind.
    before = set(threading.enumerate())
    trainer_kept_alive = train(noisy_linear(300), "y", epochs=3, batch_size=16)
    left = [t for t in set(threading.enumerate()) - before if t.is_alive() and not t.daemon]
    assert trainer_kept_alive and left == []


def test_different_seed_changes_the_result():
    a, _, _ = train(noisy_linear(300), "y", epochs=1, batch_size=16, seed=1)
    b, _, _ = train(noisy_linear(300), "y", epochs=1, batch_size=16, seed=2)
    assert not torch.equal(a[0].weight, b[0].weight)


def one_step_weights(splits, batch_size, accumulate):
    """Weights after exactly one optimizer step of plain SGD."""
    net = build_model(ModelSpec(hidden=[8]), splits.info.n_features, 1)
    opt = build_optimizer(OptimizerSpec(name="sgd", lr=0.1), net)
    spec = TrainSpec(epochs=1, batch_size=batch_size, accumulate=accumulate, shuffle=False, device="cpu")
    trainer = Trainer(net, opt, splits, spec)
    trainer.plans = trainer.plans[:accumulate]  # exactly one accumulation group
    trainer.run_epoch()
    return net.state_dict()


def test_accumulating_k_batches_of_b_matches_one_batch_of_k_times_b():
    splits = split_table(noisy_linear(200), SplitSpec(target="y", stratify=False))
    accumulated = one_step_weights(splits, batch_size=8, accumulate=4)
    single = one_step_weights(splits, batch_size=32, accumulate=1)
    for name in single:
        assert torch.allclose(accumulated[name], single[name], atol=1e-6), name


def test_a_final_partial_accumulation_group_is_still_stepped():
    plans = plan_epoch(rows=50, batch_size=10, accumulate=3)
    assert [p.closes_group for p in plans] == [False, False, True, False, True]
    # the last group has 2 batches of 10 rows: each carries half of its gradient
    assert [p.loss_scale for p in plans[3:]] == [0.5, 0.5]
    splits = split_table(noisy_linear(71), SplitSpec(target="y", val_fraction=0.0, test_fraction=0.0))
    net = build_model(ModelSpec(hidden=[4]), 6, 1)
    opt = build_optimizer(OptimizerSpec(), net)
    result = fit(net, opt, splits, TrainSpec(epochs=2, batch_size=10, accumulate=3, device="cpu"))
    assert result.state.step == 2 * 3  # 8 batches → groups of 3, 3, 2


def test_ragged_last_batch_is_weighted_by_its_rows():
    plans = plan_epoch(rows=25, batch_size=10, accumulate=3)
    assert [p.loss_scale for p in plans] == [0.4, 0.4, 0.2]


def test_gradient_clipping_bounds_the_update():
    splits = split_table(noisy_linear(64) * 1000, SplitSpec(target="y", stratify=False, standardize=False))
    net = build_model(ModelSpec(hidden=[]), 6, 1)
    before = net[0].weight.detach().clone()
    opt = build_optimizer(OptimizerSpec(name="sgd", lr=1.0), net)
    trainer = Trainer(net, opt, splits, TrainSpec(epochs=1, batch_size=64, clip=0.5, device="cpu"))
    trainer.run_epoch()
    params = torch.cat([(net[0].weight - before).flatten()])
    assert params.norm() <= 0.5 + 1e-5


@pytest.mark.parametrize("scheduler", ["step", "cosine", "plateau"])
def test_schedulers_change_the_learning_rate(scheduler):
    sched = {"name": scheduler, "step_size": 1, "gamma": 0.5, "patience": 0, "factor": 0.5}
    _, _, result = train(noisy_linear(200), "y", epochs=4, batch_size=32, scheduler=sched,
                         optimizer=OptimizerSpec(lr=1e-2))
    lrs = [h["lr"] for h in result.history]
    assert lrs[-1] < lrs[0]


def test_early_stopping_stops_and_restores_the_best_weights():
    # A huge learning rate makes validation loss worsen after the first epochs.
    net, splits, result = train(noisy_linear(400), "y", epochs=50, batch_size=16, early_stopping_patience=2,
                                optimizer=OptimizerSpec(name="sgd", lr=0.3, momentum=0.9))
    assert result.stopped_early and "did not improve for 2 epochs" in result.stop_reason
    best = result.state.best_val_loss
    from prefect_torch.engine.steps import make_loss
    from prefect_torch.engine.metrics import predict_outputs

    val_loss = float(make_loss("mse")(predict_outputs(net, splits.val.X), splits.val.y))
    assert math.isclose(val_loss, best, rel_tol=1e-5)


def test_validation_runs_in_eval_mode_without_gradients():
    net, splits, result = train(noisy_linear(200), "y", model=ModelSpec(hidden=[16], dropout=0.5), epochs=1)
    assert net.training  # back in training mode after validation
    assert all(h["val_loss"] is not None for h in result.history)


def test_nan_loss_stops_with_a_clear_error():
    frame = noisy_linear(200)
    with pytest.raises(TrainingError, match="loss became (nan|inf).*Lower the learning rate"):
        train(frame, "y", epochs=3, optimizer=OptimizerSpec(name="sgd", lr=10.0), model=ModelSpec(hidden=[64, 64]))


def test_loss_incompatible_with_the_problem():
    with pytest.raises(ConfigError, match="'cross_entropy' cannot train a regression problem"):
        resolve_loss("cross_entropy", "regression")


def test_unknown_loss_optimizer_activation():
    with pytest.raises(ConfigError, match="loss"):
        TrainSpec(loss="hinge")
    with pytest.raises(ConfigError, match="'adam', 'adamw', 'sgd' or 'rmsprop'"):
        OptimizerSpec(name="lbfgs")
    with pytest.raises(ConfigError, match="activation"):
        ModelSpec(activation="swish")


def test_cuda_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="no usable CUDA GPU.*device='cpu'"):
        resolve_device("cuda")


def test_custom_module_models_are_built_with_their_sizes():
    spec = ModelSpec(module="torch.nn:Linear", kwargs={"bias": False})
    model = build_model(spec, 5, 2)
    assert isinstance(model, nn.Linear) and model.weight.shape == (2, 5) and model.bias is None


def test_custom_module_that_cannot_be_imported():
    with pytest.raises(ConfigError, match="Cannot import 'no_such_pkg.mod'.*installed"):
        build_model(ModelSpec(module="no_such_pkg.mod:Net"), 3, 1)


def test_mlp_spec_options_shape_the_network():
    model = build_model(ModelSpec(hidden=[8, 4], activation="gelu", dropout=0.1, norm="layer"), 3, 2)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Linear", "LayerNorm", "GELU", "Dropout", "Linear", "LayerNorm", "GELU", "Dropout", "Linear"]
    assert np.prod(model(torch.zeros(5, 3)).shape) == 10
