"""The retrain deployment's build step: its parameters from the environment, and a paused
schedule that says which variables to set when one is missing."""

from __future__ import annotations

import pytest
import yaml

from prefect_torch.deployments import RETRAIN_VARIABLES, retrain_settings
from tests.deployments.conftest import REPO_ROOT

VARIABLES = {"PREFECT_TORCH_RETRAIN_DATA": "s3://bucket/housing/", "PREFECT_TORCH_RETRAIN_TARGET": "price",
             "PREFECT_TORCH_MODEL_NAME": "housing"}


def test_with_every_variable_the_schedule_runs(monkeypatch):
    for name, value in VARIABLES.items():
        monkeypatch.setenv(name, value)
    settings = retrain_settings()
    assert settings["schedule_active"] is True
    assert (settings["data_uri"], settings["target"], settings["model_name"]) == ("s3://bucket/housing/", "price", "housing")
    assert "paused" not in settings["description"]


@pytest.mark.parametrize("unset", [list(VARIABLES), ["PREFECT_TORCH_MODEL_NAME"]])
def test_a_missing_variable_pauses_the_schedule_and_names_it(monkeypatch, capsys, unset):
    for name, value in VARIABLES.items():
        monkeypatch.setenv(name, value)
    for name in unset:
        monkeypatch.delenv(name)
    settings = retrain_settings()
    assert settings["schedule_active"] is False
    for name in VARIABLES:
        assert (name in settings["description"]) == (name in unset)
    assert "Schedule paused" in settings["description"] and "prefect deploy --all" in settings["description"]
    assert "Schedule paused" in capsys.readouterr().err


def test_prefect_yaml_takes_the_retrain_parameters_and_schedule_from_the_step():
    retrain = next(d for d in yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
                   if d["name"] == "retrain")
    assert {"prefect_torch.deployments.retrain_settings": {"id": "retrain"}} in retrain["build"]
    assert retrain["schedules"][0]["active"] == "{{ retrain.schedule_active }}"
    assert retrain["parameters"]["data"] == {"uri": "{{ retrain.data_uri }}", "target": "{{ retrain.target }}"}
    assert set(RETRAIN_VARIABLES) == set(VARIABLES)
