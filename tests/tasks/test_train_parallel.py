"""The Train card with processes=2: workers through the elastic launcher, one card result."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from prefect import flow, get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.runtime import flow_run

from prefect_torch import tasks
from prefect_torch.engine.checkpoint import checkpoint_key, read_checkpoint
from prefect_torch.engine.handles import ModelHandle
from prefect_torch.engine.loop import TrainSpec
from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec
from prefect_torch.engine.split import SplitSpec, split_table
from prefect_torch.tasks._common import default_checkpoints_root
from tests.datasets import separable_classes

pytestmark = pytest.mark.usefixtures("prefect_harness")

OPTIMIZER = OptimizerSpec(lr=0.02)
TRAINING = TrainSpec(epochs=3, batch_size=8, accumulate=2, clip=1.0, device="cpu", processes=2, seed=1)


@pytest.fixture(scope="module")
def parallel_card():
    """One flow: define a model, train it on 2 processes, evaluate the card's result."""
    splits = split_table(separable_classes(300, classes=3), SplitSpec(target="label"))

    @flow
    def train_on_two_processes():
        model = tasks.model_define(ModelSpec(hidden=[16]), splits)
        initial = model.key
        output = tasks.train(splits, model, OPTIMIZER, TRAINING)
        metrics = tasks.evaluate(output.model, splits, "test")
        return flow_run.get_id(), initial, output, metrics

    return (*train_on_two_processes(), splits)


def test_the_card_returns_the_usual_trained_model_handle(parallel_card):
    _, _, output, metrics, splits = parallel_card
    assert isinstance(output.model, ModelHandle) and output.device == "cpu" and output.loss == "cross_entropy"
    assert [h["epoch"] for h in output.history] == [1, 2, 3] and output.stop_reason == "completed 3 epochs"
    batches = -(-len(splits.train) // 16)  # global batch: 8 rows on each of 2 processes
    assert output.steps == 3 * -(-batches // 2)  # 2 batches a step
    assert metrics["accuracy"] >= 0.9  # the trained weights came back into the card's model


def test_rank_zero_alone_checkpointed_and_published_one_set_of_artifacts(parallel_card):
    run_id, initial_key, output, _, _ = parallel_card
    folder = Path(default_checkpoints_root()) / checkpoint_key(initial_key, OPTIMIZER, TRAINING)
    assert read_checkpoint(str(folder)).loop_state.step == output.steps
    assert len(list(folder.iterdir())) == 4  # the newest two checkpoints, each tensors + JSON
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    # Keys are scoped (<flow>-<dataset>-<model>-<kind>): count each kind of training artifact.
    kinds = ("train-history", "train-summary", "train-loss-curves")
    keyed = Counter(kind for a in artifacts for kind in kinds if a.key is not None and a.key.endswith(kind))
    assert set(keyed) == set(kinds)
    assert all(count == 1 for count in keyed.values()), keyed
    history = next(a for a in artifacts if a.key is not None and a.key.endswith("train-history"))
    assert history.data.count('"epoch"') == 3


def test_the_step_wise_flow_refuses_several_processes(tmp_path):
    from prefect_torch.errors import ConfigError
    from prefect_torch.flows import DatasetSpec, stepwise_train_flow

    with pytest.raises(ConfigError, match="processes=1 and nodes=1, or use train_flow"):
        stepwise_train_flow(DatasetSpec(uri=str(tmp_path / "unused.csv"), target="y"),
                            training=TrainSpec(processes=2))


def test_weights_match_one_process_with_the_global_batch(parallel_card):
    """The card's 2-process weights against the same card on 1 process with batch 16."""
    _, _, output, _, splits = parallel_card

    @flow
    def train_on_one_process():
        model = tasks.model_define(ModelSpec(hidden=[16]), splits)
        return tasks.train(splits, model, OPTIMIZER, TRAINING.model_copy(update={"processes": 1, "batch_size": 16}))

    single = train_on_one_process()
    for (name, a), b in zip(single.model.model.state_dict().items(), output.model.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
