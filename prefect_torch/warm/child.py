"""What a forked child of the warm process does to become the client's command.

It takes over the command's standard descriptors, folder, environment and
arguments, and reads again everything that was read from the warm process's
own: Prefect's settings (environment, profile, ``prefect.toml`` and ``.env``
of the folder) and its logging configuration (whose console handler must
write to this command's stderr, in colour if that is a terminal). Then it
runs ``prefect_torch.cli.main`` and exits the way the interpreter would:
status from ``SystemExit``, a traceback and status 1 for an uncaught
exception, death by SIGINT after a ``KeyboardInterrupt``.
"""

from __future__ import annotations

import atexit
import io
import os
import signal
import sys
import threading
import traceback
from typing import NoReturn, Protocol

from prefect_torch.exiting import exit_without_teardown, flush_standard_streams


class Closable(Protocol):
    def close(self) -> None: ...


def become_command(request: dict, fds: list[int], close: list[Closable]) -> NoReturn:
    code = 1
    try:
        os.setsid()  # a process group of its own, killed as a whole if the command goes away
        for inherited in close:  # the warm process's sockets and selector
            inherited.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGCHLD", "SIGQUIT"):
            signal.signal(getattr(signal, name), signal.default_int_handler if name == "SIGINT" else signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["prefect-torch", *request["argv"]]
        _reopen_standard_streams()
        _read_settings_again()
        code = _run(request["argv"])
    except BaseException:  # noqa: BLE001 - nothing may escape into the warm process's loop
        traceback.print_exc()
    finally:
        _exit(code)


def _reopen_standard_streams() -> None:
    """New ``sys.std*`` objects on fds 0-2, buffered the way Python buffers them at
    start-up for what the descriptors now are (a terminal is line-buffered)."""
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    encoding = os.environ.get("PYTHONIOENCODING", "").split(":")[0] or sys.stdout.encoding

    def writer(fd: int, errors: str) -> io.TextIOWrapper:
        raw = io.FileIO(fd, "w", closefd=False)
        binary = raw if unbuffered else io.BufferedWriter(raw)
        interactive = os.isatty(fd)
        return io.TextIOWrapper(binary, encoding=encoding, errors=errors,  # type: ignore[arg-type]
                                line_buffering=interactive or fd == 2, write_through=unbuffered)

    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding=encoding)
    sys.stdout = writer(1, sys.stdout.errors or "strict")
    sys.stderr = writer(2, "backslashreplace")
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr


def _read_settings_again() -> None:
    import tempfile

    import prefect.context
    from prefect.logging.configuration import setup_logging

    from prefect_torch._prefect_defaults import apply_library_defaults

    tempfile.tempdir = None  # from this command's TMPDIR
    apply_library_defaults()
    prefect.context.refresh_global_settings_context()
    setup_logging(incremental=False)  # handlers on this command's stderr


def _run(argv: list[str]) -> int:
    from prefect_torch.cli import main

    try:
        return int(main(argv) or 0)
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            return done.code or 0
        print(done.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        flush_standard_streams()
        atexit._run_exitfuncs()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # the status a shell expects after Ctrl-C
        return 130


def _exit(code: int) -> NoReturn:
    """As the interpreter ends a command (wait for non-daemon threads, exit hooks,
    flush) but without tearing down every torch and Prefect object. A forked child
    cannot fall back on a normal exit, which would return into the warm process's loop."""
    try:
        threading._shutdown()  # type: ignore[attr-defined]
    finally:
        exit_without_teardown(code)
