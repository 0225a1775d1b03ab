"""Ending a process without the interpreter's teardown.

Once a command (or a training worker) is done, the interpreter would tear down
every torch, Prefect and pydantic object before exiting: it writes nothing,
takes about a second on two cores, and torch's native part of it sometimes
aborts a gloo worker ("terminate called without an active exception"). The
exit hooks still run and the standard streams are flushed, as on any exit.

This module imports nothing but the standard library.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn


def exit_without_teardown(code: int) -> NoReturn:
    """Run the exit hooks, flush the standard streams and end the process with ``code``."""
    try:
        atexit._run_exitfuncs()
    finally:
        flush_standard_streams()
        os._exit(code)


def flush_standard_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass


__all__ = ["exit_without_teardown", "flush_standard_streams"]
