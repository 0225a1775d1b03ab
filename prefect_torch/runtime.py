"""Run flows from a command line on the embedded default Prefect.

With no ``PREFECT_API_URL`` set, Prefect 3 starts a temporary API server as a
subprocess on first use and stops it at interpreter exit. Out of the box that
has three problems for a command-line tool, each handled here:

Shutdown noise and lost history
    Prefect stops the temporary server from an ``atexit`` hook right after the
    client has pushed its last events. The server's task-run recorder is then
    still working through them (about 100 events a second with its default
    batch size of 1), so the ``SIGTERM`` cancels it mid-write: it logs
    ``Error flushing N events`` with a ``CancelledError`` traceback, and the
    task runs it had not written yet stay ``Running`` in the database forever.
    ``quiet_embedded_prefect`` shuts down in order instead: drain the client's
    event and log workers, wait until the server has recorded every task run
    of this session, then stop the server. The server's own stderr passes
    through a relay that forwards it unchanged while the server runs and only
    holds back what it prints once it has been told to stop (logged at DEBUG,
    never dropped silently). The user's flow logs are never filtered.

Concurrent first start
    Each process starts its own temporary server on the same SQLite database,
    and each server runs the Alembic migrations in its startup (the lifespan
    of ``prefect.server.api.server.create_app``). Processes that start at the
    same moment on a fresh ``PREFECT_HOME`` race: two run the same migration
    (``duplicate column name``), the loser's server fails to start with a
    traceback, and on two busy cores Prefect's 20 s start-up timeout expires
    for all of them while they wait on each other's locks. The temporary
    server is started under an exclusive ``fcntl`` lock on a file in
    ``PREFECT_HOME``, held until the server answers ``/api/health`` (by then
    its migrations and block registration are done).

Defaults for command-line users
    ``configure_cli_environment`` turns off the server's analytics (they fail
    noisily without internet), gives the first start (migrations take ~12 s on
    two cores) enough time, batches the task-run recorder and picks a writable
    ``PREFECT_HOME``; every value the user set (environment, profile, or
    ``prefect.toml``) wins.

A running server first
    With ``PREFECT_API_URL`` set (environment or profile) the command uses
    that server. Without it, a ``prefect server start --background`` under the
    same ``PREFECT_HOME`` is found by the pid file Prefect writes there
    (``server.pid``: the pid of its uvicorn process, whose command line holds
    ``--host`` and ``--port``) and used if it answers ``/api/health``. Either
    way the command skips the temporary server's start (9-13 s) and prints the
    run's URL in the UI; with the temporary server it says once, after the
    run, how to get a persistent one.

A Prefect home this Prefect cannot use
    Before a temporary server starts, its SQLite database is opened read-only
    with a short timeout and its Alembic revision compared with the installed
    Prefect's migration scripts. A database migrated by a newer Prefect, a
    locked one or a corrupt one raises ``PrefectHomeError`` (one line: the
    cause and the fix) instead of the server's retry storm of start-up
    tracebacks ending in a time-out.

This module imports Prefect but not torch.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import re
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

import httpx
import prefect
import prefect.context
from prefect.logging import get_logger
from prefect.settings import get_current_settings

from prefect_torch._prefect_defaults import (
    LIBRARY_ENVIRONMENT_DEFAULTS,
    apply_library_defaults,
    settings_set_by_user,
)
from prefect_torch.errors import PrefectHomeError

try:  # POSIX only; elsewhere concurrent first starts are not serialised.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = get_logger("prefect_torch.runtime")

R = TypeVar("R")

#: Environment defaults for command-line use. A value the user set wins.
CLI_ENVIRONMENT_DEFAULTS: Mapping[str, str] = {
    # The temporary server's telemetry needs the internet; without it every
    # start logs "Failed to send telemetry" at ERROR.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Prefect's 20 s covers a warm start; a first start runs every migration.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # Record task runs in bulk: with the default batch of one the recorder
    # lags a per-batch training flow by tens of seconds.
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
}

#: File in ``PREFECT_HOME`` locked while a temporary server starts.
SERVER_START_LOCK_NAME = ".prefect-torch-server-start.lock"

_FINAL_STATE_TYPES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def configure_cli_environment(
    prefect_home: str | os.PathLike[str] | None = None,
    environ: MutableMapping[str, str] | None = None,
) -> dict[str, str]:
    """Apply the command-line defaults and make Prefect re-read its settings.

    Args:
        prefect_home: Use this folder as ``PREFECT_HOME`` (an explicit choice,
            e.g. a ``--prefect-home`` option, so it overrides the environment).
            Without it a ``PREFECT_HOME`` the user set is kept, then Prefect's
            default ``~/.prefect`` if it is writable, else a per-user folder
            under the temporary directory.
        environ: The environment to update; ``os.environ`` by default.

    Returns:
        The variables this call set, so a caller can show or undo them.
    """
    environ = os.environ if environ is None else environ
    user_set = _settings_set_by_user(environ)
    applied: dict[str, str] = {}

    if prefect_home is not None:
        applied["PREFECT_HOME"] = str(Path(prefect_home).expanduser().resolve())
    elif "PREFECT_HOME" not in user_set:
        home = _default_prefect_home()
        if home is not None:
            applied["PREFECT_HOME"] = str(home)

    for name, value in CLI_ENVIRONMENT_DEFAULTS.items():
        if name not in user_set:
            applied[name] = value

    applied = {k: v for k, v in applied.items() if environ.get(k) != v}
    environ.update(applied)
    if applied and environ is os.environ:
        prefect.context.refresh_global_settings_context()
    return applied


_settings_set_by_user = settings_set_by_user


def _default_prefect_home() -> Path | None:
    """``None`` keeps Prefect's default home; a path replaces an unusable one."""
    default = Path("~/.prefect").expanduser()
    if _is_writable_dir(default):
        return None
    fallback = Path(tempfile.gettempdir()) / f"prefect-torch-{os.getuid()}" / "prefect"
    fallback.mkdir(mode=0o700, parents=True, exist_ok=True)
    logger.warning(
        "Prefect's home %s is not writable; using %s. Set PREFECT_HOME to choose.",
        default,
        fallback,
    )
    return fallback


def _is_writable_dir(path: Path) -> bool:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


@contextmanager
def quiet_embedded_prefect(*, settle_timeout: float = 60.0) -> Iterator[None]:
    """Run flows on the embedded default Prefect and shut it down cleanly.

    Wrap every flow call of a command in it. It applies
    ``configure_cli_environment``; when no ``PREFECT_API_URL`` is set, the
    temporary server Prefect starts on first use is started under the
    first-start lock, and on exit the client workers are drained, the server
    is given up to ``settle_timeout`` seconds to record this session's task
    runs, and is stopped without printing shutdown tracebacks. With an API URL
    set it only drains the client workers on exit.

    The server stays up for the whole block, so several flows share it.
    """
    configure_cli_environment()
    use_running_server()
    server = None
    if not get_current_settings().api.url:
        settings = get_current_settings()
        with _exclusive_lock(settings.home / SERVER_START_LOCK_NAME):
            check_prefect_home(settings)
        server = _install_quiet_server()
    since = datetime.now(timezone.utc) - timedelta(seconds=1)
    interrupted = False
    try:
        yield
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        try:
            _drain_client_workers()
            if server is not None and server.running and not interrupted:
                _wait_until_recorded(since, timeout=settle_timeout)
        except Exception:  # the flow's outcome matters more than bookkeeping
            logger.warning("Could not wait for Prefect to record the run.", exc_info=True)
        finally:
            if server is not None:
                _release_quiet_server(server)


def run_cli_flow(flow: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    """Call ``flow(*args, **kwargs)`` inside ``quiet_embedded_prefect``.

    Returns what the flow returns (async flows are run to completion) and lets
    its exceptions through for the command to report.

    If the flow ran on a server with a UI (``PREFECT_API_URL``, or a
    background server found under ``PREFECT_HOME``) it prints the run's URL
    there; if this call started Prefect's temporary server it says once,
    after the run, how to keep a server running instead.
    """
    from prefect import Flow

    outer = _owned_temporary_server()
    owns_server = outer is None or not outer.running  # else an enclosing block says it
    with quiet_embedded_prefect():
        temporary = not get_current_settings().api.url
        if not isinstance(flow, Flow):
            result = flow(*args, **kwargs)
            if inspect.isawaitable(result):
                result = asyncio.run(_await(result))
            return result
        state = flow(*args, return_state=True, **kwargs)
        if inspect.isawaitable(state):
            state = asyncio.run(_await(state))
        url = flow_run_ui_url(state.state_details.flow_run_id)
        if url:
            print(f"flow run in the Prefect UI: {url}", flush=True)
        result = state.result()
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
    if temporary and owns_server:
        print(PERSISTENT_SERVER_HINT, file=sys.stderr, flush=True)
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


#: Said once after a command that started Prefect's temporary server.
PERSISTENT_SERVER_HINT = (
    "Prefect ran a temporary server for this command. For runs that stay"
    " visible in the UI and commands that start faster, keep one running:"
    " `PREFECT_SERVER_ANALYTICS_ENABLED=false prefect server start --background`"
    " (same PREFECT_HOME), then open http://127.0.0.1:4200."
)


def flow_run_ui_url(flow_run_id: Any) -> str | None:
    """The flow run's page in the Prefect UI, or ``None`` without a UI."""
    ui_url = get_current_settings().ui_url
    if not ui_url or flow_run_id is None:
        return None
    return f"{str(ui_url).rstrip('/')}/runs/flow-run/{flow_run_id}"


def _owned_temporary_server() -> Any:
    """The quiet temporary server an enclosing block started, if any."""
    current = _default_temporary_server()
    if current is None:
        return None  # checked first: building the quiet class would import the server package
    return current if isinstance(current, _quiet_server_class()) else None


# --- a server that is already running ---------------------------------------

#: The file ``prefect server start --background`` writes in ``PREFECT_HOME``.
BACKGROUND_SERVER_PID_FILE = "server.pid"


def use_running_server(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Point Prefect at a running server if there is one; return its API URL.

    ``PREFECT_API_URL`` (environment, profile or toml) wins. Otherwise a
    background server of the same ``PREFECT_HOME`` that answers its health
    check is used: ``PREFECT_API_URL`` is set for this process (and the
    processes it starts). ``None`` when there is none: Prefect will start its
    temporary server.
    """
    environ = os.environ if environ is None else environ
    settings = get_current_settings()
    if settings.api.url:
        return str(settings.api.url)
    api_url = background_server_url(settings.home)
    if api_url is None:
        return None
    environ["PREFECT_API_URL"] = api_url
    if environ is os.environ:
        prefect.context.refresh_global_settings_context()
    logger.debug("Using the Prefect server running in the background at %s.", api_url)
    return api_url


def background_server_url(home: Path, timeout: float = 5.0) -> str | None:
    """API URL of a healthy ``prefect server start --background`` under ``home``."""
    try:
        pid = int((Path(home) / BACKGROUND_SERVER_PID_FILE).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None  # no pid file, or a stale one
    server = get_current_settings().server.api
    host, port = str(server.host), int(server.port)
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # not Linux: the settings' host and port
        argv = []
    for flag, value in zip(argv, argv[1:]):
        if flag == "--host":
            host = value
        elif flag == "--port" and value.isdigit():
            port = int(value)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    api_url = f"http://{host}:{port}/api"
    try:
        healthy = httpx.get(f"{api_url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        healthy = False
    return api_url if healthy else None


# --- the Prefect home's database ------------------------------------------


def check_prefect_home(settings: Any = None, timeout: float = 5.0) -> None:
    """Raise ``PrefectHomeError`` if a temporary server could not use its database.

    Looks at the SQLite database the temporary server would open (PostgreSQL
    and in-memory databases are left to Prefect): its Alembic revision must
    be one of the installed Prefect's migrations (else a newer Prefect
    migrated it), and it must open read-only within ``timeout`` seconds
    (else it is locked) and read as a database (else it is corrupt). A
    missing or empty database is fine: the server creates it.
    """
    settings = settings or get_current_settings()
    path = _sqlite_database_path(settings)
    if path is None or not path.exists() or path.stat().st_size == 0:
        return
    elsewhere = "or point PREFECT_HOME at another folder (e.g. export PREFECT_HOME=~/.prefect-torch)"
    try:
        connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=timeout)
        try:
            tables = connection.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name='alembic_version'"
            ).fetchall()
            revisions = (
                [row[0] for row in connection.execute("SELECT version_num FROM alembic_version")]
                if tables
                else []
            )
        finally:
            connection.close()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise PrefectHomeError(
                f"Prefect's database {path} is locked by another process ({exc}). Stop the process"
                f" that holds it (another Prefect server or run), {elsewhere}."
            ) from None
        raise PrefectHomeError(
            f"Prefect's database {path} cannot be opened ({exc}). Check its permissions, {elsewhere}."
        ) from None
    except sqlite3.DatabaseError as exc:
        raise PrefectHomeError(
            f"Prefect's database {path} is corrupt ({exc}). Move it away (Prefect creates a new,"
            f" empty one), {elsewhere}."
        ) from None
    known = _known_migrations(path.name)
    unknown = [revision for revision in revisions if revision not in known]
    if known and unknown:
        raise PrefectHomeError(
            f"Prefect's database {path} was migrated by a newer Prefect (revision {unknown[0]} is"
            f" unknown to the installed Prefect {prefect.__version__}). Upgrade Prefect"
            f" (pip install -U prefect), {elsewhere}."
        )


def _sqlite_database_path(settings: Any) -> Path | None:
    secret = settings.server.database.connection_url
    url = secret.get_secret_value() if hasattr(secret, "get_secret_value") else secret
    if not url:
        return Path(settings.home) / "prefect.db"
    match = re.match(r"sqlite(?:\+\w+)?:///(.*)$", str(url))
    if match is None:
        return None  # PostgreSQL: Prefect reports its own connection errors
    location = unquote(match.group(1).split("?", 1)[0])
    if not location or location == ":memory:" or location.startswith("file::memory:"):
        return None
    return Path(location).expanduser()


def _known_migrations(_db_name: str = "") -> frozenset[str]:
    """Alembic revisions of the installed Prefect's SQLite migration scripts."""
    folder = Path(prefect.__file__).parent / "server" / "database" / "_migrations" / "versions" / "sqlite"
    pattern = re.compile(r"^revision\s*=\s*[\"']([0-9a-zA-Z_]+)[\"']", re.MULTILINE)
    found = set()
    for script in folder.glob("*.py"):
        match = pattern.search(script.read_text(errors="replace"))
        if match:
            found.add(match.group(1))
    return frozenset(found)


# --- the temporary server -------------------------------------------------


def _temporary_server_class() -> Any:
    # Imported on demand: Prefect's server package takes seconds to import, and a
    # command that uses a running server (or only checks its input) never needs it.
    from prefect.server.api.server import SubprocessASGIServer

    return SubprocessASGIServer


def _default_temporary_server() -> Any:
    """The temporary server Prefect's clients start on demand, if one was made."""
    if "prefect.server.api.server" not in sys.modules:
        return None  # nothing imported Prefect's server code, so no temporary server exists
    return _temporary_server_class()._instances.get(None)


@functools.cache
def _quiet_server_class() -> Any:
    """The class is built on first use, so Prefect's server package is imported only then."""
    SubprocessASGIServer = _temporary_server_class()

    class _QuietTemporaryServer(SubprocessASGIServer):
        """Prefect's temporary server, started under a lock and stopped quietly.

        Registered as the default instance (``SubprocessASGIServer()``), which is
        the one Prefect's clients start on demand: the same hook
        ``prefect.testing.utilities.prefect_test_harness`` uses.
        """

        def __init__(self, port: int | None = None):
            super().__init__(port)
            if not hasattr(self, "_relays"):
                self._relays: list[_OutputRelay] = []

        def start(self, timeout: int | None = None) -> None:
            if self.running:
                return
            with _exclusive_lock(get_current_settings().home / SERVER_START_LOCK_NAME):
                super().start(timeout)

        def _run_uvicorn_command(self) -> Any:
            relay = _OutputRelay()
            try:
                with relay.as_child_stderr():
                    process = super()._run_uvicorn_command()
            except BaseException:
                relay.discard()
                raise
            relay.start()
            self._relays.append(relay)
            return process

        def stop(self) -> None:
            for relay in self._relays:
                relay.hold_back()
            try:
                super().stop()
            finally:
                held = b"".join(relay.close() for relay in self._relays)
                self._relays.clear()
                if held.strip():
                    logger.debug(
                        "Temporary server output after it was told to stop:\n%s",
                        held.decode(errors="replace").rstrip(),
                    )

    return _QuietTemporaryServer


def _install_quiet_server() -> Any:
    """Make a quiet server Prefect's default one; ``None`` if another owns it.

    An enclosing ``quiet_embedded_prefect`` owns the quiet server already;
    a plain one already running stays as Prefect runs it.
    """
    quiet_server = _quiet_server_class()
    current = _default_temporary_server()
    if isinstance(current, quiet_server):
        return None
    if current is not None:
        if current.running:
            logger.debug("A temporary server already runs; shutdown stays Prefect's.")
            return None
        del _temporary_server_class()._instances[None]
    return quiet_server()


def _release_quiet_server(server: Any) -> None:
    if server.running:
        server.stop()
    elif _default_temporary_server() is server:
        del _temporary_server_class()._instances[None]


class _OutputRelay:
    """Carries a child's stderr to ours until told to hold it back.

    The child inherits the write end of a pipe as its fd 2; a thread copies
    what arrives to this process's fd 2 (where the child would have written)
    or, once ``hold_back`` is called, keeps it for ``close`` to return.
    """

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        self._holding = threading.Event()
        self._held: list[bytes] = []
        self._thread = threading.Thread(
            target=self._pump, name="prefect-torch-server-stderr", daemon=True
        )

    @contextmanager
    def as_child_stderr(self) -> Iterator[None]:
        """Point fd 2 at the pipe while a child process is spawned."""
        saved = os.dup(2)
        os.dup2(self._write_fd, 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(self._write_fd)  # the child holds its own copy

    def start(self) -> None:
        self._thread.start()

    def discard(self) -> None:
        """Close the pipe of a child that was never spawned."""
        os.close(self._read_fd)

    def hold_back(self) -> None:
        self._holding.set()

    def close(self, timeout: float = 5.0) -> bytes:
        """Wait for the child's end of the pipe to close; return what was held."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return b"".join(self._held)

    def _pump(self) -> None:
        with os.fdopen(self._read_fd, "rb", buffering=0) as pipe:
            for line in iter(pipe.readline, b""):
                if self._holding.is_set():
                    self._held.append(line)
                else:
                    _write_all(2, line)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except OSError:  # our stderr is gone; nothing left to tell
            return
        view = view[written:]


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive inter-process lock on ``path`` (created if missing)."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info(
                "Waiting for another process to finish starting its Prefect server"
                " on %s...",
                path.parent,
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- orderly shutdown -----------------------------------------------------


def _drain_client_workers(timeout: float = 30.0) -> None:
    """Send every event and log this process still holds to the API."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (EventsWorker, APILogWorker):
        worker.drain_all(timeout=timeout, at_exit=False)


def _wait_until_recorded(since: datetime, timeout: float) -> bool:
    """Wait until the server has recorded the task runs of flow runs since ``since``.

    The server's task-run recorder writes task runs from the client's events
    in batches. It is done when the count of task runs and of those in a
    final state stop changing for longer than one flush interval; if they
    stop changing with some not final (a crashed flow leaves them so) it is
    done a little later. Returns whether it settled before ``timeout``.
    """
    from prefect.client.orchestration import get_client

    recorder = get_current_settings().server.services.task_run_recorder
    flush_every = 0 if recorder.batch_size == 1 else int(recorder.flush_interval)
    quiet = flush_every + 0.5
    stalled = quiet + 2.0
    deadline = time.monotonic() + timeout
    flow_runs = {"expected_start_time": {"after_": since.isoformat()}}
    final = {"state": {"type": {"any_": list(_FINAL_STATE_TYPES)}}}

    with get_client(sync_client=True) as client:

        def count(task_runs: dict[str, Any] | None = None) -> int:
            body = {"flow_runs": flow_runs, "task_runs": task_runs}
            return int(client.request("POST", "/task_runs/count", json=body).json())

        last: tuple[int, int] | None = None
        changed_at = time.monotonic()
        while time.monotonic() < deadline:
            seen = (count(), count(final))
            now = time.monotonic()
            if seen != last:
                last, changed_at = seen, now
            elif now - changed_at >= (quiet if seen[0] == seen[1] else stalled):
                return True
            time.sleep(0.2)
    logger.warning(
        "The Prefect server had not recorded every task run after %.0f s; "
        "stopping it anyway.",
        timeout,
    )
    return False


__all__ = [
    "BACKGROUND_SERVER_PID_FILE",
    "CLI_ENVIRONMENT_DEFAULTS",
    "LIBRARY_ENVIRONMENT_DEFAULTS",
    "PERSISTENT_SERVER_HINT",
    "apply_library_defaults",
    "background_server_url",
    "check_prefect_home",
    "flow_run_ui_url",
    "use_running_server",
    "SERVER_START_LOCK_NAME",
    "configure_cli_environment",
    "quiet_embedded_prefect",
    "run_cli_flow",
]
