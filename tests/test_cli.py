"""The prefect-torch command, end to end in subprocesses with the embedded Prefect."""

import json
import os
import re
import sqlite3
import subprocess
import sys

import pandas as pd
import pytest

from prefect_torch.runtime import PERSISTENT_SERVER_HINT
from tests.datasets import noisy_linear, separable_classes
from tests.support.prefect_server import base_env

pytestmark = pytest.mark.slow


def run_cli(*args, home, timeout=300):
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "prefect_torch.cli", *args],
        capture_output=True, text=True, env=env, timeout=timeout,
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("prefect-home")


def test_train_then_predict(tmp_path, home):
    data = tmp_path / "classes.csv"
    separable_classes(600, classes=2, labels=["no", "yes"]).to_csv(data, index=False)
    out = run_cli("train", str(data), "--target", "label", "--epochs", "4", "--hidden", "16,8",
                  "--accumulate", "2", "--clip", "1.0", "--lr", "0.02", "--device", "cpu", "--output", str(tmp_path / "m"),
                  "--json", home=home)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["model_uri"] == str(tmp_path / "m")
    assert set(summary["metrics"]) == {"accuracy", "f1_macro", "log_loss", "roc_auc"}
    assert summary["metrics"]["accuracy"] >= 0.95 and len(summary["history"]) == 4

    predictions = tmp_path / "pred.csv"
    out = run_cli("predict", str(tmp_path / "m"), str(data), "--output", str(predictions), "--proba", home=home)
    assert out.returncode == 0, out.stderr
    written = pd.read_csv(predictions)
    assert set(written["predicted_label"]) <= {"no", "yes"}
    assert {"p_no", "p_yes"} <= set(written.columns)


def test_demo_trains_on_the_bundled_dataset(home):
    out = run_cli("demo", "--epochs", "3", "--json", home=home)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["problem"] == "regression" and summary["metrics"]["r2"] > 0.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "missing.csv", "--target", "y"], "not found"),
        (["train", "{data}", "--target", "price"], "Target column 'price' is not in the data"),
        (["train", "{data}", "--target", "y", "--optimizer", "adamx"], "OptimizerSpec: name: Input should be"),
        (["train", "{data}", "--target", "y", "--loss", "cross_entropy"], "cannot train a regression"),
        (["train", "{data}", "--target", "y", "--epochs", "0"], "epochs"),
        (["train", "{data}", "--target", "y", "--processes", "0"], "processes"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(tmp_path, home, args, message):
    data = tmp_path / "d.csv"
    noisy_linear(60).to_csv(data, index=False)
    out = run_cli(*[a.format(data=data) for a in args], "--epochs" if "--epochs" not in args else "--seed", "1", home=home)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_debug_shows_the_traceback(home):
    out = run_cli("--debug", "train", "missing.csv", "--target", "y", home=home)
    assert out.returncode != 0 and "Traceback" in out.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tmp_path, home):
    data = tmp_path / "d.csv"
    noisy_linear(60).to_csv(data, index=False)
    out = run_cli("train", str(data), "--target", "y", "--device", "cuda", home=home)
    assert out.returncode == 2 and "no usable CUDA GPU" in out.stderr


# --- before Prefect starts --------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "missing.csv", "--target", "y"], "error: Dataset file not found: missing.csv."),
        (["train", "{data}", "--target", "price"], "error: Target column 'price' is not in the data."),
        (["train", "{data}", "--target", "y", "--features", "x1,size"],
         "error: Feature columns ['size'] are not in the data."),
        (["train", "{parquet}", "--target", "y"], "is not a readable Parquet file"),
        (["train", "{data}", "--target", "y", "--scheduler", "linear"],
         "error: Invalid TrainSpec: scheduler.name: Input should be"),
    ],
    ids=["missing-file", "missing-target", "missing-feature", "unreadable-format", "unknown-option"],
)
def test_bad_input_is_one_line_on_stderr_before_prefect_starts(tmp_path, args, message):
    data = tmp_path / "d.csv"
    noisy_linear(60).to_csv(data, index=False)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    home = tmp_path / "untouched-home"
    out = run_cli(*[a.format(data=data, parquet=broken) for a in args], home=home)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [out.stderr.strip()], out.stderr  # one line, nothing from Prefect
    assert out.stderr.startswith("error: ") and message in out.stderr
    assert not home.exists()  # Prefect never started: no database, no server


def test_a_prefect_home_migrated_by_a_newer_prefect_is_one_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    with sqlite3.connect(home / "prefect.db") as db:
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
        db.execute("INSERT INTO alembic_version VALUES ('ffffffffffff')")
    data = tmp_path / "d.csv"
    noisy_linear(60).to_csv(data, index=False)

    out = run_cli("train", str(data), "--target", "y", "--epochs", "1", home=home)

    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "migrated by a newer Prefect (revision ffffffffffff" in lines[0]
    assert "Upgrade Prefect" in lines[0] and "PREFECT_HOME" in lines[0]


# --- a running server -------------------------------------------------------


def run_cli_on_server(*args, home, api_url=None, timeout=300):
    env = base_env(PREFECT_HOME=str(home))
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return subprocess.run(
        [sys.executable, "-m", "prefect_torch.cli", *args],
        capture_output=True, text=True, env=env, timeout=timeout,
    )


def run_urls(stdout):
    return re.findall(r"^flow run in the Prefect UI: (\S+)$", stdout, re.MULTILINE)


def test_a_run_on_a_running_server_prints_its_url(tmp_path, prefect_server):
    data = tmp_path / "d.csv"
    noisy_linear(120).to_csv(data, index=False)

    out = run_cli_on_server("train", str(data), "--target", "y", "--epochs", "1", "--hidden", "8",
                            home=tmp_path / "client-home", api_url=prefect_server.api_url)

    assert out.returncode == 0, out.stderr
    (url,) = run_urls(out.stdout)
    flow_run_id = url.rsplit("/", 1)[-1]
    assert url == f"{prefect_server.ui_url}/runs/flow-run/{flow_run_id}"
    assert prefect_server.request("GET", f"/flow_runs/{flow_run_id}")["state_type"] == "COMPLETED"
    assert PERSISTENT_SERVER_HINT not in out.stderr  # no temporary server was started


def test_a_background_server_of_the_same_home_is_found(tmp_path, prefect_server):
    """``prefect server start --background`` records only its pid, in
    ``PREFECT_HOME/server.pid``; the process's command line has its port. The
    fixture's server stands in for it: its pid, written where the CLI looks."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "server.pid").write_text(str(prefect_server.process.pid))
    data = tmp_path / "d.csv"
    noisy_linear(120).to_csv(data, index=False)

    out = run_cli_on_server("train", str(data), "--target", "y", "--epochs", "1", "--hidden", "8", home=home)

    assert out.returncode == 0, out.stderr
    (url,) = run_urls(out.stdout)
    assert url.startswith(f"{prefect_server.ui_url}/runs/flow-run/")
    assert not (home / "prefect.db").exists()  # no temporary server ran on this home


def test_a_run_on_the_temporary_server_says_how_to_keep_one(tmp_path, home):
    data = tmp_path / "d.csv"
    noisy_linear(120).to_csv(data, index=False)
    out = run_cli("train", str(data), "--target", "y", "--epochs", "1", "--hidden", "8", home=home)
    assert out.returncode == 0, out.stderr
    assert run_urls(out.stdout) == []
    assert out.stderr.count(PERSISTENT_SERVER_HINT) == 1


def test_options_the_flow_refuses_start_no_early_read_or_split(tmp_path, monkeypatch):
    """The command reads and splits a new dataset while Prefect starts, with the load
    and split specs of the flow's own DatasetSpec; options whose split the flow will
    refuse start nothing in the background."""
    from prefect_torch.cli import _start_reading, build_parser
    from prefect_torch.engine import prefetch

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    data = tmp_path / "d.csv"
    noisy_linear(50, features=2, seed=1).to_csv(data, index=False)
    refused = build_parser().parse_args(["train", str(data), "--target", "y", "--val-fraction", "0.5",
                                         "--test-fraction", "0.5"])
    _start_reading(refused)
    assert prefetch.take(str(data.resolve())) is None

    accepted = build_parser().parse_args(["train", str(data), "--target", "y"])
    _start_reading(accepted)
    spec, _, _, table = prefetch.take(str(data.resolve()))
    assert spec.uri == str(data) and len(table.frame) == 50
    prefetch.discard()
