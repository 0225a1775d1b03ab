"""The ``SweepStorage`` block: the database an Optuna study of a sweep lives in.

A sweep keeps its study (trials, their parameters, intermediate values, states)
in Optuna's RDB storage. Without a block it is a SQLite file under the Prefect
home, enough for one machine. Sweeps whose trials run on work pools across
machines share one PostgreSQL database: save its URL once in a block, and every
sweep and every trial on a worker loads it by name. The URL holds the password,
so it is a ``SecretStr``, unwrapped only to connect and registered for log
redaction.

This module must not import torch or optuna (Prefect imports
``prefect_torch.blocks`` on every block lookup).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from prefect.blocks.core import Block

from prefect_torch.blocks.redaction import register_secret
from prefect_torch.errors import ConfigError

# SQLAlchemy's plain postgresql:// means psycopg2; prefect-torch installs psycopg (3).
_DRIVERS = {"postgresql://": "postgresql+psycopg://", "postgres://": "postgresql+psycopg://"}


class SweepStorage(Block):
    """Where sweeps keep their Optuna studies: a database URL (PostgreSQL for
    sweeps shared by many machines, or SQLite for one).

    Example:
        Save the database once (``SweepStorage(url="postgresql://...").save("BLOCK_NAME")``),
        then name it in every sweep (``--study-storage-block BLOCK_NAME``), or load it:
        ```python
        from prefect_torch.blocks import SweepStorage

        storage = SweepStorage.load("BLOCK_NAME")
        ```
    """

    _block_type_name = "Torch Sweep Storage"
    _documentation_url = "https://github.com/prefect-torch/prefect-torch#sweeps"

    url: SecretStr = Field(
        description=(
            "SQLAlchemy database URL of the study storage, e.g. "
            "postgresql://user:password@host:5432/optuna or sqlite:////path/to/sweeps.db."
        ),
    )

    @field_validator("url")
    @classmethod
    def _known_database(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if not raw.startswith(("postgresql", "postgres://", "sqlite://", "mysql")):
            raise ValueError("url must be a database URL such as postgresql://user:password@host:5432/optuna.")
        return value

    def database_url(self) -> str:
        """The URL to connect with (a psycopg driver for PostgreSQL); registered as a secret."""
        raw = self.url.get_secret_value()
        register_secret(raw)
        for prefix, replacement in _DRIVERS.items():
            if raw.startswith(prefix):
                return replacement + raw[len(prefix):]
        return raw


def default_sweep_database() -> str:
    """The SQLite file under the Prefect home that keeps studies when no block is named."""
    from prefect.settings import PREFECT_HOME

    folder = Path(PREFECT_HOME.value()).expanduser() / "prefect-torch"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'sweeps.db'}"


def sweep_database(block_name: str | None) -> str:
    """The study database: the saved ``SweepStorage`` block ``block_name``, or the default SQLite file."""
    if not block_name:
        return default_sweep_database()
    try:
        block = SweepStorage.load(block_name, _sync=True)
    except ValueError as exc:
        raise ConfigError(
            f"There is no saved Torch Sweep Storage block named {block_name!r} ({exc}). Save one with "
            f"SweepStorage(url='postgresql://...').save({block_name!r}), or leave storage_block empty "
            "for a SQLite file under the Prefect home."
        ) from exc
    return block.database_url()


__all__ = ["SweepStorage", "default_sweep_database", "sweep_database"]
