"""Result storage that only ever hands Prefect verified prefect-torch records.

How it plugs into Prefect 3.8 (read ``prefect/results.py`` and
``prefect/_internal/result_records.py``):

- A stored result is a JSON envelope ``{"metadata": {"serializer": {"type": ...},
  ...}, "result": "<serializer output>"}``. ``ResultRecord.deserialize`` calls
  ``loads`` of whatever serializer *the stored file* names, so a planted
  ``"pickle"`` record would run code, whatever serializer the task was given.
- Every read of a result goes through the result storage block's ``read_path``:
  the cache check ``ResultStore.exists`` (which, in 3.8, reads and fully
  deserializes the record) and ``ResultStore.read``, and the retrieval of a flow
  or task result in another process (``ResultStore._from_metadata`` loads the
  block by its saved id).
- So ``TorchResultStorage.read_path`` inspects the bytes before Prefect sees them.
  It passes only a prefect-torch record whose SHA-256 verifies, or a Prefect
  envelope (or metadata document) naming exactly ``{"type": "prefect-torch"}``
  whose record verifies. Anything else raises ``IntegrityError`` ("untrusted
  record") and a corrupt record raises ``IntegrityError`` too; both are logged as
  a warning. ``ResultStore.exists`` turns any read error into ``False``, so the
  task sees a cache miss, recomputes, and its write replaces the bad file.
- ``write_path`` refuses anything but prefect-torch records, so a flow or task
  that forgot ``result_serializer="prefect-torch"`` fails loudly instead of
  writing results nobody can read back.

Prefect requires a task's or flow's ``result_storage`` block to be saved, so
tasks use ``result_options(storage)``, which saves (idempotently) a Torch Result
Storage block over the given ``TorchStorage`` and returns the options to pass::

    train_task.with_options(**result_options(storage))

Limitation: with ``cache_policy.key_storage`` set, Prefect's ``exists`` reads only
the metadata, so a corrupt result surfaces as an error on read, not as a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Union

from pydantic import Field

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import WritableFileSystem
from prefect.results import ResultStore
from prefect.utilities.asyncutils import run_sync_in_worker_thread

from prefect_torch.blocks.serializer import (
    SERIALIZER_TYPE,
    TorchSerializer,
    unwrap_record_bytes,
)
from prefect_torch.blocks.storage import TorchStorage, default_storage
from prefect_torch.errors import IntegrityError

logger = logging.getLogger("prefect_torch.results")


class TorchResultStorage(WritableFileSystem):
    """Prefect result storage over a Torch Storage block that holds only verified
    prefect-torch records: results written with another serializer (such as
    pickle) or corrupted are refused and recomputed, never deserialised.

    Example:
        Use a saved result storage for a task:
        ```python
        from prefect_torch.blocks import TorchResultStorage

        result_storage = TorchResultStorage.load("BLOCK_NAME")
        ```
    """

    _block_type_name = "Torch Result Storage"
    _documentation_url = "https://github.com/prefect-torch/prefect-torch#storage"

    storage: TorchStorage = Field(
        default_factory=TorchStorage,
        description="The Torch Storage block the results are kept in.",
    )
    folder: str = Field(
        default="results",
        description="Folder under the storage's basepath that holds the results.",
    )

    def _resolve_path(self, path: str) -> Union[Path, str]:
        # Prefect resolves keys with this and hands the result back to
        # read_path/write_path; a full path must stay a full path.
        if _is_full_path(path):
            return self.storage._resolve_path(path)
        relative = f"{self.folder.strip('/')}/{path}" if path else self.folder
        return self.storage._resolve_path(relative)

    async def aread_path(self, path: str) -> bytes:
        """Read a stored result, refusing untrusted or corrupt records (async)."""
        return await run_sync_in_worker_thread(self._read_checked, path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        """Read a stored result, refusing untrusted or corrupt records.

        Raises ``IntegrityError`` (and logs a warning) if the record was written
        by another serializer or fails its checksum.
        """
        return self._read_checked(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        """Store a prefect-torch result record (async); returns the full path."""
        return await run_sync_in_worker_thread(self._write_checked, path, content)

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:
        """Store a prefect-torch result record atomically; returns the full path.

        Raises ``IntegrityError`` if ``content`` is not one (for example a result
        written with Prefect's default pickle serializer).
        """
        return self._write_checked(path, content)

    def _read_checked(self, path: str) -> bytes:
        target = self.storage.url(str(self._resolve_path(path)))
        _register_tensor_files(self.storage)
        content = self.storage._read_bytes(target)
        try:
            check_result_bytes(content)
        except IntegrityError as exc:
            _warn(
                f"Ignoring the stored result at {target}: {exc} prefect-torch treats "
                "it as a cache miss; the task recomputes and overwrites it."
            )
            raise IntegrityError(f"Refused the stored result at {target}: {exc}") from None
        return content

    def _write_checked(self, path: str, content: bytes) -> str:
        target = self.storage.url(str(self._resolve_path(path)))
        try:
            check_result_bytes(content)
        except IntegrityError as exc:
            raise IntegrityError(
                f"Torch Result Storage only stores prefect-torch records, so it "
                f"refused to write {target}: {exc} Give the task or flow "
                'result_serializer="prefect-torch" (see result_options()).'
            ) from None
        return self.storage._write_bytes(target, content)


def _register_tensor_files(storage: TorchStorage) -> None:
    """Let records read from ``storage`` map the tensor files it holds (an object
    store's files are fetched with its endpoint and credentials, once, into a local
    cache)."""
    if storage.is_local:
        return
    from prefect_torch.engine.tensorfile import register_access  # torch-free

    register_access(storage.url(""), storage.filesystem(), tensor_cache_dir())


def tensor_cache_dir() -> Path:
    """Local folder where tensor files from object storage are kept to be mapped."""
    from prefect.settings import PREFECT_HOME

    from prefect_torch.engine.tensorfile import default_cache_dir  # torch-free

    return default_cache_dir(PREFECT_HOME.value())


def check_result_bytes(content: bytes) -> None:
    """Pass only bytes Prefect may safely deserialize with prefect-torch.

    Accepted: a prefect-torch record (raw or base64) that verifies; a Prefect
    result envelope or metadata document whose serializer is exactly
    ``{"type": "prefect-torch"}`` and whose embedded record, if any, verifies.
    Raises ``IntegrityError`` otherwise, without deserialising anything.
    """
    stripped = bytes(content).lstrip()
    if not stripped.startswith(b"{"):
        _verify_record_text(content)
        return
    document = _load_json_strictly(stripped)
    if not isinstance(document, dict):
        raise IntegrityError("Untrusted record: not a Prefect result record.")
    metadata = document.get("metadata", {})
    # Prefect reads the serializer from "metadata", and lets an old-format
    # top-level "serializer" override it: every one present must be ours.
    named = [
        holder["serializer"]
        for holder in (document, metadata)
        if isinstance(holder, dict) and "serializer" in holder
    ]
    if not isinstance(metadata, dict) or not named:
        # Prefect falls back to pickle when a record names no serializer.
        raise IntegrityError(
            "Untrusted record: it names no serializer, so Prefect would read it "
            f"with pickle; prefect-torch only loads {SERIALIZER_TYPE!r} records."
        )
    for serializer in named:
        if serializer != {"type": SERIALIZER_TYPE}:
            kind = serializer.get("type") if isinstance(serializer, dict) else serializer
            if kind == SERIALIZER_TYPE:
                raise IntegrityError(
                    f"Untrusted record: its serializer settings {serializer!r} are "
                    "not ones prefect-torch writes."
                )
            raise IntegrityError(
                f"Untrusted record: it was written with serializer {kind!r}, and "
                f"prefect-torch only loads {SERIALIZER_TYPE!r} records."
            )
    # Prefect reads an old-format "data" key as the result: check both.
    for key in ("result", "data"):
        if key in document:
            if not isinstance(document[key], str):
                raise IntegrityError(f"Untrusted record: its {key!r} is not text.")
            _verify_record_text(document[key])


def _verify_record_text(text: bytes | str) -> None:
    from prefect_torch.engine.records import is_record, verify_record

    try:
        record = unwrap_record_bytes(text)
    except IntegrityError as exc:
        raise IntegrityError(f"Untrusted record: {exc}") from None
    if not is_record(record):
        raise IntegrityError("Untrusted record: not a prefect-torch record.")
    verify_record(record)  # a record of ours that fails this is corrupt


def _load_json_strictly(data: bytes) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # Parsers disagree on which duplicate wins; Prefect's must not see one
        # value while we check another.
        keys = [key for key, _ in pairs]
        if len(keys) != len(set(keys)):
            raise IntegrityError("Untrusted record: duplicate JSON keys.")
        return dict(pairs)

    try:
        return json.loads(data, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"Untrusted record: not valid JSON ({exc}).") from None


def result_storage(storage: TorchStorage | None = None) -> TorchResultStorage:
    """An (unsaved) Torch Result Storage over ``storage`` (default: default_storage())."""
    return TorchResultStorage(storage=storage if storage is not None else default_storage())


def result_store(storage: TorchStorage | None = None) -> ResultStore:
    """A Prefect ``ResultStore`` that reads and writes only prefect-torch records.

    For reading and writing results directly (``store.write(obj, key=...)``,
    ``store.exists(key)``, ``store.read(key).result``), for example in transactions.
    """
    return ResultStore(result_storage=result_storage(storage), serializer=TorchSerializer())


def save_result_storage(storage: TorchStorage | None = None) -> TorchResultStorage:
    """Save a Torch Result Storage block over ``storage``; return it, saved.

    Prefect only accepts saved blocks as a task's or flow's ``result_storage``.
    The name is derived from where the storage points, so calling this again for
    the same place updates the same block. The saved instance (not its slug) is
    what tasks should get: with a slug, Prefect reads the block back from the API
    twice per task run. Needs a Prefect API (or an ephemeral server).
    """
    block = result_storage(storage)
    location = "|".join(
        str(part)
        for part in (block.storage.url(""), block.storage.endpoint_url, block.storage.region)
    )
    name = "results-" + hashlib.sha256(location.encode()).hexdigest()[:16]
    if not _saved_as_is(block, name):
        block.save(name, overwrite=True, _sync=True)
    return block


def _saved_as_is(block: TorchResultStorage, name: str) -> bool:
    """Whether ``name`` already holds what a save of ``block`` would write (the same
    settings, secrets included, under the same schema); if so, ``block`` is marked as
    that saved document, as a save would. One API read instead of a save's
    registration of the block type and schema and its write (about 0.3 s a run).

    The saved data is compared as JSON, not loaded into a block: loading a block with a
    nested block makes Prefect import every installed Prefect collection first."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            document = client.read_block_document_by_name(
                name, block_type_slug=block.get_block_type_slug(), include_secrets=True
            )
    except ObjectNotFound:
        return False
    if document.block_schema is None or document.block_schema.checksum != block._calculate_schema_checksum():
        return False
    if document.data != _settings(block):
        return False
    block._block_document_id, block._block_document_name = document.id, document.name
    return True


def _settings(block: TorchResultStorage) -> dict[str, Any]:
    """The block's data as a save writes it and the API returns it: its fields as JSON,
    secrets included, nested blocks with their type slug."""
    dumped = block.model_dump(mode="json", context={"include_secrets": True})
    return {key: value for key, value in dumped.items() if not key.startswith("_") and key != "block_type_slug"}


def result_options(storage: TorchStorage | None = None) -> dict[str, Any]:
    """Options that make a Prefect task or flow persist safely in ``storage``::

        my_task.with_options(**result_options(storage))
    """
    return {
        "persist_result": True,
        "result_storage": save_result_storage(storage),
        "result_serializer": TorchSerializer(),
    }


def _is_full_path(path: str) -> bool:
    return "://" in str(path) or Path(str(path)).is_absolute()


def _warn(message: str) -> None:
    # In a run, the run logger puts the warning next to the task in the Prefect UI.
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        run_logger: Any = get_run_logger()
    except MissingContextError:
        run_logger = logger
    run_logger.warning(message)


__all__ = [
    "TorchResultStorage",
    "check_result_bytes",
    "result_storage",
    "result_store",
    "save_result_storage",
    "result_options",
]
