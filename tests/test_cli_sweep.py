"""``prefect-torch sweep``: a bad search space is one line and exit status 2, before
Prefect starts or any trial runs."""

import os
import subprocess
import sys

import pytest

from tests.datasets import noisy_linear


def run_cli(*args, home):
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", "prefect_torch.cli", *args],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("lrr: {log_uniform: [1.0e-4, 1.0e-1]}", "Unknown search space parameter 'lrr'"),
        ("hidden: {choice: []}", "Search space entry 'hidden' has an empty choice"),
        ("lr: {log_uniform: [0, 0.1]}", "a log range needs both bounds above zero"),
    ],
)
def test_a_bad_space_exits_2_with_one_line(tmp_path, space, message):
    data = tmp_path / "d.csv"
    noisy_linear(60).to_csv(data, index=False)
    (tmp_path / "space.yaml").write_text(space + "\n")
    out = run_cli("sweep", str(data), "--target", "y", "--space", str(tmp_path / "space.yaml"), home=tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ")
    assert not (tmp_path / "prefect-torch" / "sweeps.db").exists()  # no study was created

