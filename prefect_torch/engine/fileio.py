"""Reading and writing bytes at a local path or an fsspec URL, safely."""

from __future__ import annotations

import os
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

from prefect_torch.errors import StorageError


#: Suffix of an atomic write's temporary file; listings of stored results skip it.
TEMP_SUFFIX = ".ptw-tmp"


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser()


def join(base: str, *parts: str) -> str:
    if is_local(base):
        return str(_local_path(base).joinpath(*parts))
    return "/".join([base.rstrip("/"), *parts])


def write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``data``; a local write is atomic (temp file, fsync, rename)."""
    if is_local(uri):
        path = _local_path(uri)
        try:
            atomic_write(path, data)
        except OSError as exc:
            raise StorageError(f"Cannot write {path}: {exc.strerror or exc}. Check free space and permissions.") from exc
        return
    import fsspec

    try:
        with fsspec.open(uri, "wb", **(storage_options or {})) as handle:
            handle.write(data)
    except Exception as exc:
        raise StorageError(f"Cannot write {uri}: {type(exc).__name__}: {exc}. Check the URL, endpoint and credentials.") from exc


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    if is_local(uri):
        path = _local_path(uri)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise StorageError(f"{path} does not exist. Check the path.") from exc
        except OSError as exc:
            raise StorageError(f"Cannot read {path}: {exc.strerror or exc}.") from exc
    import fsspec

    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as handle:
            return handle.read()
    except FileNotFoundError as exc:
        raise StorageError(f"{uri} does not exist. Check the URL.") from exc
    except Exception as exc:
        raise StorageError(f"Cannot read {uri}: {type(exc).__name__}: {exc}. Check the URL, endpoint and credentials.") from exc


def atomic_write(target: Path, content: bytes | bytearray | memoryview) -> None:
    """Write ``content`` to ``target`` so that readers see the old or the new file.

    The temporary file lives in the target's folder so ``os.replace`` is a rename
    on one file system; fsync before the rename so the new name never points at
    data the disk does not have yet.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
    # 0o666 and the process umask, like open(); mkstemp would force 0o600.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_folder(target.parent)


def fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a folder.
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
