"""The warm process: import once, then fork one child per command.

    python -c "from prefect_torch.warm.server import run; run(['KEY'])"

(``warm.client`` starts it so, after a command that ran in its own process.)

It is single-threaded on purpose (a fork copies only the calling thread), and
it never runs a flow or a torch operation itself. One ``selectors`` loop
watches the listening socket and each command's connection; children are
reaped by polling ``wait4``, which also gives their peak memory.

A command whose connection closes while its child runs (the ``prefect-torch``
process was killed, even with SIGKILL) has its child's process group killed:
the work dies with the command that asked for it, as it would have in-process.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from prefect_torch.warm import place
from prefect_torch.warm.child import become_command


def warm_up() -> None:
    """The imports a training command makes, so no command pays them again."""
    import pandas  # noqa: F401
    import prefect.flow_engine  # noqa: F401
    import prefect.task_engine  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    # Building the first optimizer imports dynamo (Optimizer.add_param_group is
    # wrapped in torch._disable_dynamo): about a second, once, here.
    import torch._dynamo  # noqa: F401

    import prefect_torch.cli  # noqa: F401
    import prefect_torch.engine.data  # noqa: F401
    import prefect_torch.engine.peek  # noqa: F401
    import prefect_torch.runtime  # noqa: F401
    from prefect_torch.flows import stepwise_train_flow, train_flow  # noqa: F401


@dataclass
class Command:
    connection: socket.socket
    pid: int
    started: float = field(default_factory=time.monotonic)


class WarmServer:
    def __init__(self, key: str, environ: dict[str, str]):
        self.key = key
        self.path = place.socket_path(environ, key)
        self.pid_file = place.pid_path(environ, key)
        self.idle_seconds = place.idle_seconds(environ)
        self.home = environ.get("PREFECT_HOME")
        self.code = place.code_stamp()
        self.selector = selectors.DefaultSelector()
        self.commands: dict[int, Command] = {}  # by child pid
        self.last_active = time.monotonic()
        self.listener: socket.socket | None = None
        self.stop_reason: str | None = None

    def stop(self, reason: str) -> None:
        """Take no more commands; leave once those running have ended (``prefect-torch
        warm stop`` sends SIGTERM: the commands carry on and still get their exit status)."""
        self.stop_reason = reason
        self._leave()
        if self.listener is not None:
            self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None

    def bind(self) -> None:
        """Listen on a temporary name, then rename onto the real one, so a client never
        connects to a socket nobody is about to accept on."""
        partial = self.path.with_suffix(f".{os.getpid()}.partial")
        partial.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(partial))
        listener.listen(16)
        os.replace(partial, self.path)
        self.inode = self.path.stat().st_ino
        self.listener = listener
        self.selector.register(listener, selectors.EVENT_READ, "accept")

    def serve_forever(self) -> None:
        checked = time.monotonic()
        while True:
            timeout = 0.05 if self.commands else 1.0
            try:
                for key, _ in self.selector.select(timeout):
                    if key.data == "accept" and self.listener is not None:
                        self._accept()
                    elif key.data != "accept":
                        self._connection_event(key.fileobj)  # type: ignore[arg-type]
                self._reap()
            except Exception:  # noqa: BLE001 - one bad request must not end the commands it serves
                traceback.print_exc()
            now = time.monotonic()
            if not self.commands and (self.stop_reason or now - checked >= 1.0):
                checked = now
                reason = self.stop_reason or self._reason_to_leave(now)
                if reason:
                    print(f"warm process {self.key} exits: {reason}", file=sys.stderr, flush=True)
                    self._leave()
                    return

    def _reason_to_leave(self, now: float) -> str | None:
        if now - self.last_active > self.idle_seconds:
            return f"idle for {self.idle_seconds:.0f} s"
        try:
            if self.path.stat().st_ino != self.inode:
                return "another warm process took over its socket"
        except OSError:
            return "its socket was removed"
        if self.home and not os.path.isdir(self.home):
            return f"its PREFECT_HOME {self.home} was removed"
        if place.code_stamp() != self.code:
            return "the installed code changed"
        return None

    def _leave(self) -> None:
        """Remove the socket and pid file, unless another warm process has taken them since."""
        try:
            if self.path.stat().st_ino == self.inode:
                self.path.unlink()
        except OSError:
            pass
        try:
            if self.pid_file.read_text().strip() == str(os.getpid()):
                self.pid_file.unlink()
        except (OSError, ValueError):
            pass

    def _accept(self) -> None:
        assert self.listener is not None
        connection, _ = self.listener.accept()
        self.last_active = time.monotonic()
        try:
            request, fds = _receive_request(connection)
        except (OSError, ValueError) as exc:  # PermissionError included
            print(f"refused a request: {exc}", file=sys.stderr, flush=True)
            connection.close()
            return
        pid = os.fork()
        if pid == 0:  # the child never returns from here
            become_command(request, fds, close=[self.selector, self.listener, connection, *self._connections()])
        for fd in fds:
            os.close(fd)
        self.commands[pid] = Command(connection, pid)
        self.selector.register(connection, selectors.EVENT_READ, pid)
        try:
            _send(connection, {"started": pid})
        except OSError:  # the client is gone already: its command goes with it
            _kill_group(pid)

    def _connections(self) -> list[socket.socket]:
        return [command.connection for command in self.commands.values()]

    def _connection_event(self, connection: socket.socket) -> None:
        """A command's connection is only ever read for its end: the client is gone."""
        try:
            data = connection.recv(64)
        except OSError:
            data = b""
        if data:
            return
        for command in self.commands.values():
            if command.connection is connection:
                _kill_group(command.pid)
        self.selector.unregister(connection)

    def _reap(self) -> None:
        for pid in list(self.commands):
            try:
                done, status, usage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:
                done, status, usage = pid, 0, None
            if done == 0:
                continue
            command = self.commands.pop(pid)
            self.last_active = time.monotonic()
            outcome = {"exit": os.waitstatus_to_exitcode(status),
                       "peak_rss_kb": getattr(usage, "ru_maxrss", None),
                       "seconds": round(time.monotonic() - command.started, 3), "warm_pid": os.getpid()}
            _kill_group(pid)  # what the command left running in its group dies with it
            try:
                self.selector.unregister(command.connection)
            except (KeyError, ValueError):
                pass
            try:
                _send(command.connection, outcome)
            except OSError:
                pass
            command.connection.close()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _receive_request(connection: socket.socket) -> tuple[dict, list[int]]:
    """The command's JSON and its three descriptors; only from this user."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", credentials)
    if uid != os.getuid():
        raise PermissionError(f"a process of user {uid} connected; only {os.getuid()} may")
    connection.settimeout(10)
    data, fds, _, _ = socket.recv_fds(connection, 1 << 16, place.HANDED_OVER)
    try:
        if len(fds) != place.HANDED_OVER or len(data) < place.HEADER.size:
            raise ValueError(f"expected {place.HANDED_OVER} descriptors and a header, got {len(fds)}")
        (length,) = place.HEADER.unpack_from(data)
        body = data[place.HEADER.size:]
        while len(body) < length:
            chunk = connection.recv(length - len(body))
            if not chunk:
                raise ValueError("the request ended early")
            body += chunk
        connection.settimeout(None)
        return json.loads(body), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _send(connection: socket.socket, message: dict) -> None:
    connection.sendall(json.dumps(message).encode() + b"\n")


def main(argv: list[str]) -> int:
    key = argv[0]
    environ = dict(os.environ)
    started = time.perf_counter()
    try:
        warm_up()
    except Exception as exc:  # noqa: BLE001 - the commands themselves will report it
        return _refuse(environ, key, f"the imports failed: {exc!r}")
    extra_threads = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if extra_threads:  # a fork copies only this thread: a child could wait forever on their locks
        return _refuse(environ, key, f"the imports started threads {extra_threads}")
    import torch

    if torch.cuda.is_initialized():  # CUDA does not survive a fork: each child must start it itself
        return _refuse(environ, key, "the imports initialised CUDA")
    server = WarmServer(key, environ)
    # A child inherits this handler; it resets it (warm.child).
    signal.signal(signal.SIGTERM, lambda *_: server.stop("asked to stop (SIGTERM)"))
    server.bind()
    print(f"warm process {key} ready in {time.perf_counter() - started:.2f} s on {server.path}",
          file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


def _refuse(environ: dict[str, str], key: str, reason: str) -> int:
    """Say why in the log, and keep commands of this key from starting another."""
    print(f"warm process {key} does not serve: {reason}", file=sys.stderr, flush=True)
    place.refused_path(environ, key).write_text(reason + "\n")
    return 1


def run(argv: list[str]) -> None:
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip tearing down torch and Prefect: nothing is left to write
