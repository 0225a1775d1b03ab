"""Sweeps in this process: an Optuna study whose trials are Train card runs on one
shared split, two at a time, with a seeded sampler and the median pruner; trials
that fail; a sweep killed mid-way and run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.exc import IntegrityError, OperationalError

from prefect_torch.blocks import ModelRegistry
from prefect_torch.blocks.sweeps import default_sweep_database
from prefect_torch.engine.loop import TrainSpec
from prefect_torch.engine.models import ModelSpec
from prefect_torch.errors import ConfigError
from prefect_torch.flows.params import DatasetSpec
from prefect_torch.flows.sweep import PrunerSpec, SweepSpec, sweep_flow
from tests.flows import harness

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAINING = TrainSpec(epochs=3, batch_size=32, device="cpu")
SPACE = {"lr": {"log_uniform": [1e-5, 1e-1]}, "hidden": {"choice": [[8], [16, 16]]}}


def load_study(name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=default_sweep_database())


@pytest.fixture(scope="module")
def sweep(regression_csv):
    """8 trials, 2 at a time, seeded TPE; the median pruner may stop a trial after its first epoch."""
    return sweep_flow(
        dataset=DatasetSpec(uri=regression_csv, target="y"),
        space=SPACE,
        sweep=SweepSpec(trials=8, parallel=2, seed=3, pruner=PrunerSpec(startup_trials=1)),
        model=ModelSpec(hidden=[8]),
        training=TRAINING,
        model_name="sweep-best",
    )


def test_every_trial_is_recorded_in_the_study(sweep):
    study = load_study(sweep.study_name)
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(8)) == [t.number for t in sweep.trials]
    assert sweep.run_here == list(range(8))
    for recorded, summary in zip(trials, sweep.trials):
        assert summary.state == recorded.state.name in ("COMPLETE", "PRUNED")
        assert summary.params["lr"] == recorded.params["lr"]
        assert summary.params["hidden"] == json.loads(recorded.params["hidden"])
        assert summary.run_url and "/runs/task-run/" in summary.run_url


def test_the_best_trial_is_the_studys(sweep):
    best = load_study(sweep.study_name).best_trial
    assert sweep.best.number == best.number
    assert sweep.best.value == best.value
    assert sweep.best.params == {"lr": best.params["lr"], "hidden": json.loads(best.params["hidden"])}
    completed = [t.value for t in sweep.trials if t.state == "COMPLETE"]
    assert sweep.best.value == min(completed)


def test_pruned_trials_stopped_before_their_last_epoch(sweep):
    study = load_study(sweep.study_name)
    pruned = [t for t in study.get_trials() if t.state == TrialState.PRUNED]
    assert pruned, "the seeded sweep prunes its worst trials"
    for trial in pruned:
        assert max(trial.intermediate_values) < TRAINING.epochs
        assert trial.user_attrs["pruned_at_epoch"] == max(trial.intermediate_values)
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        assert sorted(trial.intermediate_values) == [1, 2, 3]
        assert trial.value == trial.intermediate_values[3]  # the metric of the weights it kept


def test_the_best_model_is_saved_measured_and_registered(sweep):
    assert Path(sweep.best.model_uri, "model.safetensors").is_file()
    assert set(sweep.best.metrics) == {"mse", "mae", "rmse", "r2"}
    registry = ModelRegistry()
    version = registry.get_version("sweep-best", sweep.best.registered_version)
    assert version.metrics == pytest.approx(sweep.best.metrics)
    assert version.specs["sweep"] == {"study": sweep.study_name, "trial": sweep.best.number}
    assert version.specs["optimizer"]["lr"] == sweep.best.params["lr"]
    assert version.specs["model"]["hidden"] == sweep.best.params["hidden"]
    # The first registered model has no champion to beat: the promotion rule makes it one.
    assert sweep.best.promoted and registry.current_alias("sweep-best").version == version.version


def test_the_sweep_publishes_a_table_of_trials_and_a_summary(sweep):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    key = "sweep-" + sweep.study_name
    with get_client(sync_client=True) as client:
        table = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key + "-trials"])))
        summary = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key + "-summary"])))
    rows = json.loads(table[0].data) if isinstance(table[0].data, str) else table[0].data
    assert [row["trial"] for row in rows] == list(range(8))
    assert {row["state"] for row in rows} == {t.state for t in sweep.trials}
    assert "data:image/svg+xml;base64," in summary[0].data
    assert f"Best trial **{sweep.best.number}**" in summary[0].data


def test_rerunning_a_finished_sweep_trains_nothing_new(sweep, regression_csv):
    again = sweep_flow(
        dataset=DatasetSpec(uri=regression_csv, target="y"), space=SPACE,
        sweep=SweepSpec(trials=8, parallel=2, seed=3, pruner=PrunerSpec(startup_trials=1)),
        model=ModelSpec(hidden=[8]), training=TRAINING,
    )
    assert again.study_name == sweep.study_name and again.run_here == []
    assert again.best.number == sweep.best.number and again.best.metrics == pytest.approx(sweep.best.metrics)


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(regression_csv):
    # bce cannot train a regression target: those trials raise, the mse ones complete.
    result = sweep_flow(
        dataset=DatasetSpec(uri=regression_csv, target="y"),
        space={"loss": {"choice": ["mse", "bce"]}, "lr": {"log_uniform": [1e-3, 1e-1]}},
        sweep=SweepSpec(trials=4, parallel=2, seed=1, pruner=PrunerSpec(name="none")),
        model=ModelSpec(hidden=[8]), training=TrainSpec(epochs=1, device="cpu"),
    )
    states = {t.number: t.state for t in result.trials}
    assert len(states) == 4
    for trial in result.trials:
        assert (trial.state == "FAIL") == (trial.params["loss"] == "bce")
        if trial.state == "FAIL":
            assert "bce" in trial.error
    assert "FAIL" in states.values() and "COMPLETE" in states.values()
    assert result.best.params["loss"] == "mse"


def test_a_sweep_whose_every_trial_fails_fails_with_the_first_error(regression_csv):
    with pytest.raises(ConfigError, match="bce"):
        sweep_flow(
            dataset=DatasetSpec(uri=regression_csv, target="y"),
            space={"loss": {"choice": ["bce"]}, "lr": {"log_uniform": [1e-3, 1e-1]}},
            sweep=SweepSpec(trials=2, parallel=2, pruner=PrunerSpec(name="none")),
            model=ModelSpec(hidden=[8]), training=TrainSpec(epochs=1, device="cpu"),
        )


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"lrr": {"log_uniform": [1e-4, 1e-1]}}, "Unknown search space parameter 'lrr'"),
        ({"hidden": {"choice": []}}, "empty choice"),
        ({"lr": {"log_uniform": [0.0, 0.1]}}, "both bounds above zero"),
        ({"dropout": {"uniform": [0.0, 1.5]}}, "which model refuses"),
    ],
)
def test_a_bad_space_is_refused_before_any_trial(regression_csv, space, message):
    study_names = optuna.get_all_study_names(default_sweep_database())
    with pytest.raises(ConfigError, match=message):
        sweep_flow(dataset=DatasetSpec(uri=regression_csv, target="y"), space=space,
                   sweep=SweepSpec(trials=2), training=TrainSpec(epochs=1, device="cpu"))
    assert optuna.get_all_study_names(default_sweep_database()) == study_names


# -- a killed sweep, run again ------------------------------------------------------------


# Enough trials that the ones left after the kill cannot all finish between the poll
# that sees two done and the SIGKILL, however fast the machine.
RESUME_TRIALS = 8


def _cli(csv: str, space: Path, home: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": harness.api_url(), "PREFECT_HOME": str(home),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "prefect_torch.cli", "sweep", csv, "--target", "y", "--space", str(space),
         "--trials", str(RESUME_TRIALS), "--parallel", "1", "--epochs", "2", "--hidden", "8", "--device", "cpu",
         "--pruner", "none", "--heartbeat-s", "1", "--json", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )


def _finished(storage: str) -> dict[int, float]:
    try:
        names = optuna.get_all_study_names(storage) if Path(storage.removeprefix("sqlite:///")).exists() else []
    except (IntegrityError, OperationalError):  # the sweep is setting up the new database this very moment
        return {}
    if not names:
        return {}
    study = optuna.load_study(study_name=names[0], storage=storage)
    return {t.number: t.value for t in study.get_trials(states=(TrialState.COMPLETE,))}


def test_a_killed_sweep_continues_its_study_when_run_again(regression_csv, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {log_uniform: [1.0e-4, 1.0e-1]}\nbatch_size: {choice: [16, 32, 64]}\n")
    home = tmp_path / "home"
    storage = f"sqlite:///{home / 'prefect-torch' / 'sweeps.db'}"
    first = _cli(regression_csv, space, home)
    deadline = time.monotonic() + 240
    while len(_finished(storage)) < 2:
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the first run finished no two trials in time"
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)  # no cleanup: the running trial is left RUNNING
    first.wait()
    before = _finished(storage)
    assert 2 <= len(before) < RESUME_TRIALS

    second = _cli(regression_csv, space, home)
    out, err = second.communicate(timeout=400)
    assert second.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    after = {t["number"]: t["value"] for t in summary["trials"] if t["state"] == "COMPLETE"}
    # The finished trials are kept as they were, and not trained again.
    assert {n: after[n] for n in before} == before
    assert not set(summary["run_here"]) & set(before)
    assert len(summary["run_here"]) == RESUME_TRIALS - len(before)
    assert len(after) == RESUME_TRIALS
    assert summary["best"]["value"] == min(after.values())
    assert summary["best"]["params"] == next(t["params"] for t in summary["trials"] if t["number"] == summary["best"]["number"])
