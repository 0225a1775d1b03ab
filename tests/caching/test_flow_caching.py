"""Re-runs complete from cache across processes; a change recomputes exactly what is downstream."""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from prefect_torch import load_model
from tests.caching.run_train_flow import card_states
from tests.datasets import noisy_linear

COARSE = {"data_load", "data_split", "model_define", "train", "evaluate"}
REPO = Path(__file__).resolve().parents[2]


def params(path, **training):
    return {
        "dataset": {"uri": str(path), "target": "y"},
        "model": {"hidden": [16]},
        "optimizer": {"lr": 0.01},
        "training": {"epochs": 2, "device": "cpu", **training},
    }


def run_here(request: dict) -> dict:
    from prefect_torch.flows import train_flow

    state = train_flow(**request, return_state=True)
    result = state.result()
    return {"cards": card_states(state.state_details.flow_run_id), "metrics": result.metrics,
            "model_uri": result.model_uri}


def run_in_fresh_process(request: dict, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "tests.caching.run_train_flow", json.dumps(request)],
                         capture_output=True, text=True, env={**os.environ, **env}, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def cached(cards: dict) -> set[str]:
    return {name for name, state in cards.items() if state == "Cached"}


def assert_same_weights(uri_a, uri_b):
    a, b = load_model(uri_a).model.state_dict(), load_model(uri_b).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def data(tmp_path, request):
    # Data of its own per test: results persist in the worker's Prefect home, and a
    # test elsewhere training the same rows with the same settings would be a cache hit.
    path = tmp_path / "data.csv"
    noisy_linear(300, seed=zlib.crc32(request.node.nodeid.encode())).to_csv(path, index=False)
    return path


@pytest.mark.usefixtures("prefect_harness")
class TestSameServer:
    def test_a_rerun_in_a_fresh_process_runs_no_card_again(self, data):
        from prefect.settings import PREFECT_API_URL, PREFECT_HOME

        first = run_here(params(data))
        assert cached(first["cards"]) == set()
        env = {"PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(PREFECT_HOME.value())}
        second = run_in_fresh_process(params(data), env)
        assert cached(second["cards"]) == COARSE
        assert second["metrics"] == first["metrics"]
        assert second["model_uri"] == first["model_uri"]

    def test_a_training_change_recomputes_only_train_and_evaluate(self, data):
        run_here(params(data))
        changed = run_here(params(data, epochs=3))
        assert cached(changed["cards"]) == {"data_load", "data_split", "model_define"}

    def test_a_model_change_recomputes_from_model_define(self, data):
        run_here(params(data))
        request = params(data)
        request["model"] = {"hidden": [8]}
        assert cached(run_here(request)["cards"]) == {"data_load", "data_split"}

    def test_changed_data_bytes_recompute_everything(self, data):
        run_here(params(data))
        data.write_text(data.read_text().replace("\n", "\n", 1) + "0.1,0.2,0.3,0.4,0.5,0.6,1.0\n")
        assert cached(run_here(params(data))["cards"]) == set()

    def test_a_corrupted_cached_result_is_detected_and_recomputed(self, data, tmp_path):
        from prefect.settings import PREFECT_HOME, temporary_settings

        # A Prefect home (so a storage) of its own: in the worker's shared one, other
        # processes can write train-* records while this test looks for its own.
        with temporary_settings({PREFECT_HOME: tmp_path / "home"}):
            first = run_here(params(data, seed=11))
            (stored,) = (tmp_path / "home" / "prefect-torch" / "results").glob("train-*")
            raw = bytearray(stored.read_bytes())
            middle = len(raw) // 2
            raw[middle] = ord("A") if raw[middle] != ord("A") else ord("B")  # still base64, still well-formed JSON
            stored.write_bytes(bytes(raw))
            again = run_here(params(data, seed=11))
        assert "train" not in cached(again["cards"]) and again["cards"]["train"] == "Completed"
        assert {"data_load", "data_split", "model_define"} <= cached(again["cards"])
        assert again["metrics"] == first["metrics"]
        assert_same_weights(first["model_uri"], again["model_uri"])


@pytest.mark.s3
@pytest.mark.slow
def test_results_on_s3_are_found_from_a_fresh_prefect_home(s3_server, data, tmp_path):
    storage = s3_server.block_fields("cache-test")
    request = {**params(data), "storage": storage, "output": None}
    base = {k: v for k, v in s3_server.client_env().items()}
    for var in ("PREFECT_API_URL",):
        os.environ.pop(var, None)
    first = run_in_fresh_process(request, {**base, "PREFECT_HOME": str(tmp_path / "home-a")})
    assert cached(first["cards"]) == set()
    second = run_in_fresh_process(request, {**base, "PREFECT_HOME": str(tmp_path / "home-b")})
    assert cached(second["cards"]) == COARSE
    assert second["metrics"] == first["metrics"]
