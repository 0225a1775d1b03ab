"""Prefect settings prefect-torch changes by default, for the CLI and the Python API.

Applied when ``prefect_torch.tasks`` or ``prefect_torch.flows`` is imported,
before the first flow starts Prefect's temporary server (which takes its
settings from this process's environment). A value the user set (environment,
profile or ``prefect.toml``) always wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

import prefect.context
from prefect.settings import get_current_settings

#: Defaults for every use of prefect-torch, CLI or Python. A value the user set wins.
LIBRARY_ENVIRONMENT_DEFAULTS: Mapping[str, str] = {
    # The temporary server's telemetry heartbeat needs the internet and a free
    # SQLite database; on a busy machine it prints "docket.dependencies -
    # send_telemetry_heartbeat ... sqlite3.OperationalError: database is
    # locked" tracebacks into the user's output. This setting turns the
    # server's telemetry service off (the CLI has always set it).
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def settings_set_by_user(environ: Mapping[str, str]) -> set[str]:
    """Names of the Prefect settings set by environment, profile or toml file."""
    explicit = get_current_settings().to_environment_variables(exclude_unset=True)
    return set(explicit) | {k for k in environ if k.startswith("PREFECT_")}


def apply_library_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Apply ``LIBRARY_ENVIRONMENT_DEFAULTS`` the user has not set; return what was set."""
    environ = os.environ if environ is None else environ
    user_set = settings_set_by_user(environ)
    applied = {k: v for k, v in LIBRARY_ENVIRONMENT_DEFAULTS.items() if k not in user_set and environ.get(k) != v}
    environ.update(applied)
    if applied and environ is os.environ:
        prefect.context.refresh_global_settings_context()
    return applied
