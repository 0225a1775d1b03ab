"""Where flows save models by default."""

from __future__ import annotations

from pathlib import Path


def default_models_root() -> str:
    from prefect.settings import PREFECT_HOME

    return str(Path(PREFECT_HOME.value()).expanduser() / "prefect-torch" / "models")
