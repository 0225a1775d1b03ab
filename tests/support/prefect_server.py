"""Real Prefect servers and workers for tests, run as subprocesses.

Nothing here mocks Prefect: ``prefect_server`` runs ``prefect server start``
on a free loopback port with its own ``PREFECT_HOME`` (SQLite there, or a
PostgreSQL database, optionally Redis for messaging), and ``prefect_worker``
runs ``prefect worker start``. Each yields what a test needs to talk to it:
the API URL and an ``env`` mapping for the subprocesses the test starts.

Every process starts in its own session under ``setpriv --pdeathsig KILL`` (so
it dies with the test process even if that is killed) and is stopped on exit
from its context, test error or not: SIGTERM to its process group and to every
descendant (flow-run processes may start sessions of their own), then SIGKILL
after a grace period. Each process writes to a log file whose tail is shown
when it fails to come up.

The local services are those of the development machine: PostgreSQL at
127.0.0.1:5432 (trust auth, user ``postgres``) and Redis at 127.0.0.1:6379.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
POSTGRES_ADMIN_DSN = os.environ.get(
    "PREFECT_TORCH_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("PREFECT_TORCH_TEST_REDIS_URL", "redis://127.0.0.1:6379")
FINAL_STATE_TYPES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})


# --- processes --------------------------------------------------------------


@dataclass
class ManagedProcess:
    """A subprocess in its own session, with its output in ``log_path``."""

    args: Sequence[str]
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        """Stop the process, its group and every descendant; idempotent."""
        family = _descendants(self.pid)
        _signal_group(self.pid, signal.SIGTERM)
        for pid in family:
            _signal(pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + grace
        for pid in family:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            _signal(pid, signal.SIGKILL)
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


def start_process(
    args: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path | None = None
) -> ManagedProcess:
    """Start ``args`` in a new session; it is killed if this process dies."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "--", *args],
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return ManagedProcess(args=list(args), popen=popen, log_path=log_path)


@contextmanager
def managed_process(
    args: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path | None = None
) -> Iterator[ManagedProcess]:
    process = start_process(args, env, log_path, cwd)
    try:
        yield process
    finally:
        process.stop()


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefect_executable() -> str:
    """The ``prefect`` command of the interpreter running the tests."""
    candidate = Path(sys.executable).with_name("prefect")
    return str(candidate) if candidate.exists() else shutil.which("prefect") or "prefect"


def base_env(**overrides: str) -> dict[str, str]:
    """This process's environment without any ``PREFECT_*`` setting.

    Adds the repository to ``PYTHONPATH`` (so subprocesses import
    ``prefect_torch`` from this checkout) and turns server analytics off.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    if "PREFECT_TORCH_WARM" in os.environ:  # not a Prefect setting: the suite's choice (conftest)
        env["PREFECT_TORCH_WARM"] = os.environ["PREFECT_TORCH_WARM"]
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    # A flow run in a fresh process starts Prefect's temporary server; its 20 s
    # default is too short on a loaded two-core machine (the CLI sets the same).
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    env.update(overrides)
    return env


# --- services: PostgreSQL and Redis -------------------------------------------


@contextmanager
def postgres_database(
    prefix: str = "prefect_torch_", admin_dsn: str = POSTGRES_ADMIN_DSN
) -> Iterator[str]:
    """Create a fresh PostgreSQL database; yield its asyncpg URL; drop it after.

    The URL is of the form Prefect wants for
    ``PREFECT_SERVER_DATABASE_CONNECTION_URL``.
    """
    import asyncpg

    name = f"{prefix}{secrets.token_hex(6)}"

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(admin_dsn, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(execute(f'CREATE DATABASE "{name}"'))
    try:
        host_part = admin_dsn.split("://", 1)[1].rsplit("/", 1)[0]
        yield f"postgresql+asyncpg://{host_part}/{name}"
    finally:
        asyncio.run(execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextmanager
def redis_database(base_url: str = REDIS_URL, lock_dir: Path | None = None) -> Iterator[str]:
    """Reserve one of Redis's numbered databases (1-15) and yield its URL.

    Concurrent test sessions on the same machine each get their own database:
    the number is held by an ``fcntl`` lock on a file in ``lock_dir``. The
    database is flushed before and after use.
    """
    import fcntl

    import redis

    lock_dir = lock_dir or Path(tempfile.gettempdir()) / "prefect-torch-redis-dbs"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        for number in range(1, 16):
            handle = stack.enter_context(open(lock_dir / f"db{number}.lock", "a"))
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            break
        else:
            raise RuntimeError(f"All Redis databases 1-15 are in use ({lock_dir}).")
        url = f"{base_url.rstrip('/')}/{number}"
        client = redis.Redis.from_url(url)
        stack.callback(client.close)
        client.flushdb()
        try:
            yield url
        finally:
            client.flushdb()


def prefect_redis_available() -> bool:
    try:
        import prefect_redis  # noqa: F401
    except ImportError:
        return False
    return True


# Publish each incoming event at once and never from the periodic flush: that
# flush clears the batch after awaiting Redis, losing what was added meanwhile.
REDIS_EVENT_PUBLISHER_ENV = {
    "PREFECT_REDIS_MESSAGING_PUBLISHER_BATCH_SIZE": "1",
    "PREFECT_REDIS_MESSAGING_PUBLISHER_PUBLISH_EVERY": "86400",
}


def redis_messaging_env(redis_url: str) -> dict[str, str]:
    """Server settings that move messaging, ordering, leases and docket to Redis.

    These are the settings of Prefect's self-hosted guide for several
    servers sharing a PostgreSQL database; they need ``prefect-redis``.

    Plus the two README recommends (``REDIS_EVENT_PUBLISHER_ENV``): the
    server's Redis event publisher in prefect-redis 0.3.0 drops events that
    arrive while its periodic flush awaits Redis, which left task runs
    ``Running`` in the API although they had completed.
    """
    return {
        **REDIS_EVENT_PUBLISHER_ENV,
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        "PREFECT_REDIS_MESSAGING_URL": redis_url,
        "PREFECT_SERVER_DOCKET_URL": redis_url,
        "PREFECT_SERVER_DOCKET_NAME": f"prefect-torch-{secrets.token_hex(4)}",
    }


# --- Prefect server ---------------------------------------------------------------

# How long a test keeps retrying a busy server (503, or a read that timed out).
BUSY_RETRY_SECONDS = 90.0


@dataclass
class PrefectServer:
    """A running ``prefect server start``.

    ``env`` is the environment for client subprocesses (workers, flows,
    ``prefect`` commands): no inherited ``PREFECT_*`` setting, plus
    ``PREFECT_API_URL``, ``PREFECT_HOME`` (a client home of its own),
    ``PREFECT_SERVER_ANALYTICS_ENABLED=false`` and
    ``PREFECT_WORKER_QUERY_SECONDS=1``.
    """

    api_url: str
    env: dict[str, str]
    home: Path
    database_url: str
    redis_url: str | None
    process: ManagedProcess
    workdir: Path
    _http: httpx.Client = field(repr=False)

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the REST API (``path`` relative to ``/api``); return its JSON.

        Retries for up to ``BUSY_RETRY_SECONDS`` what a loaded server answers
        as Prefect's own client retries it: 503 (a SQLite server's database
        was locked; nothing was written) and, for reads only, a timeout.
        """
        deadline = time.monotonic() + BUSY_RETRY_SECONDS
        reading = method == "GET" or path.rstrip("/").endswith(("/filter", "/count"))
        delay = 0.5
        while True:
            try:
                response = self._http.request(method, path.lstrip("/"), **kwargs)
            except httpx.TimeoutException:
                if not reading or time.monotonic() > deadline:
                    raise
            else:
                if response.status_code != 503 or time.monotonic() > deadline:
                    response.raise_for_status()
                    return response.json() if response.content else None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def prefect(
        self, *args: str, timeout: float = 120, check: bool = True, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a ``prefect`` command against this server."""
        result = subprocess.run(
            [prefect_executable(), *args],
            env=self.env,
            cwd=cwd or self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"prefect {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def python(
        self, code: str, *args: str, timeout: float = 120, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run Python ``code`` in a subprocess with ``env``; fail on non-zero exit."""
        result = subprocess.run(
            [sys.executable, "-c", code, *args],
            env=self.env,
            cwd=cwd or self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"python exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def wait_for_flow_runs(
        self, flow_run_ids: Sequence[str], timeout: float = 120
    ) -> dict[str, dict[str, Any]]:
        """Poll until every flow run is in a final state; return them by id."""
        runs: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while True:
            found = self.request(
                "POST",
                "/flow_runs/filter",
                json={"flow_runs": {"id": {"any_": list(flow_run_ids)}}, "limit": 200},
            )
            runs = {run["id"]: run for run in found}
            if len(runs) == len(flow_run_ids) and all(
                run["state_type"] in FINAL_STATE_TYPES for run in runs.values()
            ):
                return runs
            if time.monotonic() > deadline:
                states = {i: runs.get(i, {}).get("state_type") for i in flow_run_ids}
                raise TimeoutError(f"Flow runs not final after {timeout} s: {states}")
            time.sleep(0.5)


@contextmanager
def prefect_server(
    workdir: Path,
    *,
    database_url: str | None = None,
    redis_url: str | None = None,
    extra_env: Mapping[str, str] | None = None,
    startup_timeout: float = 180,
) -> Iterator[PrefectServer]:
    """Run ``prefect server start`` on a free loopback port until the block ends.

    Args:
        workdir: An empty folder for this server: its ``PREFECT_HOME``, a
            client home, and the log files.
        database_url: ``PREFECT_SERVER_DATABASE_CONNECTION_URL``; default
            SQLite in the server's home.
        redis_url: A Redis database for messaging (``redis_messaging_env``);
            needs ``prefect-redis``.
        extra_env: More settings for the server process.
        startup_timeout: Seconds to wait for ``/api/health``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    server_home = workdir / "server-home"
    client_home = workdir / "client-home"
    server_home.mkdir(exist_ok=True)
    client_home.mkdir(exist_ok=True)
    database_url = database_url or f"sqlite+aiosqlite:///{server_home / 'prefect.db'}"
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"

    server_env = base_env(
        PREFECT_HOME=str(server_home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=database_url,
        # INFO shows the server services (event recorder, messaging) when debugging a test.
        PREFECT_SERVER_LOGGING_LEVEL=os.environ.get("PREFECT_TORCH_TEST_SERVER_LOGGING_LEVEL", "WARNING"),
    )
    if redis_url is not None:
        server_env.update(redis_messaging_env(redis_url))
    server_env.update(extra_env or {})

    client_env = base_env(
        PREFECT_API_URL=api_url,
        PREFECT_HOME=str(client_home),
        PREFECT_WORKER_QUERY_SECONDS="1",
    )
    args = [
        prefect_executable(), "server", "start", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with ExitStack() as stack:
        process = stack.enter_context(
            managed_process(args, server_env, workdir / "server.log", cwd=workdir)
        )
        http = stack.enter_context(httpx.Client(base_url=api_url + "/", timeout=30))
        _wait_for_health(http, process, startup_timeout)
        yield PrefectServer(
            api_url=api_url,
            env=client_env,
            home=server_home,
            database_url=database_url,
            redis_url=redis_url,
            process=process,
            workdir=workdir,
            _http=http,
        )


def _wait_for_health(http: httpx.Client, process: ManagedProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(
                f"prefect server exited {process.popen.returncode} while starting:\n"
                + process.log_tail()
            )
        try:
            if http.get("health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError(
        f"prefect server not healthy after {timeout} s:\n" + process.log_tail()
    )


# --- Prefect workers ----------------------------------------------------------------


@dataclass
class PrefectWorker:
    """A running ``prefect worker start``, registered with its server."""

    name: str
    pool: str
    process: ManagedProcess


@contextmanager
def prefect_worker(
    server: PrefectServer,
    pool: str,
    *,
    worker_type: str = "process",
    name: str | None = None,
    limit: int | None = None,
    extra_env: Mapping[str, str] | None = None,
    startup_timeout: float = 120,
) -> Iterator[PrefectWorker]:
    """Create work pool ``pool`` if missing and run a worker on it.

    Yields once the worker has sent its first heartbeat to the server.
    """
    name = name or f"{pool}-worker-{secrets.token_hex(3)}"
    if not _work_pool_exists(server, pool):
        server.prefect("work-pool", "create", pool, "--type", worker_type)
    args = [
        prefect_executable(), "worker", "start", "--pool", pool,
        "--type", worker_type, "--name", name,
    ]  # fmt: skip
    if limit is not None:
        args += ["--limit", str(limit)]
    env = {**server.env, **(extra_env or {})}
    log_path = server.workdir / f"worker-{name}.log"
    with managed_process(args, env, log_path, cwd=server.workdir) as process:
        _wait_for_worker(server, pool, name, process, startup_timeout)
        yield PrefectWorker(name=name, pool=pool, process=process)


def _work_pool_exists(server: PrefectServer, pool: str) -> bool:
    try:
        server.request("GET", f"/work_pools/{pool}")
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 404:
            return False
        raise
    return True


def _wait_for_worker(
    server: PrefectServer, pool: str, name: str, process: ManagedProcess, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(
                f"prefect worker exited {process.popen.returncode} while starting:\n"
                + process.log_tail()
            )
        workers = server.request("POST", f"/work_pools/{pool}/workers/filter", json={})
        if any(worker["name"] == name for worker in workers):
            return
        time.sleep(0.5)
    raise TimeoutError(f"worker {name} not registered after {timeout} s:\n" + process.log_tail())
