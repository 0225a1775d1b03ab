"""Content fingerprints of dataset files, cheap enough to compute on every run.

A local file is keyed by the SHA-256 of its bytes (remembered per path, size and
mtime, so an unchanged file is hashed once per process); an object in a store by
its ETag or version id, which the store computes from the content.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect_torch.errors import DataError

_local_cache: dict[tuple[str, int, int], str] = {}


def source_key(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    if "://" not in uri or uri.startswith("file://"):
        return _local_key(Path(uri.removeprefix("file://")).expanduser())
    return _object_key(uri, storage_options or {})


def _local_key(path: Path) -> str:
    try:
        stat = path.stat()
    except FileNotFoundError as exc:
        raise DataError(f"Dataset file not found: {path}. Check the path (relative to {Path.cwd()}).") from exc
    cache_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _local_cache:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _local_cache[cache_key] = "sha256-" + digest.hexdigest()[:32]
    return _local_cache[cache_key]


def _object_key(uri: str, storage_options: dict[str, Any]) -> str:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    try:
        # Another process may have replaced the object: never answer from a listing cache.
        fs.invalidate_cache(path)
        info = fs.info(path)
    except FileNotFoundError as exc:
        raise DataError(f"Dataset not found: {uri}. Check the URL and that the object exists.") from exc
    for field in ("VersionId", "ETag", "etag", "md5", "checksum"):
        value = info.get(field)
        if value and value != "null":
            return f"{field.lower()}-" + str(value).strip('"')
    return f"size-mtime-{info.get('size')}-{info.get('LastModified') or info.get('mtime')}"


def clear_cache() -> None:
    _local_cache.clear()


__all__ = ["source_key", "clear_cache"]
