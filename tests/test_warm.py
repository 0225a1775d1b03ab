"""The warm process: `prefect-torch` commands after the first run in a forked child of a
process that has already imported torch and Prefect, and behave as if they ran on their own.

Real processes throughout: the command, the warm process it leaves behind, a real
Prefect server, signals sent with os.kill.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from prefect_torch.warm import place
from prefect_torch.warm.client import (
    process_alive,
    start_in_background,
    stop_warm_processes,
    wants_warm,
    warm_processes,
)
from tests.datasets import noisy_linear

pytestmark = [pytest.mark.slow, pytest.mark.server]


@pytest.fixture
def warm_env(prefect_server, tmp_path):
    """Commands on the running server, a PREFECT_HOME and a socket folder of this test's own."""
    run_dir = tempfile.mkdtemp(prefix="pt-warm-")  # short: a socket path has at most 107 bytes
    home = tmp_path / "home"
    home.mkdir()
    env = {**prefect_server.env, "PREFECT_HOME": str(home), "XDG_RUNTIME_DIR": run_dir,
           "PREFECT_TORCH_WARM": "1", "PREFECT_TORCH_WARM_IDLE_SECONDS": "300"}
    yield env
    stop_warm_processes(env)
    shutil.rmtree(run_dir, ignore_errors=True)


def prefect_torch(env, *args, cwd, report=None, background=False):
    """Run the command (or start it, with ``background``) as a user would."""
    env = {**env, **({place.REPORT_VARIABLE: str(report)} if report else {})}
    command = [sys.executable, "-m", "prefect_torch.cli", *args]
    if background:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def wait_until_ready(env, timeout=60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [p for p in warm_processes(env) if p["ready"]]
        if ready:
            return ready[0]["pid"]
        time.sleep(0.2)
    logs = {p.name: p.read_text()[-2000:] for p in place.socket_folder(env).glob("*.log")}
    logs["files"] = sorted(os.listdir(place.socket_folder(env)))
    raise AssertionError(f"no warm process became ready; {warm_processes(env)}; logs: {logs}")


def wait_until_gone(pid: int, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        assert time.monotonic() < deadline, f"process {pid} is still there"
        time.sleep(0.1)


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def losses(summary: dict) -> list:
    """Each epoch's losses and metrics (bitwise), without its timings."""
    return [{k: v for k, v in epoch.items() if k not in ("seconds", "samples_per_s")} for epoch in summary["history"]]


def test_after_the_first_command_the_next_run_in_the_warm_process_and_train_the_same(warm_env, tmp_path):
    noisy_linear(400, seed=11).to_csv(tmp_path / "d.csv", index=False)
    # The same values in another file: not a cache hit, so the warm command trains.
    pd.read_csv(tmp_path / "d.csv").to_parquet(tmp_path / "same.parquet", index=False)
    options = ["--target", "y", "--epochs", "3", "--hidden", "16", "--device", "cpu", "--json"]

    first = prefect_torch(warm_env, "train", "d.csv", *options, cwd=tmp_path, report=tmp_path / "first.json")
    assert first.returncode == 0, first.stderr
    assert not (tmp_path / "first.json").exists()  # ran in its own process, and left a warm one behind
    warm_pid = wait_until_ready(warm_env)

    # A relative path: the command runs in its own folder, not the warm process's.
    second = prefect_torch(warm_env, "train", "same.parquet", *options, cwd=tmp_path,
                           report=tmp_path / "second.json")
    assert second.returncode == 0, second.stderr
    outcome = json.loads((tmp_path / "second.json").read_text())
    assert outcome["warm"] and outcome["warm_pid"] == warm_pid and outcome["exit"] == 0
    assert outcome["peak_rss_kb"] > 0
    assert last_json(second.stdout)["metrics"] == last_json(first.stdout)["metrics"]
    assert losses(last_json(second.stdout)) == losses(last_json(first.stdout))
    assert "flow run in the Prefect UI" in second.stdout  # the server from the command's environment

    # A user error keeps its one line on stderr and exit status 2.
    wrong = prefect_torch(warm_env, "train", "d.csv", "--target", "nope", cwd=tmp_path,
                          report=tmp_path / "wrong.json")
    assert wrong.returncode == 2
    assert wrong.stderr.startswith("error:") and "nope" in wrong.stderr and wrong.stdout == ""
    assert json.loads((tmp_path / "wrong.json").read_text())["warm_pid"] == warm_pid


def test_ctrl_c_reaches_the_command_and_a_killed_command_takes_its_work_with_it(warm_env, tmp_path):
    noisy_linear(2000, seed=12).to_csv(tmp_path / "d.csv", index=False)
    long_run = ["train", "d.csv", "--target", "y", "--epochs", "100000", "--device", "cpu"]
    start_in_background(long_run, warm_env, cwd=tmp_path)
    warm_pid = wait_until_ready(warm_env)

    for sent in (signal.SIGINT, signal.SIGKILL):
        command = prefect_torch(warm_env, *long_run, cwd=tmp_path, background=True)
        deadline = time.monotonic() + 120
        while not children_of(warm_pid):
            assert time.monotonic() < deadline and command.poll() is None
            time.sleep(0.1)
        (child,) = children_of(warm_pid)
        time.sleep(3)  # into the flow run
        os.kill(command.pid, sent)
        _, stderr = command.communicate(timeout=120)
        assert command.returncode == -sent
        if sent == signal.SIGINT:  # as Python ends on Ctrl-C: the traceback, then death by SIGINT
            assert "KeyboardInterrupt" in stderr
        wait_until_gone(child)
    assert process_alive(warm_pid)  # the warm process serves the next command


def test_the_warm_process_leaves_when_idle_or_when_its_prefect_home_is_removed(warm_env, tmp_path):
    args = ["train", "d.csv", "--target", "y"]
    start_in_background(args, warm_env, cwd=tmp_path)
    pid = wait_until_ready(warm_env)
    status = prefect_torch(warm_env, "warm", "status", cwd=tmp_path)
    assert f"pid {pid}" in status.stdout and "ready" in status.stdout
    shutil.rmtree(warm_env["PREFECT_HOME"])
    wait_until_gone(pid)
    assert warm_processes(warm_env) == []

    os.makedirs(warm_env["PREFECT_HOME"])
    idle = {**warm_env, place.IDLE_VARIABLE: "3"}
    start_in_background(args, idle, cwd=tmp_path)
    wait_until_gone(wait_until_ready(idle))
    assert "idle for 3 s" in Path(place.log_path(idle, place.warm_key(idle, str(tmp_path)))).read_text()


def test_warm_stop_stops_every_warm_process(warm_env, tmp_path):
    start_in_background(["train", "d.csv", "--target", "y"], warm_env, cwd=tmp_path)
    pid = wait_until_ready(warm_env)
    stopped = prefect_torch(warm_env, "warm", "stop", cwd=tmp_path)
    assert stopped.returncode == 0 and "stopped 1 warm process" in stopped.stdout
    wait_until_gone(pid, timeout=5)
    assert not any(place.socket_folder(warm_env).glob("*.sock"))


def test_only_the_same_interpreter_code_and_environment_share_a_warm_process(tmp_path):
    env = {"PATH": "/usr/bin", "PREFECT_HOME": str(tmp_path / "home"), "SHLVL": "1", "PWD": "/a"}
    key = place.warm_key(env, str(tmp_path))
    # What a shell changes between two commands does not matter...
    assert place.warm_key({**env, "SHLVL": "2", "PWD": "/b", "OLDPWD": "/a", "_": "x"}, str(tmp_path)) == key
    # ...what an import may read does.
    assert place.warm_key({**env, "TORCH_LOGS": "dynamo"}, str(tmp_path)) != key
    assert place.warm_key({**env, "PREFECT_API_URL": "http://127.0.0.1:1/api"}, str(tmp_path)) != key
    (tmp_path / "prefect.toml").write_text("[logging]\nlevel = 'DEBUG'\n")
    assert place.warm_key(env, str(tmp_path)) != key


def test_quick_commands_and_help_never_wait_for_a_warm_process():
    env = {"PREFECT_TORCH_WARM": "1"}
    assert wants_warm(["train", "d.csv", "--target", "y"], env) == sys.platform.startswith("linux")
    assert not wants_warm(["train", "--help"], env)
    assert not wants_warm(["pools", "create"], env)
    assert not wants_warm(["warm", "status"], env)
    assert not wants_warm(["train", "d.csv", "--target", "y"], {"PREFECT_TORCH_WARM": "0"})
