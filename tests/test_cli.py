"""The prefect-torch command, end to end in subprocesses with the embedded Prefect."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from tests.datasets import noisy_linear, separable_classes

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
