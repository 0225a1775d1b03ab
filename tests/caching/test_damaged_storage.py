"""Every stored file damaged at once (results, split tensors, checkpoints, the saved model): the
rerun, through the command line as a user runs it, warns about each, recomputes
and ends with the same metrics as the first run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefect_torch.engine.persist import WEIGHTS_FILE, load_model
from tests.datasets import separable_classes

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def train_cli(data: Path, home: Path) -> subprocess.CompletedProcess:
    # Against the session's Prefect server, as a user with a running server does.
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.run(
        [sys.executable, "-m", "prefect_torch.cli", "train", str(data), "--target", "label", "--epochs", "4",
         "--hidden", "16", "--device", "cpu", "--seed", "3", "--json"],
        capture_output=True, text=True, env=env, timeout=400,
    )


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_rerun_over_damaged_results_checkpoints_and_model_recomputes_the_same_metrics(tmp_path):
    data, home = tmp_path / "classes.csv", tmp_path / "home"
    separable_classes(400, classes=3, seed=1).to_csv(data, index=False)
    first = train_cli(data, home)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    model = Path(summary["model_uri"])
    weights = (model / WEIGHTS_FILE).read_bytes()

    storage = home / "prefect-torch"
    results = sorted(p for p in (storage / "results").rglob("*") if p.is_file())
    tensors = sorted(p for p in (storage / "tensors").rglob("*") if p.is_file())
    intact_tensors = {p: p.read_bytes() for p in tensors}
    checkpoints = sorted(p for p in (storage / "checkpoints").rglob("*") if p.is_file())
    saved = sorted(p for p in model.iterdir() if p.is_file())
    assert len(results) >= 5 and len(tensors) >= 1 and len(checkpoints) == 4 and len(saved) == 2
    for path in results + tensors + checkpoints + saved:
        flip_middle_byte(path)
    newest_tensors = max(p for p in checkpoints if p.suffix == ".safetensors")
    newest_tensors.write_bytes(newest_tensors.read_bytes()[:100])  # and a truncated one

    rerun = train_cli(data, home)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Traceback" not in rerun.stderr
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["metrics"] == summary["metrics"]
    logs = rerun.stdout + rerun.stderr
    assert logs.count("Ignoring the stored result at") >= 5
    for json_file in (p for p in checkpoints if p.suffix == ".json"):
        assert f"Skipping the checkpoint {json_file}" in logs
    assert "training starts over" in logs
    # The split's tensor file was written again, whole.
    assert {p: p.read_bytes() for p in tensors} == intact_tensors
    # The saved model was written again, whole: it loads, verified, with the same weights.
    assert (model / WEIGHTS_FILE).read_bytes() == weights
    assert load_model(str(model)).metrics == summary["metrics"]
