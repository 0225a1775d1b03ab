"""Which warm process fits a command, and where its socket lives. Stdlib only.

A warm process has imported torch, Prefect and prefect-torch under one
environment, and some of what they read at import time (``TORCH_*`` and
``PREFECT_*`` variables, the installed packages) cannot be read again in a
forked child. So a command only uses a warm process started by the same
interpreter, with the same installed code and the same environment, apart
from variables a shell changes on its own (``PWD``, ``SHLVL``, ...). Anything
else gets a warm process of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

#: Turns the warm process off when set to 0, false, no or off.
ENABLE_VARIABLE = "PREFECT_TORCH_WARM"
#: Seconds a warm process waits for a command before it exits.
IDLE_VARIABLE = "PREFECT_TORCH_WARM_IDLE_SECONDS"
DEFAULT_IDLE_SECONDS = 900.0
#: If set, a command run by a warm process writes its exit status and its peak
#: memory there as JSON (the command's own process is the warm one's child, so
#: the caller cannot measure it from outside).
REPORT_VARIABLE = "PREFECT_TORCH_WARM_REPORT"

#: A command's request: this header (the JSON body's length), then the body,
#: sent with the command's standard input, output and error descriptors.
HEADER = struct.Struct("!I")
HANDED_OVER = 3

#: Variables a shell or terminal changes between two commands; they do not
#: change what an import does, and the child sees the command's values anyway.
_VOLATILE = frozenset({
    "_", "PWD", "OLDPWD", "SHLVL", "COLUMNS", "LINES", "TERM", "PS1", "PS2", "PROMPT_COMMAND",
    "HISTFILE", "SSH_CLIENT", "SSH_CONNECTION", "SSH_TTY", "WINDOWID", "TMUX_PANE", "STY",
    "TERM_SESSION_ID", "PYTEST_CURRENT_TEST", REPORT_VARIABLE,
})

#: Files in the working folder Prefect reads its settings from.
_SETTINGS_FILES = (".env", "prefect.toml", "pyproject.toml")


def enabled(environ: Mapping[str, str]) -> bool:
    """Whether commands may use a warm process here (Linux, not turned off)."""
    if environ.get(ENABLE_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    import socket

    return sys.platform.startswith("linux") and hasattr(socket, "send_fds") and hasattr(os, "fork")


def idle_seconds(environ: Mapping[str, str]) -> float:
    raw = environ.get(IDLE_VARIABLE, "")
    try:
        return float(raw) if raw.strip() else DEFAULT_IDLE_SECONDS
    except ValueError:
        return DEFAULT_IDLE_SECONDS


def code_stamp() -> list:
    """Changes when this interpreter's installed code does: the modification times
    of prefect-torch's sources and of the site-packages folders on ``sys.path``
    (installing or removing a package changes its folder's). Other entries, such
    as the working folder ``python -m`` puts first, change with every file saved there."""
    package = Path(__file__).resolve().parents[1]
    newest = 0
    for folder, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                try:
                    newest = max(newest, os.stat(os.path.join(folder, name)).st_mtime_ns)
                except OSError:
                    pass
    folders = []
    for entry in sys.path:
        if not entry.rstrip(os.sep).endswith(("site-packages", "dist-packages")):
            continue
        try:
            folders.append([entry, os.stat(entry or ".").st_mtime_ns])
        except OSError:
            pass
    return [str(package), newest, folders]


def warm_key(environ: Mapping[str, str], cwd: str) -> str:
    """The key of the warm process a command with this environment and folder may use."""
    settings_files = []
    for name in _SETTINGS_FILES:
        try:
            settings_files.append([name, os.stat(os.path.join(cwd, name)).st_mtime_ns])
        except OSError:
            pass
    home = environ.get("PREFECT_HOME") or os.path.expanduser("~/.prefect")
    try:
        profiles = os.stat(os.path.join(home, "profiles.toml")).st_mtime_ns
    except OSError:
        profiles = None
    described = {
        # The environment and interpreter, however they were called (python or python3).
        "python": [sys.prefix, os.path.realpath(sys.executable), sys.version],
        "code": code_stamp(),
        "environment": sorted((k, v) for k, v in environ.items() if k not in _VOLATILE),
        "settings_files": settings_files,
        "profiles": profiles,
    }
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:24]


class UnsafeFolder(Exception):
    """The socket folder is not this user's alone."""


def socket_folder(environ: Mapping[str, str]) -> Path:
    """A folder only this user can enter: ``$XDG_RUNTIME_DIR/prefect-torch`` or
    ``<tmp>/prefect-torch-warm-<uid>``."""
    runtime = environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "prefect-torch" if runtime and os.path.isdir(runtime) else \
        Path(tempfile.gettempdir()) / f"prefect-torch-warm-{os.getuid()}"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = base.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise UnsafeFolder(f"{base} is not a private folder of this user (owner {info.st_uid}, "
                           f"mode {oct(info.st_mode & 0o777)}); remove it or set {ENABLE_VARIABLE}=0.")
    return base


def socket_path(environ: Mapping[str, str], key: str) -> Path:
    return socket_folder(environ) / f"{key}.sock"


def pid_path(environ: Mapping[str, str], key: str) -> Path:
    """Holds the pid of the warm process started for ``key``, from its start on."""
    return socket_folder(environ) / f"{key}.pid"


def log_path(environ: Mapping[str, str], key: str) -> Path:
    """The warm process's own messages (start, refusals, exit)."""
    return socket_folder(environ) / f"{key}.log"


def refused_path(environ: Mapping[str, str], key: str) -> Path:
    """Written by a warm process that could not serve; no other is started for ``key``."""
    return socket_folder(environ) / f"{key}.refused"
