"""The Train card's report against a real Prefect API: progress while it runs, the
history, loss curves and summary at the end, and the same after a failure."""

from __future__ import annotations

import pytest
import torch
from prefect import flow, get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

from prefect_torch.engine.loop import Callback, Trainer, TrainSpec
from prefect_torch.engine.models import ModelSpec, build_model
from prefect_torch.engine.optim import OptimizerSpec, build_optimizer
from prefect_torch.engine.split import SplitSpec, split_table
from prefect_torch.errors import TrainingError
from prefect_torch.reporting import TrainingReport
from prefect_torch.reporting.publish import Publisher, never_fails
from prefect_torch.tasks import data_split, model_define, train
from tests.datasets import noisy_linear
from tests.reporting.artifacts import run_artifacts, table_data

SPLIT = SplitSpec(target="y", val_fraction=0.15, test_fraction=0.15)


def make_trainer(callbacks, epochs=3, progress_every=None):
    splits = split_table(noisy_linear(200, features=3), SPLIT)  # 140 train rows: 5 batches of 32
    spec = ModelSpec(hidden=[8])
    model = build_model(spec, splits.info.n_features, splits.info.n_outputs)
    optimizer = OptimizerSpec(lr=0.01)
    training = TrainSpec(epochs=epochs, batch_size=32, device="cpu", progress_every=progress_every)
    report = TrainingReport(spec, optimizer, min_interval_s=0.0)
    trainer = Trainer(model, build_optimizer(optimizer, model), splits, training, [report, *callbacks])
    return trainer, report


class ReadProgress(Callback):
    """Reads the progress artifact back from the API after every hook: what the UI would show."""

    def __init__(self):
        self.report: TrainingReport | None = None
        self.seen: list[tuple[str, int, float, str]] = []

    def _read(self, hook: str, trainer: Trainer) -> None:
        with get_client(sync_client=True) as client:
            (artifact,) = client.read_artifacts(
                artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[self.report.progress_id]))
            )
        self.seen.append((hook, trainer.state.step, float(artifact.data), artifact.description))

    def on_step_end(self, trainer):
        self._read("step", trainer)

    def on_epoch_end(self, trainer, record):
        self._read("epoch", trainer)


@pytest.mark.usefixtures("prefect_api")
def test_progress_is_updated_every_epoch_and_every_n_steps():
    probe = ReadProgress()

    @flow
    def watched():
        trainer, report = make_trainer([probe], epochs=3, progress_every=2)
        probe.report = report
        with report.running(trainer):
            trainer.fit()
        return report.progress_id

    progress_id = watched()
    total = 15  # 3 epochs x 5 steps
    epochs = [(step, value, text) for hook, step, value, text in probe.seen if hook == "epoch"]
    assert [step for step, _, _ in epochs] == [5, 10, 15]
    assert [value for _, value, _ in epochs] == pytest.approx([100 * 5 / total, 100 * 10 / total, 100.0])
    assert epochs[0][2].startswith("epoch 1/3 · step 5/15 · train_loss ")
    assert "val_loss" in epochs[0][2] and "val_r2" in epochs[0][2]

    # Mid-epoch, every 2nd optimizer step; an epoch's last step is left to the epoch update.
    steps = [(step, value, text) for hook, step, value, text in probe.seen if hook == "step"]
    updated = [(step, value) for step, value, text in steps if text.startswith(f"epoch {(step - 1) // 5 + 1}/3 · step {step}/")]
    assert [step for step, _ in updated] == [2, 4, 6, 8, 12, 14]
    assert all(value == pytest.approx(100 * step / total) for step, value in updated)

    with get_client(sync_client=True) as client:
        (final,) = client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[progress_id])))
    assert float(final.data) == 100.0 and final.description.startswith("completed 3 epochs · train_loss")


class PoisonWeights(Callback):
    """Sets every weight to NaN after epoch ``after``: the next epoch's loss is NaN."""

    def __init__(self, after: int):
        self.after = after

    def on_epoch_end(self, trainer, record):
        if record.epoch == self.after:
            with torch.no_grad():
                for parameter in trainer.model.parameters():
                    parameter.fill_(float("nan"))


@flow(name="diverging")
def diverging(frame):
    splits = data_split(frame, SPLIT)
    handle = model_define(ModelSpec(hidden=[8]), splits)
    return train(splits, handle, OptimizerSpec(lr=0.01), TrainSpec(epochs=5, batch_size=32, device="cpu"),
                 callbacks=[PoisonWeights(after=2)])


@pytest.mark.usefixtures("prefect_api")
def test_a_failed_run_keeps_its_history_and_names_the_error_in_the_summary():
    state = diverging(noisy_linear(200, features=3), return_state=True)
    assert state.is_failed()
    with pytest.raises(TrainingError):
        state.result()
    artifacts = run_artifacts(state.state_details.flow_run_id, scope="diverging-mlp-8")

    history = table_data(artifacts["train-history"])
    assert [row["epoch"] for row in history] == [1, 2]

    summary = artifacts["train-summary"].data
    assert "**Failed**: stopped in epoch 3 of 5, after 10 optimizer steps" in summary
    assert "> TrainingError: The training loss became nan at epoch 3, batch 0" in summary
    assert "Lower the learning rate" in summary  # the fix travels with the error
    assert "- **Epochs:** 2 of 5 (10 optimizer steps)" in summary
    assert "## Final epoch (2)" in summary

    assert "data:image/svg+xml;base64," in artifacts["train-loss-curves"].data
    progress = artifacts["train-progress"]
    assert float(progress.data) == pytest.approx(100 * 10 / 25)
    assert progress.description == "failed in epoch 3 of 5: TrainingError"


def test_outside_a_run_training_works_and_publishes_nothing():
    trainer, report = make_trainer([], epochs=2)
    with report.running(trainer):  # filterwarnings=error: a run-less artifact would warn
        trainer.fit()
    assert report.progress_id is None
    assert report.summary is not None and report.summary.status == "completed"
    assert report.summary.epochs == "2 of 2"


def test_a_publishing_failure_is_a_warning_not_an_error(caplog):
    publisher = Publisher()
    publisher.enabled = True

    def unreachable(**kwargs):
        raise ConnectionError("connection refused")

    with caplog.at_level("WARNING", logger="prefect_torch.reporting"):
        assert publisher._call("table", "train-history", unreachable, table=[]) is None
    assert "Could not publish the table artifact 'train-history' (ConnectionError: connection refused)" in caplog.text


def test_a_bug_in_a_report_is_a_warning_not_a_failed_run(caplog):
    with caplog.at_level("WARNING", logger="prefect_torch.reporting"):
        with never_fails("training report"):
            raise KeyError("val_metrics")
    assert "Could not build the training report (KeyError: 'val_metrics')" in caplog.text
