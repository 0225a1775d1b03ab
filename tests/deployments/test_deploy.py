"""prefect.yaml applied with ``prefect deploy --all`` to a real server: the three
deployments, the nightly schedule and the runs the scheduler creates, the
parameter forms, server-side parameter validation, and the same deployments
made from Python."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import httpx
import pytest
import yaml

from prefect_torch.deployments import (
    NIGHTLY_CRON,
    retrain_deployment,
    train_cpu_deployment,
    train_gpu_deployment,
)
from tests.deployments.conftest import REPO_ROOT, RETRAIN_MODEL, Project

pytestmark = [pytest.mark.server, pytest.mark.s3, pytest.mark.slow]

DEPLOYMENTS = ("pool-train/train-cpu", "pool-train/train-gpu", "retrain/retrain")
COMPARED = ("entrypoint", "work_pool_name", "tags", "parameters", "pull_steps", "enforce_parameter_schema",
            "description")


def schedules(deployment: dict) -> list[tuple[str, str, bool]]:
    return [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in deployment["schedules"]]


def test_prefect_yaml_declares_the_three_deployments(project: Project) -> None:
    cpu, gpu, retrain = (project.deployment(name) for name in DEPLOYMENTS)
    pull = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO_ROOT)}}]
    assert (cpu["work_pool_name"], gpu["work_pool_name"], retrain["work_pool_name"]) == ("cpu", "cuda", "cpu")
    assert cpu["entrypoint"] == gpu["entrypoint"] == "prefect_torch.flows.routing.pool_train_flow"
    assert retrain["entrypoint"] == "prefect_torch.flows.retrain.retrain_flow"
    assert "gpu" in gpu["tags"] and "gpu" not in cpu["tags"]
    assert gpu["parameters"] == {"training": {"device": "cuda"}}
    assert cpu["parameters"] == {"training": {"device": "cpu"}}
    assert retrain["parameters"] == {
        "model_name": RETRAIN_MODEL, "data": {"uri": str(project.data_dir), "target": "y"},
    }
    assert all(d["pull_steps"] == pull and d["enforce_parameter_schema"] for d in (cpu, gpu, retrain))
    assert schedules(retrain) == [(NIGHTLY_CRON, "UTC", True)] and schedules(cpu) == schedules(gpu) == []


# Prefect 3.8's scheduler inserts runs with a key ("state") that SQLAlchemy 2.1
# resolves to the FlowRun.state hybrid property, and fails on every loop; hence
# pyproject's sqlalchemy<2.1. This is what the server logs when that happens.
SCHEDULER_ERROR = "Can't evaluate bulk DML statement"


def test_the_scheduler_creates_the_nightly_runs(project: Project) -> None:
    retrain = project.deployment("retrain/retrain")
    deadline = time.monotonic() + 90
    while True:
        assert SCHEDULER_ERROR not in project.server.process.log_tail(400), "the server's scheduler failed"
        runs = project.server.request("POST", "/flow_runs/filter", json={
            "deployments": {"id": {"any_": [retrain["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
        })
        if runs or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert runs, "the scheduler created no upcoming retrain runs within 90 s"
    starts = sorted(datetime.fromisoformat(run["expected_start_time"]) for run in runs)
    assert all(s > datetime.now(timezone.utc) for s in starts)
    assert all((s.astimezone(timezone.utc).hour, s.minute, s.second) == (2, 0, 0) for s in starts)
    if len(starts) > 1:
        assert (starts[1] - starts[0]).total_seconds() == 24 * 3600
    assert all(run["parameters"]["model_name"] == RETRAIN_MODEL for run in runs)


def test_every_parameter_is_a_described_form_field(project: Project) -> None:
    for name in DEPLOYMENTS:
        schema = project.deployment(name)["parameter_openapi_schema"]
        required = set(schema.get("required", []))
        for field, spec in schema["properties"].items():
            assert spec.get("description"), f"{name}: parameter {field} has no description"
            assert "default" in spec or field in required, f"{name}: {field}"
        assert required <= {"dataset", "data"}
        for model, definition in schema["definitions"].items():
            for field, spec in definition["properties"].items():
                assert spec.get("description"), f"{name}: {model}.{field} has no description"


def test_the_server_rejects_invalid_parameters_naming_the_field(project: Project) -> None:
    cpu = project.deployment("pool-train/train-cpu")
    dataset = {"uri": "/data/x.csv", "target": "y"}
    for parameters, field in [
        ({"dataset": dataset, "training": {"epochs": 0}}, "epochs"),
        ({"dataset": dataset, "training": {"device": "tpu"}}, "device"),
        ({"dataset": {**dataset, "val_fraction": "lots"}}, "val_fraction"),
        ({"dataset": dataset, "optimizer": {"nmae": "adam"}}, "nmae"),
        ({"training": {"epochs": 3}}, "dataset"),
    ]:
        with pytest.raises(httpx.HTTPStatusError) as refused:
            project.server.request("POST", f"/deployments/{cpu['id']}/create_flow_run", json={"parameters": parameters})
        assert refused.value.response.status_code == 409
        assert field in refused.value.response.json()["detail"], refused.value.response.text

    cli = project.server.prefect(
        "deployment", "run", "pool-train/train-cpu", "--params",
        json.dumps({"dataset": dataset, "training": {"epochs": -2}}), check=False,
    )
    assert cli.returncode != 0
    assert "epochs" in cli.stdout + cli.stderr


def test_python_helpers_make_the_same_deployments(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.utilities.templating import apply_values

    from prefect_torch.deployments import retrain_settings

    for name, value in {"PREFECT_TORCH_RETRAIN_DATA": str(project.data_dir), "PREFECT_TORCH_RETRAIN_TARGET": "y",
                        "PREFECT_TORCH_MODEL_NAME": RETRAIN_MODEL}.items():
        monkeypatch.setenv(name, value)
    with open(REPO_ROOT / "prefect.yaml") as handle:
        # As `prefect deploy` renders them with every variable set: the retrain step's outputs filled in.
        declared = {d["name"]: apply_values(d, {"retrain": retrain_settings()})
                    for d in yaml.safe_load(handle)["deployments"]}
    specs = [
        train_cpu_deployment(),
        train_gpu_deployment(),
        retrain_deployment(data_uri=str(project.data_dir), target="y", model_name=RETRAIN_MODEL),
    ]
    for spec in specs:  # the helpers and prefect.yaml say the same thing
        entry = declared[spec["name"]]
        assert (entry["entrypoint"], entry["work_pool"]["name"], entry["tags"], entry["description"]) == (
            spec["entrypoint"], spec["work_pool"], spec["tags"], spec["description"])
        assert [(s["cron"], s["timezone"]) for s in entry.get("schedules", [])] == (
            [(spec["cron"], spec["timezone"])] if spec["cron"] else [])

    before = {name: project.deployment(name) for name in DEPLOYMENTS}
    applied = project.run_python(
        f"""
        import json
        from prefect_torch.deployments import (
            apply_deployments, retrain_deployment, train_cpu_deployment, train_gpu_deployment)
        print(json.dumps(apply_deployments([
            train_cpu_deployment(), train_gpu_deployment(),
            retrain_deployment(data_uri={str(project.data_dir)!r}, target="y", model_name={RETRAIN_MODEL!r}),
        ], project_dir={str(REPO_ROOT)!r})))
        """
    )
    assert applied.returncode == 0, applied.stderr
    result = json.loads(applied.stdout.strip().splitlines()[-1])
    assert [a["full_name"] for a in result] == list(DEPLOYMENTS)
    for name in DEPLOYMENTS:
        after = project.deployment(name)
        assert after["id"] == before[name]["id"]
        for field in COMPARED:
            assert after[field] == before[name][field], (name, field)
        assert schedules(after) == schedules(before[name])
        assert after["parameter_openapi_schema"] == before[name]["parameter_openapi_schema"]
