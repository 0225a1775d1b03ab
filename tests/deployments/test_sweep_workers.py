"""A sweep whose trials run on a work pool: a real Prefect server on PostgreSQL,
two ``prefect worker start --pool cpu`` workers, the Optuna study in its own
PostgreSQL database (a ``SweepStorage`` block), the models in a shared Torch
Storage block. Every trial is one flow run of ``pool-train/train-cpu``, and its
worker reports each epoch to the trial through the shared study."""

from __future__ import annotations

import json
import textwrap
from contextlib import ExitStack
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.datasets import noisy_linear
from tests.support.prefect_server import PrefectServer, postgres_database, prefect_worker

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS_BLOCK = "sweep-models"
STUDY_BLOCK = "sweep-study"
TRIALS = 8
EPOCHS = 2


@pytest.fixture(scope="module")
def distributed_sweep(prefect_server_postgres: PrefectServer, tmp_path_factory: pytest.TempPathFactory):
    server = prefect_server_postgres
    data = tmp_path_factory.mktemp("sweep-data") / "houses.csv"
    noisy_linear(300, noise=0.3, seed=4).to_csv(data, index=False)
    models = tmp_path_factory.mktemp("sweep-models")
    with postgres_database(prefix="optuna_") as asyncpg_url:
        study_url = asyncpg_url.replace("postgresql+asyncpg://", "postgresql://")  # as a user writes it
        server.python(textwrap.dedent(f"""
            from prefect_torch.blocks import SweepStorage, TorchStorage
            from prefect_torch.deployments import apply_deployments, ensure_work_pools, train_cpu_deployment
            TorchStorage(basepath={str(models)!r}).save({MODELS_BLOCK!r}, overwrite=True)
            SweepStorage(url={study_url!r}).save({STUDY_BLOCK!r}, overwrite=True)
            ensure_work_pools()
            apply_deployments([train_cpu_deployment()], project_dir={str(REPO_ROOT)!r})
        """), timeout=300)
        worker_env = {"PREFECT_TORCH_STORAGE_BLOCK": MODELS_BLOCK, "PREFECT_WORKER_QUERY_SECONDS": "2"}
        with ExitStack() as stack:
            # Two flow runs at a time each: four trials at once need both workers.
            workers = [stack.enter_context(prefect_worker(server, "cpu", limit=2, extra_env=worker_env))
                       for _ in range(2)]
            ran = server.python(textwrap.dedent(f"""
                from prefect_torch.flows.sweep import PrunerSpec, SweepSpec, sweep_flow
                result = sweep_flow(
                    dataset={{"uri": {str(data)!r}, "target": "y"}},
                    space={{"lr": {{"log_uniform": [1e-3, 1e-1]}}, "hidden": {{"choice": [[8], [16]]}}}},
                    sweep=SweepSpec(trials={TRIALS}, parallel=4, seed=5, pruner=PrunerSpec(name="none"),
                                    deployment="pool-train/train-cpu", study_storage_block={STUDY_BLOCK!r},
                                    start_timeout_s=240, timeout_s=400),
                    training={{"epochs": {EPOCHS}, "batch_size": 32}},
                    storage_block={MODELS_BLOCK!r},
                )
                print(result.model_dump_json())
            """), timeout=900)
            result = json.loads(ran.stdout.strip().splitlines()[-1])
            logs = {w.name: Path(w.process.log_path).read_text() for w in workers}
        study = optuna.load_study(study_name=result["study_name"], storage=study_url.replace("postgresql://", "postgresql+psycopg://"))
        yield server, result, study, logs, models


def test_every_trial_completes_on_the_pool(distributed_sweep) -> None:
    _, result, study, _, _ = distributed_sweep
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(TRIALS))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # Each worker reported every epoch to its trial through the shared PostgreSQL study.
    assert all(sorted(t.intermediate_values) == list(range(1, EPOCHS + 1)) for t in trials)
    assert all(t.value == t.intermediate_values[EPOCHS] for t in trials)
    assert result["best"]["number"] == study.best_trial.number


def test_each_trial_is_exactly_one_flow_run_and_both_workers_took_some(distributed_sweep) -> None:
    server, result, study, logs, _ = distributed_sweep
    runs = server.request("POST", "/flow_runs/filter", json={
        "flow_runs": {"name": {"like_": f"{result['study_name']}[trial"}}, "limit": 200})
    names = sorted(run["name"] for run in runs)
    assert names == sorted(f"{result['study_name']}[trial {n}]" for n in range(TRIALS))
    assert all(run["state_type"] == "COMPLETED" and run["work_pool_name"] == "cpu" for run in runs)
    # Which worker ran which trial: each worker logs the runs it submitted to infrastructure.
    took = {worker: {run["name"] for run in runs if f"Flow run '{run['name']}' submitted to infrastructure" in log}
            for worker, log in logs.items()}
    first, second = took.values()
    assert first | second == set(names) and not first & second, took
    assert first and second, {worker: len(ran) for worker, ran in took.items()}
    # The trial table links every trial to its flow run.
    assert {t["run_url"].rsplit("/", 1)[-1] for t in result["trials"]} == {run["id"] for run in runs}


def test_the_best_model_is_in_the_shared_storage(distributed_sweep) -> None:
    _, result, study, _, models = distributed_sweep
    best = result["best"]
    assert best["model_uri"].startswith(str(models))
    assert Path(best["model_uri"], "model.safetensors").is_file()
    assert best["metrics"] == study.best_trial.user_attrs["test_metrics"]
    assert set(best["metrics"]) == {"mse", "mae", "rmse", "r2"}
