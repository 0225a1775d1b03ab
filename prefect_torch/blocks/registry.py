"""The ``ModelRegistry`` block: named models, their versions and aliases, kept as
JSON documents in a Torch Storage block (a local folder or S3).

Layout under ``<storage basepath>/<folder>/<model name>/``::

    versions/00000001.json         one document per registered version
    aliases/champion/00000001.json one document per move of the alias

Every document is written once and never changed, with an *exclusive create*:
it only succeeds if nothing is stored at that name yet. That one primitive makes
concurrent updates safe on both backends:

- Local folders: the document is written to a temporary file, fsynced, then
  ``os.link``-ed to its name, which fails if the name exists. Readers see a
  whole document or none.
- S3: a single PUT with ``If-None-Match: *`` (conditional write). AWS S3 and
  SeaweedFS honour it; a server that ignores it would make two concurrent
  writers both "win", so only use servers that support conditional writes.

Registering a version takes the next free number: if another process took it
first, the create fails and the next number is tried. Moving an alias is a
compare-and-swap on its generation: the new record is generation ``n + 1``
where ``n`` is the generation read; if another process created ``n + 1`` first,
the move fails with ``RegistryConflictError`` instead of overwriting it. The
current target of an alias is its highest generation, so the alias history is
kept for free. A version document is always written before any alias points
at it, so an alias never names a version that does not exist.

Nothing here unpickles anything: documents are JSON, models are safetensors.
This module must not import torch (Prefect imports ``prefect_torch.blocks`` on
every block lookup); loading a model imports it when called.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import uuid
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from prefect.blocks.core import Block

from prefect_torch.blocks.storage import StorageNotFoundError, TorchStorage
from prefect_torch.engine.fileio import TEMP_SUFFIX, fsync_folder
from prefect_torch.errors import ConfigError, IntegrityError, PrefectTorchError, StorageError

if TYPE_CHECKING:
    from prefect_torch.engine.persist import TrainedModel

VERSION_FORMAT = "prefect-torch-registry-version"
ALIAS_FORMAT = "prefect-torch-registry-alias"
DEFAULT_ALIAS = "champion"
# Files of a saved model folder (prefect_torch.engine.persist), named here so the
# registry can move models without importing torch.
MODEL_FILES = ("model.safetensors", "model.json")  # weights first: model.json points at them

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_NUMBER_WIDTH = 8
_MAX_CREATE_RACES = 50
_S3_ATTEMPTS = 3


class RegistryLookupError(PrefectTorchError, LookupError):
    """The registry has no such model, version or alias."""


class RegistryConflictError(PrefectTorchError, RuntimeError):
    """Another process changed the registry first; nothing was overwritten."""


class ModelVersion(BaseModel):
    """One registered version of a model: where it is and how it came to be."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(description="Registered model name.")
    version: int = Field(ge=1, description="Version number, from 1 up.")
    model_path: str = Field(description="Folder of the saved model, relative to the storage basepath.")
    model_uri: str = Field(description="Full path or URL of the model folder when it was registered.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Test metrics measured at training time.")
    problem: Optional[str] = Field(default=None, description="regression, binary or multiclass.")
    data_key: Optional[str] = Field(default=None, description="Content key of the dataset trained on.")
    dataset_uri: Optional[str] = Field(default=None, description="Where the training data came from.")
    specs: dict[str, Any] = Field(default_factory=dict, description="The dataset, model, optimizer and training specs.")
    code_version: dict[str, Any] = Field(default_factory=dict, description="Versions of the code that trained it.")
    description: str = Field(default="", description="Free text, e.g. why it was registered.")
    flow_run_id: Optional[str] = Field(default=None, description="Prefect flow run that registered it.")
    created_at: datetime = Field(description="When it was registered (UTC).")
    token: str = Field(description="Unique id of this document; tells a retried write from a rival one.")


class AliasRecord(BaseModel):
    """One move of an alias: which version it points at from this generation on."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(description="Registered model name.")
    alias: str = Field(description="Alias, e.g. champion.")
    generation: int = Field(ge=1, description="1 for the first move, then up by one per move.")
    version: int = Field(ge=1, description="The version the alias points at.")
    previous_version: Optional[int] = Field(default=None, description="The version it pointed at before.")
    reason: str = Field(default="", description="Why the alias was moved.")
    flow_run_id: Optional[str] = Field(default=None, description="Prefect flow run that moved it.")
    updated_at: datetime = Field(description="When it was moved (UTC).")
    token: str = Field(description="Unique id of this document.")


class _Any:
    """Marker: ``set_alias`` without a compare-and-swap expectation."""

    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()


class ModelRegistry(Block):
    """A registry of trained models, their versions (with metrics, data key, specs
    and code version) and aliases such as champion, stored as JSON documents in a
    Torch Storage block. Concurrent registrations and promotions never overwrite
    each other.

    Example:
        Register a model folder and promote it:
        ```python
        from prefect_torch.blocks import ModelRegistry

        registry = ModelRegistry.load("BLOCK_NAME")
        version = registry.register("housing", "models/run-1", metrics={"r2": 0.93})
        registry.set_alias("housing", "champion", version.version, expected_version=None)
        model = registry.load_model("housing", alias="champion")
        ```
    """

    _block_type_name = "Torch Model Registry"
    _documentation_url = "https://github.com/prefect-torch/prefect-torch#model-registry"

    storage: TorchStorage = Field(
        default_factory=TorchStorage,
        description="The Torch Storage block that holds the registry and the models.",
    )
    folder: str = Field(
        default="registry",
        description="Folder under the storage's basepath that holds the registry documents.",
    )

    @field_validator("folder")
    @classmethod
    def _relative_folder(cls, value: str) -> str:
        value = value.strip().strip("/")
        if not value or ".." in value.split("/") or "://" in value:
            raise ValueError("folder must be a relative path such as 'registry', without '..'.")
        return value

    # -- versions --------------------------------------------------------------------

    def register(
        self,
        name: str,
        model_path: str,
        *,
        metrics: Optional[dict[str, float]] = None,
        problem: Optional[str] = None,
        data_key: Optional[str] = None,
        dataset_uri: Optional[str] = None,
        specs: Optional[dict[str, Any]] = None,
        code_version: Optional[dict[str, Any]] = None,
        description: str = "",
        flow_run_id: Optional[str] = None,
    ) -> ModelVersion:
        """Register the model saved at ``model_path`` (relative to the storage
        basepath) as the next version of ``name``; returns the new version.

        Raises ``RegistryLookupError`` if no saved model is there.
        """
        _check_name(name, "model name")
        model_path = model_path.strip("/")
        if not self.storage.exists(f"{model_path}/{MODEL_FILES[1]}"):
            raise RegistryLookupError(
                f"Cannot register {name!r}: there is no saved model at "
                f"{self.storage.url(model_path)} (no {MODEL_FILES[1]}). Save the model "
                "into this registry's storage first (save_model_folder)."
            )
        for _ in range(_MAX_CREATE_RACES):
            number = (self._numbers(self._versions_dir(name))[-1:] or [0])[0] + 1
            document = ModelVersion(
                name=name,
                version=number,
                model_path=model_path,
                model_uri=self.storage.url(model_path),
                metrics={k: float(v) for k, v in (metrics or {}).items()},
                problem=problem,
                data_key=data_key,
                dataset_uri=dataset_uri,
                specs=specs or {},
                code_version=code_version or {},
                description=description,
                flow_run_id=flow_run_id,
                created_at=datetime.now(timezone.utc),
                token=uuid.uuid4().hex,
            )
            if self._create(self._doc_path(self._versions_dir(name), number), _dump(document)):
                return document
            # Another process registered this number first: take the next one.
        raise RegistryConflictError(
            f"Could not register {name!r}: {_MAX_CREATE_RACES} other registrations "
            "won the race for the next version number. Try again."
        )

    def get_version(self, name: str, version: int) -> ModelVersion:
        """Version ``version`` of model ``name``."""
        _check_name(name, "model name")
        path = self._doc_path(self._versions_dir(name), version)
        try:
            raw = self.storage.read_path(path)
        except StorageNotFoundError:
            known = self._numbers(self._versions_dir(name))
            if not known:
                raise self._unknown_model(name) from None
            raise RegistryLookupError(
                f"Model {name!r} has no version {version}; its versions are "
                f"{_ranges(known)}."
            ) from None
        return _parse(ModelVersion, raw, self.storage.url(path), VERSION_FORMAT)

    def list_versions(self, name: str) -> list[ModelVersion]:
        """Every version of ``name``, oldest first (empty if none)."""
        _check_name(name, "model name")
        return [self.get_version(name, n) for n in self._numbers(self._versions_dir(name))]

    def latest_version(self, name: str) -> ModelVersion:
        """The highest-numbered version of ``name``."""
        numbers = self._numbers(self._versions_dir(name))
        if not numbers:
            raise self._unknown_model(name)
        return self.get_version(name, numbers[-1])

    def model_names(self) -> list[str]:
        """Names of the registered models, sorted."""
        names = set()
        for path in self.storage.list(self.folder):
            parts = path[len(self.folder) + 1 :].split("/")
            if len(parts) == 3 and parts[1] == "versions":
                names.add(parts[0])
        return sorted(names)

    # -- aliases ---------------------------------------------------------------------

    def get_alias(self, name: str, alias: str = DEFAULT_ALIAS) -> AliasRecord:
        """The current record of ``alias`` (raises ``RegistryLookupError`` if unset)."""
        record = self.current_alias(name, alias)
        if record is None:
            if not self._numbers(self._versions_dir(name)):
                raise self._unknown_model(name)
            aliases = self.aliases(name)
            raise RegistryLookupError(
                f"Model {name!r} has no alias {alias!r} (its aliases: "
                f"{sorted(aliases) or 'none'}). Point it at a version with "
                f"set_alias({name!r}, {alias!r}, version), or load by version."
            )
        return record

    def current_alias(self, name: str, alias: str = DEFAULT_ALIAS) -> Optional[AliasRecord]:
        """The current record of ``alias``, or ``None`` if it was never set."""
        _check_name(name, "model name")
        _check_name(alias, "alias")
        numbers = self._numbers(self._alias_dir(name, alias))
        if not numbers:
            return None
        path = self._doc_path(self._alias_dir(name, alias), numbers[-1])
        return _parse(AliasRecord, self.storage.read_path(path), self.storage.url(path), ALIAS_FORMAT)

    def aliases(self, name: str) -> dict[str, int]:
        """Every alias of ``name`` and the version it points at."""
        _check_name(name, "model name")
        found = set()
        base = f"{self.folder}/{name}/aliases/"
        for path in self.storage.list(base.rstrip("/")):
            parts = path[len(base) :].split("/")
            if len(parts) == 2:
                found.add(parts[0])
        result = {}
        for alias in sorted(found):
            record = self.current_alias(name, alias)
            if record is not None:
                result[alias] = record.version
        return result

    def alias_history(self, name: str, alias: str = DEFAULT_ALIAS) -> list[AliasRecord]:
        """Every move of ``alias``, oldest first."""
        _check_name(name, "model name")
        _check_name(alias, "alias")
        folder = self._alias_dir(name, alias)
        records = []
        for number in self._numbers(folder):
            path = self._doc_path(folder, number)
            records.append(_parse(AliasRecord, self.storage.read_path(path), self.storage.url(path), ALIAS_FORMAT))
        return records

    def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        expected_version: Any = ANY,
        reason: str = "",
        flow_run_id: Optional[str] = None,
    ) -> AliasRecord:
        """Point ``alias`` at ``version``; returns the new alias record.

        With ``expected_version`` (a version number, or ``None`` for "not set
        yet") this is a compare-and-swap: if the alias points elsewhere, or
        another process moves it at the same moment, ``RegistryConflictError``
        is raised and nothing is changed. Without it, a concurrent move is
        retried on top of the other one.
        """
        self.get_version(name, version)  # the version document exists before the alias names it
        for _ in range(_MAX_CREATE_RACES):
            current = self.current_alias(name, alias)
            current_version = current.version if current else None
            if expected_version is not ANY and current_version != expected_version:
                raise RegistryConflictError(
                    f"Alias {alias!r} of {name!r} points at "
                    f"{_version_text(current_version)}, not {_version_text(expected_version)} "
                    "as expected: another run moved it. Re-read the alias and decide again."
                )
            generation = (current.generation if current else 0) + 1
            record = AliasRecord(
                name=name,
                alias=alias,
                generation=generation,
                version=version,
                previous_version=current_version,
                reason=reason,
                flow_run_id=flow_run_id,
                updated_at=datetime.now(timezone.utc),
                token=uuid.uuid4().hex,
            )
            if self._create(self._doc_path(self._alias_dir(name, alias), generation), _dump(record)):
                return record
            if expected_version is not ANY:
                raise RegistryConflictError(
                    f"Alias {alias!r} of {name!r} was moved by another run while this one "
                    "moved it; nothing was overwritten. Re-read the alias and decide again."
                )
        raise RegistryConflictError(f"Could not move alias {alias!r} of {name!r}: too many concurrent moves.")

    # -- models ----------------------------------------------------------------------

    def resolve(self, name: str, *, alias: Optional[str] = None, version: Optional[int] = None) -> ModelVersion:
        """The version named by ``version`` or ``alias`` (default: the champion)."""
        if alias is not None and version is not None:
            raise ConfigError("Pass either alias or version, not both.")
        if version is None:
            version = self.get_alias(name, alias or DEFAULT_ALIAS).version
        return self.get_version(name, version)

    def load_model(
        self, name: str, *, alias: Optional[str] = None, version: Optional[int] = None
    ) -> "TrainedModel":
        """Load a registered model for prediction, by alias (default champion) or version."""
        entry = self.resolve(name, alias=alias, version=version)
        return load_stored_model(self.storage, entry.model_path)

    # -- internals -------------------------------------------------------------------

    def _versions_dir(self, name: str) -> str:
        return f"{self.folder}/{name}/versions"

    def _alias_dir(self, name: str, alias: str) -> str:
        return f"{self.folder}/{name}/aliases/{alias}"

    @staticmethod
    def _doc_path(folder: str, number: int) -> str:
        return f"{folder}/{number:0{_NUMBER_WIDTH}d}.json"

    def _numbers(self, folder: str) -> list[int]:
        numbers = []
        for path in self.storage.list(folder):
            stem = path.rsplit("/", 1)[-1].removesuffix(".json")
            if path.endswith(".json") and stem.isdigit() and path.rsplit("/", 1)[0] == folder:
                numbers.append(int(stem))
        return sorted(numbers)

    def _unknown_model(self, name: str) -> RegistryLookupError:
        known = self.model_names()
        return RegistryLookupError(
            f"No model named {name!r} in the registry at {self.storage.url(self.folder)} "
            f"(registered models: {known or 'none'}). Check the name, or register a version first."
        )

    def _create(self, path: str, content: bytes) -> bool:
        """Store ``content`` at ``path`` only if nothing is there; False if something was."""
        target = self.storage.url(path)
        if self.storage.is_local:
            return _create_local(Path(target), content)
        if not target.startswith(("s3://", "s3a://")):
            raise ConfigError(
                f"The model registry needs a local folder or S3 storage (it relies on "
                f"exclusive creates); {target.split('://')[0]}:// has none. Use s3:// or a folder."
            )
        return self._create_s3(target, content)

    def _create_s3(self, target: str, content: bytes) -> bool:
        fs = self.storage.filesystem()
        delay = 0.5
        for attempt in range(1, _S3_ATTEMPTS + 1):
            try:
                fs.pipe_file(target, content, mode="create")
                return True
            except Exception as exc:
                if _is_precondition_failure(exc):
                    # Ours, if an earlier attempt landed and only its answer was lost.
                    with suppress(Exception):
                        return fs.cat_file(target) == content
                    return False
                if attempt == _S3_ATTEMPTS:
                    raise StorageError(self._redact(
                        f"Could not write {target} after {attempt} attempts: "
                        f"{type(exc).__name__}: {exc}. Check that the S3 endpoint "
                        f"({self.storage.endpoint_url or 'AWS'}) is reachable and the "
                        "credentials may write to the bucket."
                    )) from None
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def _redact(self, message: str) -> str:
        for secret in (self.storage.aws_access_key_id, self.storage.aws_secret_access_key, self.storage.aws_session_token):
            value = secret.get_secret_value() if secret is not None else ""
            if len(value) >= 4:
                message = message.replace(value, "***")
        return message


# -- stored models -------------------------------------------------------------------


def save_model_folder(storage: TorchStorage, local_folder: str | os.PathLike[str], path: str) -> str:
    """Copy a saved model folder (``save_model``'s output) into ``storage`` at
    ``path``; returns its full URL. The weights go first, so a ``model.json``
    in storage only ever points at weights already there."""
    folder = Path(local_folder)
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise StorageError(f"{folder} is not a saved model folder: {missing} missing.")
    for name in MODEL_FILES:
        storage.write_path(f"{path.strip('/')}/{name}", (folder / name).read_bytes())
    return storage.url(path.strip("/"))


def load_stored_model(storage: TorchStorage, path: str) -> "TrainedModel":
    """Load the model saved at ``path`` in ``storage`` (local or S3, with the
    block's credentials); checks its weights' checksum."""
    from prefect_torch.engine.persist import load_model

    path = path.strip("/")
    if storage.is_local:
        return load_model(storage.url(path))
    with tempfile.TemporaryDirectory(prefix="prefect-torch-model-") as scratch:
        for name in MODEL_FILES:
            try:
                data = storage.read_path(f"{path}/{name}")
            except StorageNotFoundError as exc:
                raise StorageNotFoundError(f"No saved model at {storage.url(path)}: {exc}") from None
            (Path(scratch) / name).write_bytes(data)
        model = load_model(scratch)
    model.uri = storage.url(path)
    return model


# -- helpers -------------------------------------------------------------------------


def _check_name(value: str, what: str) -> None:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(
            f"Invalid {what} {value!r}: use 1-100 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit."
        )


def _dump(document: BaseModel) -> bytes:
    kind = VERSION_FORMAT if isinstance(document, ModelVersion) else ALIAS_FORMAT
    payload = {"format": kind, "format_version": 1, **document.model_dump(mode="json")}
    return json.dumps(payload, indent=2, sort_keys=True).encode()


def _parse(model: type[BaseModel], raw: bytes, where: str, kind: str) -> Any:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"Registry document {where} is not valid JSON ({exc}); restore it from a backup.") from None
    if not isinstance(data, dict) or data.get("format") != kind:
        raise IntegrityError(f"{where} is not a {kind} document; the registry folder holds a foreign file.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise IntegrityError(f"Registry document {where} is damaged: {exc.errors()[0]['msg']}.") from None


def _create_local(target: Path, content: bytes) -> bool:
    # Write a complete temporary file, then link it to the final name: link()
    # fails if the name exists, so this is an atomic exclusive create.
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temp, target)
        except FileExistsError:
            return False
    except OSError as exc:
        raise StorageError(f"Cannot write {target}: {exc.strerror or exc}. Check free space and permissions.") from exc
    finally:
        with suppress(FileNotFoundError):
            os.unlink(temp)
    fsync_folder(target.parent)  # make the new name durable
    return True


def _is_precondition_failure(exc: BaseException) -> bool:
    """Whether S3 refused a conditional write because the object exists."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
        if "pre-condition" in str(seen).lower() or "precondition" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _ranges(numbers: list[int]) -> str:
    return f"{numbers[0]}..{numbers[-1]}" if len(numbers) > 1 else str(numbers[0])


def _version_text(version: Any) -> str:
    return "nothing" if version is None else f"version {version}"


__all__ = [
    "ModelRegistry",
    "ModelVersion",
    "AliasRecord",
    "RegistryLookupError",
    "RegistryConflictError",
    "ANY",
    "DEFAULT_ALIAS",
    "save_model_folder",
    "load_stored_model",
]
