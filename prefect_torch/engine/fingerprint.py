"""Content fingerprints of dataset files, cheap enough to compute on every run.

A local file is keyed by the xxh3-128 of its bytes. Like git's index, the key is
remembered by the file's state (real path, size, mtime, ctime, inode): in this
process, and in a small JSON file per dataset under ``cache_dir`` (the Prefect
home), so a rerun in a new process does not read the file at all. Any change of
that state (a rewrite, a copy over it, a ``touch``) re-hashes the file. A file
modified less than a second before it was hashed is not remembered on disk (a
second write within the file system's timestamp tick could go unseen), like
git's "racily clean" entries. A file being read in the background
(``data.start_loading``) is waited for: its key comes from that read.

An object in a store is keyed by its ETag or version id, which the store
computes from the content.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import xxhash

from prefect_torch.engine import prefetch
from prefect_torch.errors import DataError

PREFIX = "xxh3-"
_RACY_NS = 1_000_000_000
_CHUNK = 8 * 2**20

_local_cache: dict[tuple[Any, ...], str] = {}
# The bytes of the file hashed last, kept for the parse that follows (one read per
# first run): taken by ``take_bytes``, dropped by ``drop_bytes`` or the next hash.
_recent: tuple[tuple[Any, ...], bytes] | None = None


def source_key(uri: str, storage_options: dict[str, Any] | None = None, cache_dir: str | Path | None = None) -> str:
    if "://" not in uri or uri.startswith("file://"):
        return _local_key(Path(uri.removeprefix("file://")).expanduser(), cache_dir)
    return _object_key(uri, storage_options or {})


def cache_folder(prefect_home: str | Path) -> Path:
    """Where the fingerprints of a Prefect home are remembered."""
    return Path(prefect_home).expanduser() / "prefect-torch" / "fingerprints"


def content_key(data: bytes | bytearray | memoryview) -> str:
    """The key of a file's bytes (what ``source_key`` gives for a local file)."""
    return PREFIX + xxhash.xxh3_128_hexdigest(data)


def remember(path: str | Path, before: os.stat_result, key: str, cache_dir: str | Path | None = None) -> None:
    """Record that the file at ``path``, in the state ``before`` (stat taken before
    reading it), has content key ``key``; only kept if the file did not change since."""
    if unchanged_since(path, before):
        _store(Path(path).resolve(), before, key, cache_dir)


def unchanged_since(path: str | Path, before: os.stat_result) -> bool:
    """Whether the file at ``path`` is still in the state ``before`` (False if it is gone)."""
    path = Path(path)
    try:
        return _state(path.resolve(), path.stat()) == _state(path.resolve(), before)
    except OSError:
        return False


def _state(real: Path, stat: os.stat_result) -> tuple[Any, ...]:
    return (str(real), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev)


def _entry_path(cache_dir: str | Path, real: Path) -> Path:
    return Path(cache_dir) / (xxhash.xxh64_hexdigest(str(real)) + ".json")


def _local_key(path: Path, cache_dir: str | Path | None) -> str:
    try:
        stat = path.stat()
    except FileNotFoundError as exc:
        raise DataError(f"Dataset file not found: {path}. Check the path (relative to {Path.cwd()}).") from exc
    real = path.resolve()
    # A read started early (``prefetch``) hashes this file: take its key, not a second read.
    prefetch.wait(str(real))
    state = _state(real, stat)
    known = _remembered(real, state, cache_dir)
    if known is not None:
        return known
    global _recent
    _recent = None
    try:
        data = path.read_bytes()
    except IsADirectoryError as exc:
        raise DataError(f"{path} is a folder; pass the path of a .csv or .parquet file inside it.") from exc
    key = content_key(data)
    remember(path, stat, key, cache_dir)
    _recent = (state, data)
    return key


def _remembered(real: Path, state: tuple[Any, ...], cache_dir: str | Path | None) -> str | None:
    if state in _local_cache:
        return _local_cache[state]
    if cache_dir is not None:
        with suppress(OSError, ValueError, TypeError):
            entry = json.loads(_entry_path(cache_dir, real).read_text())
            if tuple(entry["state"]) == state and str(entry["key"]).startswith(PREFIX):
                _local_cache[state] = entry["key"]
                return entry["key"]
    return None


def is_remembered(path: str | Path, cache_dir: str | Path | None) -> bool:
    """Whether ``source_key`` knows the key of the local file at ``path`` in its current
    state, so that it would not read the file."""
    path = Path(path)
    try:
        return _remembered(path.resolve(), _state(path.resolve(), path.stat()), cache_dir) is not None
    except OSError:
        return False


def take_bytes(path: str | Path, stat: os.stat_result) -> bytes | None:
    """The bytes ``source_key`` just read from ``path`` if the file is still in the
    state ``stat``; each read is handed out once."""
    global _recent
    recent, _recent = _recent, None
    if recent is not None and recent[0] == _state(Path(path).resolve(), stat):
        return recent[1]
    return None


def drop_bytes() -> None:
    """Let go of the bytes kept for a parse that did not happen (a cached Load)."""
    global _recent
    _recent = None


def _store(real: Path, stat: os.stat_result, key: str, cache_dir: str | Path | None) -> None:
    state = _state(real, stat)
    _local_cache[state] = key
    if cache_dir is None or time.time_ns() - stat.st_mtime_ns < _RACY_NS:
        return
    from prefect_torch.engine.fileio import atomic_write

    with suppress(OSError):
        entry = json.dumps({"state": list(state), "key": key}).encode()
        atomic_write(_entry_path(cache_dir, real), entry)


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
    """Forget this process's fingerprints (the on-disk ones stay)."""
    _local_cache.clear()
    drop_bytes()


__all__ = [
    "cache_folder", "source_key", "content_key", "remember", "unchanged_since", "is_remembered", "take_bytes",
    "drop_bytes", "clear_cache", "PREFIX",
]
