"""The ``TorchStorage`` block: where prefect-torch keeps results, checkpoints, models
and datasets.

One block serves every kind of persisted state, so a flow run on one machine can
pick up what another persisted. ``basepath`` is a local folder (the default is a
``prefect-torch`` folder under the Prefect home) or an fsspec URL such as
``s3://bucket/prefix``; S3 goes through s3fs, with an optional endpoint for
S3-compatible servers (SeaweedFS, MinIO, Ceph).

Guarantees:

- Writes are atomic. Locally: a temporary file in the same folder, fsync, then
  ``os.replace``, so a crash mid-write leaves the previous file readable. On S3:
  one PUT, so readers see the old object or the new one, never a part.
- Reads see other processes' writes: the s3fs listing cache is off.
- Failures raise ``StorageError`` naming the path, the bucket and the endpoint and
  saying what to check. Transient failures are retried with capped exponential
  backoff for up to 15 seconds, so a storage server restarting mid-run is ridden
  through; a dead endpoint fails within seconds, not minutes.
- Credentials are ``SecretStr``: they are unwrapped to build the s3fs client, and
  compared (never printed) to scrub error messages and every log record (botocore
  logs request headers at DEBUG; see ``redaction``).

This module must not import torch: Prefect imports ``prefect_torch.blocks`` on
every block lookup.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
import urllib.parse
from contextlib import suppress
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional, TypeVar

from pydantic import Field, PrivateAttr, SecretStr, field_validator

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import WritableFileSystem
from prefect.utilities.asyncutils import run_sync_in_worker_thread

from prefect_torch.blocks.redaction import register_secret
from prefect_torch.engine.fileio import TEMP_SUFFIX, atomic_write
from prefect_torch.errors import ConfigError, PrefectTorchError, StorageError

logger = logging.getLogger("prefect_torch.storage")

T = TypeVar("T")

# Retry policy: attempts with exponential backoff (capped), and no new attempt once the
# deadline would pass. An S3 server restarting rides through an outage of up to ~12 s
# (a restart takes a few seconds); a dead or hung endpoint still fails in well under
# 30 seconds with a StorageError.
_ATTEMPTS = 12
_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 2.0
_RETRY_DEADLINE_S = 15.0
# Short socket timeouts for the same reason (botocore defaults are 60 s with retries).
_S3_CONNECT_TIMEOUT_S = 3
_S3_READ_TIMEOUT_S = 5
# A PUT to a server that accepts connections but never answers waits forever on
# "Expect: 100-continue", whatever the socket timeouts: each write gets an overall
# limit, generous enough for a slow but working upload.
_S3_WRITE_TIMEOUT_S = 10.0
_S3_MIN_UPLOAD_BYTES_PER_S = 4 * 2**20
# s3fs switches to multipart above 2 * chunksize; one PUT (up to S3's 5 GiB limit)
# keeps the write a single request.
_SINGLE_PUT_CHUNKSIZE = 5 * 2**30 // 2
# After an endpoint exhausts a retry window, calls within this many seconds try once.
_KNOWN_DOWN_S = 60.0
_DOWN_ENDPOINTS: dict[tuple[Any, ...], float] = {}
_S3_SCHEMES = ("s3", "s3a")
_PERMANENT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENAMETOOLONG,
}


class StorageNotFoundError(StorageError, FileNotFoundError):
    """Nothing is stored at the path that was read."""


class TorchStorage(WritableFileSystem):
    """Where prefect-torch stores results, checkpoints, models and datasets: a local
    folder (by default under the Prefect home) or an fsspec URL such as
    s3://bucket/prefix, with the endpoint and credentials to reach it.

    Example:
        Load a saved storage block and write to it:
        ```python
        from prefect_torch.blocks import TorchStorage

        storage = TorchStorage.load("BLOCK_NAME")
        storage.write_path("notes/hello.txt", b"hello")
        ```
    """

    _block_type_name = "Torch Storage"
    _documentation_url = "https://github.com/prefect-torch/prefect-torch#storage"

    basepath: Optional[str] = Field(
        default=None,
        description=(
            "Local folder or fsspec URL (for example s3://bucket/prefix) under which "
            "prefect-torch stores results, checkpoints, models and datasets. Leave "
            "empty for a prefect-torch folder under the Prefect home."
        ),
        examples=["s3://my-bucket/prefect-torch", "/data/prefect-torch"],
    )
    endpoint_url: Optional[str] = Field(
        default=None,
        title="Endpoint URL",
        description=(
            "URL of an S3-compatible endpoint (SeaweedFS, MinIO, Ceph). Leave empty "
            "for AWS S3."
        ),
        examples=["http://127.0.0.1:8333"],
    )
    region: Optional[str] = Field(
        default=None, description="S3 region name, for example us-east-1."
    )
    aws_access_key_id: Optional[SecretStr] = Field(
        default=None,
        title="AWS Access Key ID",
        description=(
            "S3 access key ID. Leave empty to use the standard AWS credential chain "
            "(environment, config files, instance role)."
        ),
    )
    aws_secret_access_key: Optional[SecretStr] = Field(
        default=None,
        title="AWS Secret Access Key",
        description="S3 secret access key that goes with the access key ID.",
    )
    aws_session_token: Optional[SecretStr] = Field(
        default=None,
        title="AWS Session Token",
        description="Session token, for temporary S3 credentials only.",
    )

    _fs_cache: "_FilesystemCache" = PrivateAttr(default_factory=lambda: _FilesystemCache())

    @field_validator("basepath", "endpoint_url", "region", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, str) and not value.strip():
            return None
        return value.strip() if isinstance(value, str) else value

    # -- where things are ---------------------------------------------------------

    @property
    def is_local(self) -> bool:
        """Whether the basepath is a folder on this machine."""
        return self._scheme() == ""

    def url(self, path: str = "") -> str:
        """The full path or URL of ``path`` (relative to the basepath)."""
        return str(self._resolve_path(path))

    def _resolve_path(self, path: str) -> Path | str:
        # Prefect's ResultStore calls this to turn keys into full paths, then hands
        # those back to read_path/write_path: both relative and full paths inside
        # the basepath are accepted; nothing outside it is.
        if self.is_local:
            return self._local_path(path)
        return self._remote_url(path)

    def _scheme(self) -> str:
        base = self.basepath or ""
        scheme = urllib.parse.urlsplit(base).scheme.lower()
        # "C:\\data" parses with scheme "c"; "file://" is local too.
        return "" if len(scheme) <= 1 or scheme == "file" else scheme

    def _local_base(self) -> Path:
        if not self.basepath:
            from prefect.settings import get_current_settings

            return (Path(get_current_settings().home) / "prefect-torch").resolve()
        base = self.basepath
        if base.lower().startswith("file://"):
            base = urllib.parse.unquote(urllib.parse.urlsplit(base).path)
        return Path(base).expanduser().resolve()

    def _local_path(self, path: str | Path) -> Path:
        base = self._local_base()
        raw = Path(str(path)).expanduser() if path else base
        target = Path(os.path.normpath(raw if raw.is_absolute() else base / raw))
        if target != base and base not in target.parents:
            raise ConfigError(
                f"Path {str(path)!r} is outside the storage basepath {str(base)!r}. "
                "Pass a path relative to the basepath."
            )
        return target

    def _remote_base(self) -> tuple[str, str, str]:
        parts = urllib.parse.urlsplit(self.basepath or "")
        prefix = parts.path.strip("/")
        if not parts.netloc:
            raise ConfigError(
                f"basepath {self.basepath!r} has no bucket. Use a URL like "
                "s3://my-bucket/prefix."
            )
        return parts.scheme.lower(), parts.netloc, prefix

    def _remote_url(self, path: str) -> str:
        scheme, bucket, prefix = self._remote_base()
        base = f"{scheme}://{bucket}" + (f"/{prefix}" if prefix else "")
        path = str(path or "")
        parts = urllib.parse.urlsplit(path)
        if parts.scheme:
            key = parts.path.strip("/")
            inside = parts.scheme.lower() == scheme and parts.netloc == bucket and (
                not prefix or key == prefix or key.startswith(prefix + "/")
            )
            if not inside:
                raise ConfigError(
                    f"Path {path!r} is outside the storage basepath {base!r}. Pass "
                    "a path relative to the basepath."
                )
            relative = key[len(prefix) :].strip("/") if prefix else key
        else:
            relative = path.strip("/")
        if any(part == ".." for part in PurePosixPath(relative).parts):
            raise ConfigError(f"Path {path!r} must not contain '..' segments.")
        return f"{base}/{relative}" if relative else base

    def _bucket(self) -> str | None:
        return None if self.is_local else self._remote_base()[1]

    # -- the fsspec file system ------------------------------------------------------

    def filesystem(self) -> Any:
        """The fsspec file system for this storage (built once, then reused).

        For S3 this is an s3fs ``S3FileSystem`` with the listing cache off, so it
        sees other processes' writes, and short timeouts, so a dead endpoint fails
        fast. Other fsspec schemes take their credentials from the environment.
        """
        key = (
            self.basepath,
            self.endpoint_url,
            self.region,
            hash(self.aws_access_key_id),
            hash(self.aws_secret_access_key),
            hash(self.aws_session_token),
        )
        if self._fs_cache.key != key or self._fs_cache.fs is None:
            self._fs_cache.fs = self._build_filesystem()
            self._fs_cache.key = key
        return self._fs_cache.fs

    def _build_filesystem(self) -> Any:
        import fsspec

        scheme = self._scheme()
        if scheme == "":
            return fsspec.filesystem("file")
        if scheme not in _S3_SCHEMES:
            return fsspec.filesystem(scheme, skip_instance_cache=True)
        try:
            import s3fs
        except ImportError as exc:  # pragma: no cover - s3fs is a dependency
            raise ConfigError(
                "S3 storage needs s3fs: run `pip install s3fs`."
            ) from exc

        client_kwargs = {
            name: value
            for name, value in (
                ("endpoint_url", self.endpoint_url),
                ("region_name", self.region),
            )
            if value
        }
        # botocore logs every request's headers at DEBUG, the access key among them.
        register_secret(
            _reveal(self.aws_access_key_id),
            _reveal(self.aws_secret_access_key),
            _reveal(self.aws_session_token),
        )
        fs = s3fs.S3FileSystem(
            key=_reveal(self.aws_access_key_id),
            secret=_reveal(self.aws_secret_access_key),
            token=_reveal(self.aws_session_token),
            client_kwargs=client_kwargs,
            config_kwargs={
                "connect_timeout": _S3_CONNECT_TIMEOUT_S,
                "read_timeout": _S3_READ_TIMEOUT_S,
                # One attempt per call: retries happen in _retrying, where the
                # total time is bounded and the failure is reported once.
                "retries": {"max_attempts": 1, "mode": "standard"},
            },
            # Both caches would hide other processes' writes.
            skip_instance_cache=True,
            use_listings_cache=False,
        )
        fs.retries = 1  # s3fs's own retry loop, for the same reason as above
        return fs

    # -- bytes in, bytes out -----------------------------------------------------------

    async def aread_path(self, path: str) -> bytes:
        """Read the bytes stored at ``path`` (async)."""
        return await run_sync_in_worker_thread(self._read_bytes, path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        """Read the bytes stored at ``path``.

        Raises ``StorageNotFoundError`` if nothing is stored there and
        ``StorageError`` if the storage cannot be read.
        """
        return self._read_bytes(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        """Store ``content`` at ``path`` atomically (async); returns the full path."""
        return await run_sync_in_worker_thread(self._write_bytes, path, content)

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:
        """Store ``content`` at ``path`` atomically, replacing what was there.

        Returns the full path or URL written. Raises ``StorageError`` if the write
        failed after a few retries; what was stored before is left intact.
        """
        return self._write_bytes(path, content)

    def exists(self, path: str) -> bool:
        """Whether a file (or folder) exists at ``path``; always asks the storage."""
        target = self._resolve_path(path)
        if isinstance(target, Path):
            return self._retrying("check", str(target), target.exists)
        return self._retrying("check", target, lambda: self.filesystem().exists(target))

    def list(self, prefix: str = "") -> list[str]:
        """Paths (relative to the basepath, sorted) of the files under ``prefix``."""
        target = self._resolve_path(prefix)
        if isinstance(target, Path):
            return self._retrying("list", str(target), lambda: self._list_local(target))
        return self._retrying("list", target, lambda: self._list_remote(target))

    def delete(self, path: str) -> None:
        """Delete the file at ``path``; deleting a missing file is not an error."""
        target = self._resolve_path(path)

        def remove() -> None:
            if isinstance(target, Path):
                with suppress(FileNotFoundError):
                    target.unlink()
            else:
                with suppress(FileNotFoundError):
                    self.filesystem().rm_file(target)

        self._retrying("delete", str(target), remove)

    def _read_bytes(self, path: str) -> bytes:
        target = self._resolve_path(path)
        if isinstance(target, Path):
            return self._retrying("read", str(target), target.read_bytes)
        return self._retrying("read", target, lambda: self.filesystem().cat_file(target))

    def _write_bytes(self, path: str, content: bytes) -> str:
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise TypeError(f"`content` must be bytes, got {type(content).__name__}.")
        target = self._resolve_path(path)
        if isinstance(target, Path):
            self._retrying("write", str(target), lambda: atomic_write(target, content))
            return str(target)
        fs = self.filesystem()
        options: dict[str, Any] = {}
        if getattr(fs, "async_impl", False):  # fsspec's sync wrapper takes a timeout
            limit = _S3_WRITE_TIMEOUT_S + len(content) / _S3_MIN_UPLOAD_BYTES_PER_S
            options["timeout"] = limit
        if self._scheme() in _S3_SCHEMES:
            options["chunksize"] = _SINGLE_PUT_CHUNKSIZE
        self._retrying("write", target, lambda: fs.pipe_file(target, bytes(content), **options))
        return target

    def upload_file(self, local: str | Path, path: str) -> str:
        """Copy the local file ``local`` to ``path`` (relative to the basepath, or a full
        URL inside it) in one piece, with the retries and time limits of every write;
        returns the full path. On S3 it is one PUT: readers see the old object or the new."""
        target = self._resolve_path(path)
        if isinstance(target, Path):
            import shutil

            def copy() -> None:
                target.parent.mkdir(parents=True, exist_ok=True)
                temp = target.with_name(f".{target.name}.{os.getpid()}{TEMP_SUFFIX}")
                shutil.copyfile(local, temp)
                os.replace(temp, target)

            self._retrying("write", str(target), copy)
            return str(target)
        fs = self.filesystem()
        options: dict[str, Any] = {}
        if getattr(fs, "async_impl", False):
            options["timeout"] = _S3_WRITE_TIMEOUT_S + os.path.getsize(local) / _S3_MIN_UPLOAD_BYTES_PER_S
        if self._scheme() in _S3_SCHEMES:
            options["chunksize"] = _SINGLE_PUT_CHUNKSIZE
        self._retrying("write", target, lambda: fs.put_file(str(local), target, **options))
        return target

    def _list_local(self, folder: Path) -> list[str]:
        base = self._local_base()
        if folder.is_file():
            return [folder.relative_to(base).as_posix()]
        found = []
        for root, _, files in os.walk(folder):
            for name in files:
                if not name.endswith(TEMP_SUFFIX):
                    found.append((Path(root) / name).relative_to(base).as_posix())
        return sorted(found)

    def _list_remote(self, url: str) -> list[str]:
        fs = self.filesystem()
        base = fs._strip_protocol(self._remote_url("")).rstrip("/") + "/"
        return sorted(
            path[len(base) :] for path in fs.find(url) if path.startswith(base)
        )

    # -- failures ------------------------------------------------------------------------

    def _retrying(self, action: str, target: str, operation: Callable[[], T]) -> T:
        started = time.monotonic()
        backoff = _FIRST_BACKOFF_S
        # An endpoint that just exhausted a whole retry window gets one attempt per
        # call until it answers again: a run with many storage calls (cache checks,
        # results, the model) against a dead endpoint fails in one window, not many.
        endpoint = self._endpoint_key()
        down_since = _DOWN_ENDPOINTS.get(endpoint) if endpoint is not None else None
        known_down = down_since is not None and started - down_since < _KNOWN_DOWN_S
        for attempt in range(1, _ATTEMPTS + 1):
            attempt_started = time.monotonic()
            try:
                result = operation()
                _DOWN_ENDPOINTS.pop(endpoint, None)
                return result
            except PrefectTorchError:
                raise
            except Exception as exc:
                # No new attempt that would end past the deadline. The next one is expected to
                # fail as slowly as this one (a refused connect is slow on a busy machine), at
                # most a connect timeout: a hung endpoint's long attempts are bounded apart.
                now = time.monotonic()
                expected = min(now - attempt_started, _S3_CONNECT_TIMEOUT_S)
                out_of_time = now - started + backoff + expected > _RETRY_DEADLINE_S
                gave_up = known_down or attempt == _ATTEMPTS or out_of_time
                if endpoint is not None and gave_up and not _is_permanent(exc):
                    _DOWN_ENDPOINTS[endpoint] = down_since if known_down else time.monotonic()
                if _is_permanent(exc) or gave_up:
                    raise self._storage_error(
                        action, target, exc, attempt, time.monotonic() - started,
                        tried_once=known_down and not _is_permanent(exc),
                    ) from None
                logger.debug(
                    "Attempt %d to %s %s failed (%s); retrying in %.1f s.",
                    attempt, action, target, type(exc).__name__, backoff,
                )
                time.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
        raise AssertionError("unreachable")  # pragma: no cover

    def _endpoint_key(self) -> tuple[Any, ...] | None:
        return None if self.is_local else (self._scheme(), self.endpoint_url, self._bucket())

    def _storage_error(
        self, action: str, target: str, exc: BaseException, attempts: int, seconds: float = 0.0,
        tried_once: bool = False,
    ) -> StorageError:
        where = repr(target)
        bucket = self._bucket()
        if bucket is not None:
            endpoint = self.endpoint_url or "the AWS S3 default endpoint"
            where += f" (bucket {bucket!r}, endpoint {endpoint})"
        reason = str(exc).strip() or type(exc).__name__
        if isinstance(exc, asyncio.TimeoutError):
            reason = "the storage did not answer in time"
        if len(reason) > 500:
            reason = reason[:500] + "..."
        tries = f" after {attempts} attempts over {seconds:.0f} s" if attempts > 1 else ""
        if tried_once:
            tries = " (it failed a full retry window moments ago, so this call tried once)"
        message = (
            f"Could not {action} {where}{tries}: {type(exc).__name__}: {reason}. "
            f"{self._hint(exc, bucket)}"
        )
        message = self._redact(message)
        if isinstance(exc, FileNotFoundError) and action in ("read", "check"):
            return StorageNotFoundError(message)
        return StorageError(message)

    def _hint(self, exc: BaseException, bucket: str | None) -> str:
        code = getattr(exc, "errno", None)
        if code in (errno.ENOSPC, errno.EDQUOT):
            return "The disk is full: free some space or point `basepath` elsewhere."
        if code == errno.EROFS:
            return "The file system is read-only: point `basepath` at a writable one."
        if bucket is None:
            if isinstance(exc, PermissionError):
                return "Check the permissions of the folder and its parents."
            if isinstance(exc, FileNotFoundError):
                return "Check the path and the block's `basepath`."
            return "Check that the folder is reachable and `basepath` is right."
        if isinstance(exc, PermissionError):
            return (
                "Check the Torch Storage block's aws_access_key_id, "
                "aws_secret_access_key and aws_session_token, and that they grant "
                f"access to bucket {bucket!r}."
            )
        if isinstance(exc, FileNotFoundError):
            return (
                f"Check the path, and that bucket {bucket!r} exists at that endpoint "
                "(create it, or fix `basepath`)."
            )
        return (
            "Check that the S3 endpoint is running and reachable from this machine, "
            "and that the block's `endpoint_url` and `region` are right."
        )

    def _redact(self, message: str) -> str:
        for secret in (
            self.aws_access_key_id,
            self.aws_secret_access_key,
            self.aws_session_token,
        ):
            value = _reveal(secret)
            if value and len(value) >= 4:
                message = message.replace(value, "***")
        return message


class _FilesystemCache:
    """Holds a block's built fsspec file system.

    Copies and pickles of a block start empty: the file system holds live
    connections and the unwrapped credentials.
    """

    __slots__ = ("key", "fs")

    def __init__(self) -> None:
        self.key: Any = None
        self.fs: Any = None

    def __copy__(self) -> "_FilesystemCache":
        return _FilesystemCache()

    def __deepcopy__(self, memo: dict[int, Any]) -> "_FilesystemCache":
        return _FilesystemCache()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_FilesystemCache, ())


def _reveal(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret is not None else None


def _is_permanent(exc: BaseException) -> bool:
    """Failures that retrying cannot fix: missing things, refusals, full disks."""
    if isinstance(
        exc,
        (
            FileNotFoundError,
            PermissionError,
            IsADirectoryError,
            NotADirectoryError,
            FileExistsError,
            ValueError,
            TypeError,
        ),
    ):
        return True
    return getattr(exc, "errno", None) in _PERMANENT_ERRNOS


def default_storage() -> TorchStorage:
    """The storage prefect-torch uses when none is given.

    The saved Torch Storage block named by the environment variable
    ``PREFECT_TORCH_STORAGE_BLOCK`` if it is set (set it on every worker so that
    runs share one storage), else a ``prefect-torch`` folder under the Prefect home.
    """
    name = os.environ.get("PREFECT_TORCH_STORAGE_BLOCK", "").strip()
    if not name:
        return TorchStorage()
    slug = TorchStorage.get_block_type_slug()
    name = name.removeprefix(f"{slug}/")
    try:
        return TorchStorage.load(name, _sync=True)
    except ValueError as exc:
        raise ConfigError(
            f"PREFECT_TORCH_STORAGE_BLOCK={name!r} names no saved Torch Storage "
            f"block ({exc}). Create it with TorchStorage(...).save({name!r}) or "
            "unset the variable to use the local default."
        ) from exc


__all__ = ["TorchStorage", "StorageNotFoundError", "default_storage"]
