"""A fast-path run killed with SIGKILL resumes from its last checkpoint at once (the
dead run's lock is taken over, not waited out) and ends bitwise equal."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.datasets import noisy_linear

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]
REPO = Path(__file__).resolve().parents[2]


# Longer than the subprocess timeout: a rerun that waited out the killed run's lease would fail.
HOLD_SECONDS = 86_400  # a lease no test run can wait out


def run(csv, out, kill_at, home):
    # Against the session's Prefect server: an embedded one would outlive the killed
    # process and hold its output pipes open.
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PREFECT_TORCH_LOCK_HOLD_SECONDS": str(HOLD_SECONDS)}
    return subprocess.run([sys.executable, "-m", "tests.caching.killable_train", str(csv), str(out), str(kill_at)],
                          capture_output=True, text=True, env=env, timeout=400, cwd=REPO)


@pytest.mark.parametrize("kill_at_forward", [9, 16], ids=["inside-an-accumulation-window", "at-a-group-end"])
def test_a_killed_training_resumes_and_ends_bitwise_equal(tmp_path, kill_at_forward):
    csv = tmp_path / "data.csv"
    noisy_linear(200, seed=3).to_csv(csv, index=False)

    reference = run(csv, tmp_path / "reference.safetensors", 0, tmp_path / "home-reference")
    assert reference.returncode == 0, reference.stderr[-2000:]

    killed = run(csv, tmp_path / "never.safetensors", kill_at_forward, tmp_path / "home")
    assert killed.returncode == -9, killed.stderr[-2000:]
    checkpoints = list((tmp_path / "home" / "prefect-torch" / "checkpoints").rglob("*.json"))
    assert checkpoints, "the killed run left no checkpoint"
    leases = [json.loads(p.read_text()) for p in (tmp_path / "home" / "prefect-torch" / "locks").glob("*.lock")]
    assert leases, "the killed run held no lock"

    resumed = run(csv, tmp_path / "resumed.safetensors", 0, tmp_path / "home")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from the checkpoint" in resumed.stderr + resumed.stdout
    assert "no longer runs on this host" in resumed.stderr + resumed.stdout
    # Resumed within the run's 400 s timeout while the killed run's lease had a day to run:
    # taken over because its holder is gone, not waited out.

    a, b = load_file(tmp_path / "reference.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
