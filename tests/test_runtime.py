"""The embedded default Prefect, as a command-line tool runs it.

Each test runs a small command-line-style script as a subprocess with no
``PREFECT_API_URL``, in a fresh ``PREFECT_HOME``, the way a user's shell would.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import prefect
import pytest

from prefect_torch.errors import PrefectHomeError
from prefect_torch.runtime import background_server_url, check_prefect_home

from tests.support.prefect_server import PrefectServer, base_env

pytestmark = [pytest.mark.slow]

SCRIPT = textwrap.dedent(
    """
    import sys

    from prefect import flow, get_run_logger, task

    from prefect_torch.runtime import quiet_embedded_prefect, run_cli_flow


    @task
    def add(a: int, b: int) -> int:
        if a < 0:
            raise ValueError("negative batch")
        return a + b


    @flow
    def many(n: int, fail: bool = False) -> int:
        get_run_logger().info("many: starting %d tasks", n)
        futures = [add.submit(-1 if fail and i == 3 else i, 1) for i in range(n)]
        total = sum(f.result() for f in futures)
        get_run_logger().info("many: total is %d", total)
        return total


    if __name__ == "__main__":
        mode, n, fail = sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["fail"]
        try:
            if mode == "plain":
                total = many(n, fail)
            elif mode == "nested":  # a command that runs several flows
                with quiet_embedded_prefect():
                    run_cli_flow(many, n, fail=fail)
                    total = many(n, fail)
            else:
                total = run_cli_flow(many, n, fail=fail)
        except ValueError as exc:
            print(f"cli: failed: {exc}")
            sys.exit(3)
        print(f"cli: total {total}")
    """
)

SHUTDOWN_NOISE = ("Traceback", "CancelledError", "Error flushing", "Failed to send telemetry")


def written_script(tmp_path: Path) -> Path:
    """The script, written once: rewriting it for each process truncated the
    file under an interpreter that was just reading it, which then ran an empty
    script and exited 0 without a word."""
    script = tmp_path / "cli_script.py"
    if not script.exists():
        script.write_text(SCRIPT)
    return script


def run_script(
    tmp_path: Path, *args: str, home: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(written_script(tmp_path)), *args],
        env=env or base_env(PREFECT_HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def start_script(tmp_path: Path, *args: str, home: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(written_script(tmp_path)), *args],
        env=base_env(PREFECT_HOME=str(home)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``PREFECT_HOME`` the tests below share: only the first pays for the
    database migrations (10-20 s on two cores)."""
    return tmp_path_factory.mktemp("shared-prefect-home")


def completed_task_runs(home: Path) -> int:
    with sqlite3.connect(home / "prefect.db") as db:
        (count,) = db.execute(
            "SELECT count(*) FROM task_run WHERE state_type = 'COMPLETED'"
        ).fetchone()
    return count


def test_plain_prefect_prints_shutdown_tracebacks(tmp_path, shared_home):
    """The problem, reproduced: without the runtime helpers Prefect's temporary
    server is killed while it still records task runs. If this starts failing
    after a Prefect upgrade, the quiet shutdown may no longer be needed."""
    # Prefect's 20 s start-up timeout is too short for a first start on a
    # busy machine: another problem the runtime helpers solve.
    env = base_env(
        PREFECT_HOME=str(shared_home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120"
    )
    result = run_script(tmp_path, "plain", "300", home=shared_home, env=env)

    assert result.returncode == 0, result.stderr
    assert "Error flushing" in result.stderr
    assert "CancelledError" in result.stderr


@pytest.mark.parametrize(
    "recorder_batch",
    [
        None,  # the CLI default: the recorder keeps up with the flow
        "1",  # Prefect's default, kept when the user sets it: it lags at exit
    ],
)
def test_cli_flow_exits_quietly_and_records_every_task_run(
    tmp_path, shared_home, recorder_batch
):
    before = completed_task_runs(shared_home) if (shared_home / "prefect.db").exists() else 0
    env = base_env(PREFECT_HOME=str(shared_home))
    if recorder_batch is not None:
        env["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"] = recorder_batch
    result = run_script(tmp_path, "cli", "300", home=shared_home, env=env)

    assert result.returncode == 0, result.stderr
    assert "cli: total 45150" in result.stdout
    for noise in SHUTDOWN_NOISE:
        assert noise not in result.stderr, result.stderr
    # The flow's own logs are untouched.
    assert "many: starting 300 tasks" in result.stderr
    assert "many: total is 45150" in result.stderr
    assert "Finished in state Completed()" in result.stderr
    # Stopped only after it had written every task run.
    assert completed_task_runs(shared_home) - before == 300


def test_a_failing_flow_still_shows_its_error(tmp_path, shared_home):
    result = run_script(tmp_path, "cli", "20", "fail", home=shared_home)

    assert result.returncode == 3, result.stderr
    assert "cli: failed: negative batch" in result.stdout
    assert "ValueError: negative batch" in result.stderr  # the task's traceback
    assert "CancelledError" not in result.stderr
    assert "Error flushing" not in result.stderr


def test_flows_of_one_command_share_one_server(tmp_path, shared_home):
    result = run_script(tmp_path, "nested", "10", home=shared_home)

    assert result.returncode == 0, result.stderr
    assert "cli: total 55" in result.stdout
    assert result.stderr.count("Starting temporary server") == 1, result.stderr
    assert result.stderr.count("for flow 'many'") == 2  # "Beginning flow run ..."
    for noise in SHUTDOWN_NOISE:
        assert noise not in result.stderr, result.stderr


def test_processes_started_together_on_a_fresh_home_all_succeed(tmp_path):
    """Four, not three: once the start-up timeout is long enough, three
    processes without the lock race on the migrations only now and then
    ("duplicate column name", a traceback and a restarted server); four do
    nearly every time."""
    home = tmp_path / "fresh-home"
    processes = [start_script(tmp_path, "cli", "5", home=home) for _ in range(4)]
    outputs = [process.communicate(timeout=400) for process in processes]

    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
        assert "cli: total 15" in stdout
        assert "Traceback" not in stderr, stderr
        assert "Application startup failed" not in stderr, stderr
    assert completed_task_runs(home) == 4 * 5


@pytest.mark.server
def test_with_an_api_url_the_cli_uses_that_server(prefect_server: PrefectServer, tmp_path):
    env = {**prefect_server.env, "PREFECT_HOME": str(tmp_path / "home")}
    result = run_script(tmp_path, "cli", "5", home=tmp_path / "home", env=env)

    assert result.returncode == 0, result.stderr
    assert "Starting temporary server" not in result.stderr
    assert "Traceback" not in result.stderr
    runs = prefect_server.request(
        "POST", "/flow_runs/filter", json={"flows": {"name": {"any_": ["many"]}}}
    )
    assert any(run["state_type"] == "COMPLETED" for run in runs)


def test_cli_defaults_keep_what_the_user_set(tmp_path):
    code = textwrap.dedent(
        """
        import json, os
        from prefect.settings import get_current_settings
        from prefect_torch.runtime import configure_cli_environment

        applied = configure_cli_environment()
        settings = get_current_settings()
        print(json.dumps({
            "applied": sorted(applied),
            "analytics": settings.server.analytics_enabled,
            "timeout": settings.server.ephemeral.startup_timeout_seconds,
            "batch": settings.server.services.task_run_recorder.batch_size,
            "home": str(settings.home),
        }))
        """
    )
    env = base_env(
        PREFECT_HOME=str(tmp_path / "home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="true",  # the user's choice
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    import json

    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["analytics"] is True
    assert seen["timeout"] == 120
    assert seen["batch"] == 100
    assert seen["home"] == str(tmp_path / "home")
    assert "PREFECT_HOME" not in seen["applied"]
    assert "PREFECT_SERVER_ANALYTICS_ENABLED" not in seen["applied"]


def test_an_unwritable_home_falls_back_to_a_writable_one(tmp_path):
    code = textwrap.dedent(
        """
        import os
        from prefect.settings import get_current_settings
        from prefect_torch.runtime import configure_cli_environment

        configure_cli_environment()
        print(os.environ["PREFECT_HOME"], get_current_settings().home)
        """
    )
    not_a_dir = tmp_path / "home-is-a-file"
    not_a_dir.write_text("")
    env = base_env(HOME=str(not_a_dir))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    env_home, settings_home = result.stdout.split()
    assert env_home == settings_home
    assert "prefect-torch-" in env_home
    assert Path(env_home).is_dir()


def test_server_output_is_held_back_only_once_it_is_told_to_stop(capfd):
    from prefect_torch.runtime import _OutputRelay

    relay = _OutputRelay()
    with relay.as_child_stderr():
        child = subprocess.Popen(
            ["sh", "-c", "echo while-running >&2; read _; echo at-shutdown >&2"],
            stdin=subprocess.PIPE,
        )
    relay.start()
    deadline = time.monotonic() + 10
    while "while-running" not in capfd.readouterr().err:  # forwarded as it comes
        assert time.monotonic() < deadline, "the child's output never arrived"
        time.sleep(0.05)
    relay.hold_back()
    child.communicate(b"stop\n", timeout=10)

    assert relay.close() == b"at-shutdown\n"
    assert "at-shutdown" not in capfd.readouterr().err


# --- a Prefect home this Prefect cannot use ---------------------------------


def stamped_database(home: Path, revision: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(home / "prefect.db") as db:
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
        db.execute("INSERT INTO alembic_version VALUES (?)", (revision,))
    return home / "prefect.db"


@contextmanager
def prefect_home(home: Path):
    """Prefect's settings as with only ``PREFECT_HOME=home`` set: without the database URL
    a session's ``prefect_test_harness`` sets for every later test in its process."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

    with temporary_settings(updates={PREFECT_HOME: str(home)},
                            restore_defaults={PREFECT_SERVER_DATABASE_CONNECTION_URL}):
        yield


def test_a_database_migrated_by_a_newer_prefect_is_refused(tmp_path):
    path = stamped_database(tmp_path / "home", "ffffffffffff")
    with prefect_home(tmp_path / "home"), pytest.raises(PrefectHomeError) as raised:
        check_prefect_home()
    message = str(raised.value)
    assert f"{path} was migrated by a newer Prefect (revision ffffffffffff is unknown" in message
    assert "Upgrade Prefect" in message and "PREFECT_HOME" in message and "\n" not in message


def test_a_database_at_a_revision_this_prefect_knows_is_accepted(tmp_path):
    newest = sorted((Path(prefect.__file__).parent / "server/database/_migrations/versions/sqlite").glob("*.py"))[-1]
    revision = re.search(r'^revision = "(\w+)"', newest.read_text(), re.MULTILINE).group(1)
    stamped_database(tmp_path / "home", revision)
    with prefect_home(tmp_path / "home"):
        check_prefect_home()  # no error
    with prefect_home(tmp_path / "fresh"):
        check_prefect_home()  # no database yet: the server creates it


def test_a_corrupt_database_is_refused(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "prefect.db").write_bytes(b"this is not an SQLite database" * 100)
    with prefect_home(tmp_path / "home"), pytest.raises(PrefectHomeError, match="is corrupt"):
        check_prefect_home()


def test_a_stale_background_server_pid_file_is_ignored(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    (tmp_path / "server.pid").write_text(finished.stdout.strip())
    assert background_server_url(tmp_path) is None
    assert background_server_url(tmp_path / "no-such-home") is None


# --- the Python API's defaults ----------------------------------------------

ANALYTICS = (
    "import prefect_torch.flows\n"
    "from prefect.settings import get_current_settings\n"
    "print(get_current_settings().server.analytics_enabled)\n"
)


@pytest.mark.parametrize(("user_setting", "expected"), [(None, "False"), ("true", "True")])
def test_the_python_api_turns_server_telemetry_off_unless_the_user_set_it(tmp_path, user_setting, expected):
    """The temporary server's telemetry heartbeat printed ``database is locked``
    tracebacks into Python-API runs; the CLI always turned it off."""
    env = base_env(PREFECT_HOME=str(tmp_path))
    del env["PREFECT_SERVER_ANALYTICS_ENABLED"]
    if user_setting is not None:
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = user_setting
    out = subprocess.run([sys.executable, "-c", ANALYTICS], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
