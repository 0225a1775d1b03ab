"""A killed step-wise run resumes from its last checkpoint and ends as if never stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from prefect_torch.engine.loop import TrainSpec
from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec
from prefect_torch.flows import DatasetSpec, stepwise_train_flow
from tests.flows import harness
from tests.flows.killable_run import MODEL, OPTIMIZER, TRAINING

ROOT = Path(__file__).resolve().parents[2]


def run_killable(csv: str, output: Path, checkpoints: Path, kill_at_step: int) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PREFECT_API_URL": harness.api_url(),
        "PREFECT_HOME": harness.home(),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "tests/flows/killable_run.py"), csv, str(output), str(checkpoints), str(kill_at_step)],
        env=env, capture_output=True, text=True, timeout=300,
    )


def weights(model_uri) -> dict[str, torch.Tensor]:
    return load_file(f"{model_uri}/model.safetensors")


def test_a_run_killed_mid_epoch_resumes_and_ends_bitwise_equal(tmp_path, regression_csv):
    checkpoints = tmp_path / "ckpt"
    killed = run_killable(regression_csv, tmp_path / "model", checkpoints, kill_at_step=7)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # The newest checkpoint is the one after step 6: epoch 2, before its batch 2.
    (lineage,) = checkpoints.iterdir()
    assert sorted(p.name for p in lineage.glob("*.json"))[-1] == "ckpt-0000000006-e000001-b000002.json"

    resumed = run_killable(regression_csv, tmp_path / "model", checkpoints, kill_at_step=0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "epoch 2, batch 2, 6 steps taken" in resumed.stderr
    assert "steps=12" in resumed.stdout

    uninterrupted = stepwise_train_flow(
        DatasetSpec(uri=regression_csv, target="y"), MODEL, OPTIMIZER, TRAINING,
        output=str(tmp_path / "reference"), checkpoint_dir=str(tmp_path / "reference-ckpt"),
    )
    expected, got = weights(uninterrupted.model_uri), weights(tmp_path / "model")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_a_finished_run_is_not_trained_again_unless_asked(tmp_path, regression_csv):
    def run(**kwargs):
        return stepwise_train_flow(
            DatasetSpec(uri=regression_csv, target="y"), ModelSpec(hidden=[8]), OptimizerSpec(lr=0.01),
            TrainSpec(epochs=2, batch_size=70), output=str(tmp_path / "model"),
            checkpoint_dir=str(tmp_path / "ckpt"), return_state=True, **kwargs,
        )

    def forward_passes(state, task_runs: int) -> int:
        runs = harness.task_runs(state.state_details.flow_run_id, at_least=task_runs)
        return sum(run.name.startswith("training_forward[") for run in runs)

    first = run()
    again = run()
    fresh = run(resume=False)

    # 6 setup and closing tasks; 2 epochs of 2 batches of 6 cards, a validation and a checkpoint.
    trained = 6 + 2 * (2 * 6 + 2)
    assert forward_passes(first, trained) == 4
    assert forward_passes(again, 6) == 0  # resumed from the final checkpoint: nothing left to do
    assert forward_passes(fresh, trained) == 4
    results = [state.result() for state in (first, again, fresh)]
    assert results[0].history == results[1].history
    assert results[0].model_uri == results[1].model_uri == results[2].model_uri
    assert results[0].steps == results[1].steps == results[2].steps == 4
