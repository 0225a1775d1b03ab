"""The step-wise flow as users meet it: task-run names, user steps, parameters."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from prefect import task
from prefect.exceptions import ParameterTypeError
from prefect.utilities.callables import parameter_schema
from safetensors.torch import load_file

from prefect_torch.engine.handles import ModelHandle, OptimizerHandle
from prefect_torch.engine.loop import TrainSpec
from prefect_torch.engine.models import ModelSpec, build_model
from prefect_torch.engine.optim import OptimizerSpec, SchedulerSpec
from prefect_torch.errors import ConfigError, TrainingError
from prefect_torch.flows import DatasetSpec, stepwise_train_flow, train_flow
from prefect_torch.flows.stepwise import _QuietCompletions
from tests.flows import harness


def _run(tmp_path, csv, training, **kwargs):
    return stepwise_train_flow(
        DatasetSpec(uri=csv, target="y"), ModelSpec(hidden=[8]), OptimizerSpec(lr=0.01), training,
        output=str(tmp_path / "model"), checkpoint_dir=str(tmp_path / "ckpt"), **kwargs,
    )


# -- user steps used by the tests below -------------------------------------------


@task
def keep_loss(loss: torch.Tensor, model: ModelHandle, batch_data) -> torch.Tensor:
    return loss


@task
def note_gradients(model: ModelHandle, batch_data) -> None:
    GRADIENT_NORMS.append(float(torch.cat([p.grad.reshape(-1) for p in model.model.parameters()]).norm()))


@task
def halve_lr(model: ModelHandle, optimizer: OptimizerHandle, step_info: dict) -> OptimizerHandle:
    for group in optimizer.live.param_groups:
        group["lr"] *= 0.5
    return optimizer.advance("halve_lr")


@task
def ignore_loss(loss: torch.Tensor, model: ModelHandle, batch_data) -> torch.Tensor:
    return loss * 0.0


@task
def per_row_loss(loss: torch.Tensor, model: ModelHandle, batch_data) -> torch.Tensor:
    return loss.expand(batch_data.rows)


@task
def poison_loss(loss: torch.Tensor, model: ModelHandle, batch_data) -> torch.Tensor:
    return loss * float("nan")


GRADIENT_NORMS: list[float] = []


# -- names ------------------------------------------------------------------------


def test_task_runs_are_named_by_epoch_and_batch(tmp_path, regression_csv):
    # 140 training rows in batches of 50 make batches 0, 1, 2; groups of 2 make steps
    # after batches 1 and 2; a checkpoint every step lands mid-epoch after batch 1.
    training = TrainSpec(epochs=2, batch_size=50, accumulate=2, checkpoint_every=1,
                         scheduler=SchedulerSpec(name="cosine", interval="step"))
    state = _run(tmp_path, regression_csv, training,
                 after_loss=keep_loss, after_backward=note_gradients, after_step=halve_lr, return_state=True)
    assert state.is_completed()

    expected = Counter()
    for e in (1, 2):
        for b in (0, 1, 2):
            for card in ("training_prepare_batch", "training_forward", "training_loss", "keep_loss",
                         "training_backward", "note_gradients"):
                expected[f"{card}[e{e}-b{b}]"] += 1
        for b in (0, 2):
            expected[f"training_zero_grad[e{e}-b{b}]"] += 1
        for b in (1, 2):
            for card in ("training_optimizer_step", "training_lr_schedule", "halve_lr"):
                expected[f"{card}[e{e}-b{b}]"] += 1
        expected[f"training_checkpoint[e{e}-b1]"] += 1
        for card in ("training_epoch_end", "training_checkpoint"):
            expected[f"{card}[e{e}]"] += 1
    once = {"data_load", "data_split", "model_define", "training_init_optimizer", "evaluate", "model_save"}

    runs = harness.task_runs(state.state_details.flow_run_id, at_least=sum(expected.values()) + len(once))
    in_loop = Counter(run.name for run in runs if "[e" in run.name)
    assert in_loop == expected
    assert {run.name.split("[")[0].rsplit("-", 1)[0] for run in runs if "[e" not in run.name} == once


def test_flow_run_is_named_after_the_dataset(tmp_path, regression_csv):
    state = _run(tmp_path, regression_csv, TrainSpec(epochs=1, batch_size=140), return_state=True)
    from prefect import get_client

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    assert flow_run.name == "train-stepwise[regression.csv]"


# -- user steps -----------------------------------------------------------------------


def test_the_loss_after_loss_returns_is_the_one_backpropagated(tmp_path, regression_csv):
    # A zero loss has zero gradients, and Adam then leaves every weight where it started.
    result = _run(tmp_path, regression_csv, TrainSpec(epochs=1, batch_size=50), after_loss=ignore_loss)

    initial = build_model(ModelSpec(hidden=[8]), 5, 1).state_dict()
    trained = load_file(f"{result.model_uri}/model.safetensors")
    assert all(torch.equal(initial[name], trained[name]) for name in initial)
    assert result.history[0]["train_loss"] == 0.0


def test_after_backward_sees_each_batch_gradients(tmp_path, regression_csv):
    GRADIENT_NORMS.clear()
    _run(tmp_path, regression_csv, TrainSpec(epochs=2, batch_size=50), after_backward=note_gradients)

    assert len(GRADIENT_NORMS) == 2 * 3
    assert all(norm > 0 for norm in GRADIENT_NORMS)


def test_after_step_can_change_the_learning_rate(tmp_path, regression_csv):
    result = _run(tmp_path, regression_csv, TrainSpec(epochs=2, batch_size=50), after_step=halve_lr)

    # Three steps an epoch, each halving the rate; the history reads it at each epoch end.
    assert [record["lr"] for record in result.history] == [0.01 * 0.5**3, 0.01 * 0.5**6]


def test_after_loss_must_return_a_scalar_loss(tmp_path, regression_csv):
    with pytest.raises(ConfigError, match="after_loss .*per_row_loss.* scalar tensor"):
        _run(tmp_path, regression_csv, TrainSpec(epochs=1, batch_size=50), after_loss=per_row_loss)


def test_a_nan_loss_stops_training_with_advice(tmp_path, regression_csv):
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 1, batch 0 .*Lower the learning rate"):
        _run(tmp_path, regression_csv, TrainSpec(epochs=1, batch_size=50), after_loss=poison_loss)


def test_user_steps_must_be_prefect_tasks(tmp_path, regression_csv):
    def plain_function(loss, model, batch_data):
        return loss

    with pytest.raises(ParameterTypeError, match="after_loss"):
        _run(tmp_path, regression_csv, TrainSpec(epochs=1), after_loss=plain_function)


# -- parameters ---------------------------------------------------------------------


def test_takes_train_flow_parameters_and_keeps_tasks_out_of_the_deployment_form():
    stepwise = parameter_schema(stepwise_train_flow).model_dump()
    fast = parameter_schema(train_flow).model_dump()

    def form(schema: dict) -> dict:  # the field as a form renders it, less its help text
        return {k: v for k, v in schema.items() if k != "description"}

    for name, schema in fast["properties"].items():
        assert form(stepwise["properties"][name]) == form(schema)
    assert stepwise["definitions"] == fast["definitions"]
    assert stepwise["required"] == fast["required"]
    extra = set(stepwise["properties"]) - set(fast["properties"])
    assert extra == {"checkpoint_dir", "resume"}
    assert all(stepwise["properties"][name].get("description") for name in extra)
    assert stepwise_train_flow.fn.__annotations__["after_loss"]  # still typed for Python callers


# -- logs -----------------------------------------------------------------------------


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def finished(self, task_name_prefix: str) -> list[str]:
        return [r.task_run_name for r in self.records
                if r.task_name.startswith(task_name_prefix) and r.getMessage().startswith("Finished in state")]


@pytest.fixture
def task_run_lines():
    logger = logging.getLogger("prefect.task_runs")
    lines, level = _Lines(), logger.level
    logger.addHandler(lines)
    try:
        yield lines
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)


def test_per_batch_cards_do_not_log_their_completion(tmp_path, regression_csv, task_run_lines):
    state = _run(tmp_path, regression_csv, TrainSpec(epochs=2, batch_size=50), after_step=halve_lr,
                 return_state=True)
    assert state.is_completed()

    # Six lines a batch would bury the epoch lines; the task runs still show in the UI.
    for card in ("training_prepare_batch", "training_zero_grad", "training_forward", "training_loss",
                 "training_backward", "training_optimizer_step"):
        assert task_run_lines.finished(card) == []
    # Once-per-run and per-epoch cards, and the user's own steps, still log theirs.
    assert task_run_lines.finished("training_epoch_end") == ["training_epoch_end[e1]", "training_epoch_end[e2]"]
    assert len(task_run_lines.finished("halve_lr")) == 6
    assert task_run_lines.finished("model_define") and task_run_lines.finished("evaluate")
    # Only while the loop runs: a card called after it logs as usual.
    assert not any(isinstance(f, _QuietCompletions) for f in logging.getLogger("prefect.task_runs").filters)


def test_at_debug_level_per_batch_cards_log_their_completion(tmp_path, regression_csv, task_run_lines):
    logging.getLogger("prefect.task_runs").setLevel(logging.DEBUG)
    _run(tmp_path, regression_csv, TrainSpec(epochs=1, batch_size=50))
    assert task_run_lines.finished("training_forward") == [f"training_forward[e1-b{b}]" for b in range(3)]
