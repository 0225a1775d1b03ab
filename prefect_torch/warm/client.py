"""The ``prefect-torch`` command's side of the warm process. Stdlib only.

``run_warm`` hands a command to a warm process when one is ready, or is
starting, for this environment, and returns its exit status; ``None`` means
run the command here. ``start_in_background`` starts one after a command
ran here, so the next command finds it. Neither ever makes a command fail:
anything that goes wrong before the hand-over falls back to running here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from prefect_torch.warm import place

#: Commands that import torch and Prefect; the others are quick on their own.
WARM_COMMANDS = frozenset({"train", "demo", "predict", "sweep"})
#: How long to wait for a warm process that is still importing.
START_WAIT_SECONDS = 120.0

#: Signals passed on to the command. Only to its process, not its group: the
#: command stops its own subprocesses (Prefect's temporary server, DDP workers)
#: in order, which a signal to all of them at once would cut short.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def wants_warm(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command not in WARM_COMMANDS or "-h" in argv or "--help" in argv:
        return False
    return place.enabled(environ)


def run_warm(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int | None:
    environ = os.environ if environ is None else environ
    if not wants_warm(argv, environ):
        return None
    try:
        key = place.warm_key(environ, os.getcwd())
        connection = _connect(environ, key)
    except (OSError, place.UnsafeFolder):
        return None
    if connection is None:
        return None
    with connection:
        return _hand_over(connection, list(argv), environ)


def start_in_background(argv: Sequence[str], environ: Mapping[str, str] | None = None,
                        cwd: str | os.PathLike[str] | None = None) -> None:
    """Start the warm process for commands run with this environment in ``cwd`` (this
    process's folder by default) unless it runs already."""
    environ = os.environ if environ is None else environ
    if not wants_warm(argv, environ):
        return
    try:
        cwd = os.fspath(cwd) if cwd is not None else os.getcwd()
        key = place.warm_key(environ, cwd)
        if _warm_pid(environ, key) is not None or place.refused_path(environ, key).exists():
            return
        with open(place.log_path(environ, key), "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", _SERVER_ENTRY, key], env=dict(environ), stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True, close_fds=True, cwd=cwd,
            )
        pid_file = place.pid_path(environ, key)
        partial = pid_file.with_name(f"{pid_file.name}.{os.getpid()}")
        partial.write_text(str(process.pid))
        os.replace(partial, pid_file)  # never half-written for a command reading it
    except (OSError, place.UnsafeFolder):
        return  # the next command runs here again; nothing is lost


# Not ``-m``: that would put the working folder first on sys.path, and a user's
# module there (a ``prefect.py``, say) would shadow the installed package.
_SERVER_ENTRY = (
    "import sys\n"
    "if sys.path and sys.path[0] == '': del sys.path[0]\n"
    "from prefect_torch.warm.server import run; run(sys.argv[1:])"
)


def _warm_pid(environ: Mapping[str, str], key: str) -> int | None:
    """The pid of the warm process for ``key`` if it is alive (ready or importing)."""
    try:
        pid = int(place.pid_path(environ, key).read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if key.encode() not in cmdline or b"prefect_torch.warm.server" not in cmdline:
        return None
    return pid if process_alive(pid) else None


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs: exists and has not exited (a zombie waiting for a parent
    that started it from Python, as tests do, has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _connect(environ: Mapping[str, str], key: str) -> socket.socket | None:
    path = str(place.socket_path(environ, key))
    deadline = time.monotonic() + START_WAIT_SECONDS
    while True:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(path)
            return connection
        except (FileNotFoundError, ConnectionRefusedError):
            connection.close()
        # Not listening: wait only for a warm process that is still importing.
        if _warm_pid(environ, key) is None or time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _hand_over(connection: socket.socket, argv: list[str], environ: Mapping[str, str]) -> int | None:
    body = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(environ)}).encode()
    payload = place.HEADER.pack(len(body)) + body
    descriptors, opened = _standard_descriptors()
    try:
        sent = socket.send_fds(connection, [payload], descriptors)
        connection.sendall(payload[sent:])
    except OSError:
        return None  # nothing ran yet: run it here
    finally:
        for fd in opened:
            os.close(fd)
    replies = connection.makefile("rb")
    first = replies.readline()
    if not first:
        return None  # refused before anything ran
    pid = json.loads(first)["started"]
    previous = _forward_signals(pid)
    try:
        last = replies.readline()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if not last:
        return _lost(pid)
    outcome = json.loads(last)
    _report(environ, {"warm": True, "pid": pid, **outcome})
    code = outcome["exit"]
    if code < 0:  # died of a signal: so does this process, as the shell expects
        sys.stdout.flush()
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


def _standard_descriptors() -> tuple[list[int], list[int]]:
    """Descriptors 0-2, with /dev/null standing in for any this process lacks."""
    descriptors, opened = [], []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            descriptors.append(fd)
        except OSError:
            stand_in = os.open(os.devnull, os.O_RDWR)
            opened.append(stand_in)
            descriptors.append(stand_in)
    return descriptors, opened


def _forward_signals(pid: int) -> dict:
    def forward(number, _frame):
        try:
            os.kill(pid, number)
        except ProcessLookupError:
            pass

    return {number: signal.signal(number, forward) for number in FORWARDED}


def _lost(pid: int) -> int:
    """The warm process died while the command ran; the command itself may still run."""
    while process_alive(pid):
        time.sleep(0.2)
    print(f"error: the warm process that ran this command ended first, so its exit status is unknown."
          f" Run it again with {place.ENABLE_VARIABLE}=0 to run it in this process.", file=sys.stderr)
    return 1


def _report(environ: Mapping[str, str], outcome: dict) -> None:
    target = environ.get(place.REPORT_VARIABLE)
    if target:
        Path(target).write_text(json.dumps(outcome))


def warm_processes(environ: Mapping[str, str] | None = None) -> list[dict]:
    """This user's warm processes: key, pid and whether it is ready for commands."""
    environ = os.environ if environ is None else environ
    found = []
    for pid_file in sorted(place.socket_folder(environ).glob("*.pid")):
        key = pid_file.stem
        pid = _warm_pid(environ, key)
        if pid is None:
            continue
        found.append({"key": key, "pid": pid, "ready": place.socket_path(environ, key).exists(),
                      "log": str(place.log_path(environ, key))})
    return found


def warm_process(environ: Mapping[str, str], cwd: str | os.PathLike[str]) -> dict | None:
    """The warm process that commands run with ``environ`` in ``cwd`` use, if it runs."""
    key = place.warm_key(environ, os.fspath(cwd))
    return next((p for p in warm_processes(environ) if p["key"] == key), None)


def stop_warm_processes(environ: Mapping[str, str] | None = None, timeout: float = 5.0) -> list[dict]:
    """Stop every warm process of this user; return them. Each takes no new command and
    leaves once the commands it runs have ended (they carry on, as their own processes would)."""
    return stop(warm_processes(environ), timeout)


def stop(processes: list[dict], timeout: float = 5.0) -> list[dict]:
    """Stop these warm processes (as ``warm_processes`` lists them); see ``stop_warm_processes``."""
    stopping = list(processes)
    for process in stopping:
        try:
            os.kill(process["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(process_alive(p["pid"]) for p in stopping):
        time.sleep(0.05)
    return stopping
