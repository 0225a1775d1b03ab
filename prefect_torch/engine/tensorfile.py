"""Large tensors stored once, uncompressed, and read back memory-mapped.

A tensor file is a plain safetensors file (any safetensors reader opens it)
written by streaming each tensor's bytes straight from its memory: no serialised
copy of the data is ever held. Its xxh3-128 checksum (``xxhash``; the whole
file, header included) is computed while writing and kept in the small JSON
record that points at the file, so corruption is detected on read.

Reading maps the file (a private copy-on-write mapping: the tensors are backed
by the file's pages, nothing is copied, and a write to a tensor never reaches
the file). The checksum is verified once per process per file state (path,
size, mtime, inode). A file in object storage is downloaded once into a local
cache folder named by its checksum, then mapped.

Writes are atomic (a temporary file in the same folder, fsync, rename; one
upload to object storage), so a crash mid-write leaves the previous file whole.
A file can also be written ahead, before anyone knows where it will be stored
(``stage_tensor_file``: the CLI's early split does so in the background while
Prefect starts); ``write_tensor_file(staged=...)`` then renames it into place.

This module imports nothing from Prefect.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import uuid
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import xxhash

from prefect_torch.engine.fileio import TEMP_SUFFIX, fsync_folder, is_local
from prefect_torch.errors import IntegrityError, StorageError

if TYPE_CHECKING:
    import torch

CHECKSUM = "xxh3_128"
_CHUNK = 8 * 2**20

_DTYPES = {  # safetensors name -> torch dtype name
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}

# How to reach stored tensor files by URL: (prefix, fsspec fs, local cache folder),
# registered by the storage that writes or reads the records (endpoint, credentials).
_access: list[tuple[str, Any, Any]] = []
_verified: set[tuple[str, int, int, int, str]] = set()
_lock = threading.Lock()


def register_access(prefix: str, fs: Any, cache_dir: str | Path | None) -> None:
    """Read tensor files whose URL starts with ``prefix`` with ``fs``, caching them in ``cache_dir``."""
    entry = (prefix.rstrip("/") + "/", fs, cache_dir)
    with _lock:
        _access[:] = [e for e in _access if e[0] != entry[0]] + [entry]


def _access_for(uri: str) -> tuple[Any, Any]:
    with _lock:
        for prefix, fs, cache_dir in reversed(_access):
            if uri.startswith(prefix):
                return fs, cache_dir
    return None, None


@dataclass(frozen=True)
class StagedFile:
    """A whole tensor file written ahead under a temporary name (``stage_tensor_file``)."""

    path: Path
    checksum: str
    bytes: int

    def discard(self) -> None:
        """Remove the file if it is still there (it was not stored)."""
        with suppress(FileNotFoundError):
            os.unlink(self.path)


_STAGED_PREFIX = ".staged."


def stage_tensor_file(folder: str | Path, tensors: dict[str, "torch.Tensor"]) -> StagedFile:
    """Write ``tensors`` as a tensor file, fsynced, under a temporary name in the local
    ``folder``, for ``write_tensor_file(staged=...)`` to rename into place later.

    The name carries this process's id: staged files whose process is gone (killed
    before it stored or removed them) are removed here, by the next process to stage
    in the same folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_orphaned_staged_files(folder)
    return _write_temp(folder, f"{_STAGED_PREFIX}{os.getpid()}", tensors)


def _write_temp(folder: Path, prefix: str, tensors: dict[str, "torch.Tensor"]) -> StagedFile:
    """Stream ``tensors`` to a new temporary file ``<folder>/<prefix>.<random>``, removed
    again if the write fails."""
    temp = folder / f"{prefix}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"
    try:
        return StagedFile(temp, *_stream(temp, tensors))
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def _remove_orphaned_staged_files(folder: Path) -> None:
    for path in folder.glob(f"{_STAGED_PREFIX}*{TEMP_SUFFIX}"):
        pid = path.name.removeprefix(_STAGED_PREFIX).split(".", 1)[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            with suppress(OSError):
                path.unlink()


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True


def file_checksum(path: str | Path) -> str:
    """The xxh3-128 hex digest of a local file, read in chunks."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_tensor_file(
    folder: str,
    stem: str,
    tensors: dict[str, "torch.Tensor"],
    fs: Any = None,
    cache_dir: str | Path | None = None,
    upload: Callable[[Path, str], Any] | None = None,
    staged: StagedFile | None = None,
) -> dict[str, Any]:
    """Write ``tensors`` as ``<folder>/<stem>.<checksum>.safetensors``.

    ``folder`` is a local folder or a URL of ``fs`` (an fsspec file system). A remote
    file is written to ``cache_dir`` first (where a later read maps it) and uploaded
    in one piece, by ``upload(local_path, url)`` when given (a storage's retrying
    upload), else by ``fs.put_file``. ``staged``, a file ``stage_tensor_file`` wrote of
    these very tensors, is renamed into place instead of writing them again (where it
    cannot be, on another file system say, they are written afresh and it is removed).
    Returns the reference a record keeps: ``uri``, ``checksum``, ``bytes``.
    """
    remote = not is_local(folder)
    local_folder = Path(cache_dir or _default_cache_dir()) if remote else Path(folder)
    local_folder.mkdir(parents=True, exist_ok=True)
    local = _place_staged(staged, stem, local_folder, remote) if staged is not None else None
    if local is None:
        staged = _write_temp(local_folder, f".{stem}", tensors)
        local = local_folder / _stored_name(stem, staged.checksum, remote)
        try:
            os.replace(staged.path, local)
        except BaseException:
            staged.discard()
            raise
    checksum, size = staged.checksum, staged.bytes
    fsync_folder(local_folder)
    if not remote:
        uri = str(local.resolve())
    else:
        uri = folder.rstrip("/") + "/" + _stored_name(stem, checksum, remote=False)
        register_access(folder, fs, local_folder)
        if upload is not None:
            upload(local, uri)
        else:
            try:
                # s3fs completes a multipart upload atomically: readers see no partial object.
                fs.put_file(str(local), uri)
            except Exception as exc:
                raise StorageError(f"Cannot upload {uri}: {type(exc).__name__}: {exc}.") from exc
    _mark_verified(local, checksum)
    return {"uri": uri, "checksum": checksum, "algorithm": CHECKSUM, "bytes": size}


def _stored_name(stem: str, checksum: str, remote: bool) -> str:
    # A remote file's local copy is named by its checksum alone, as a download is.
    return f"{checksum}.safetensors" if remote else f"{stem}.{checksum[:16]}.safetensors"


def _place_staged(staged: StagedFile, stem: str, folder: Path, remote: bool) -> Path | None:
    """Rename a staged file into ``folder``; ``None`` where it cannot be (gone, cut short,
    or on another file system), after removing it."""
    target = folder / _stored_name(stem, staged.checksum, remote)
    try:
        if staged.path.stat().st_size == staged.bytes:
            os.replace(staged.path, target)
            return target
    except OSError:
        pass
    staged.discard()
    return None


def map_tensor_file(
    ref: dict[str, Any], fs: Any = None, cache_dir: str | Path | None = None
) -> dict[str, "torch.Tensor"]:
    """Map the file a ``write_tensor_file`` reference names; verify it once per process.

    Raises ``IntegrityError`` if the file is missing, truncated or damaged.
    """
    try:
        uri, checksum, size = str(ref["uri"]), str(ref["checksum"]), int(ref["bytes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"Tensor file reference is malformed: {ref!r}.") from exc
    if is_local(uri):
        path = Path(uri.removeprefix("file://"))
    else:
        if fs is None:
            fs, cache_dir = _access_for(uri)
        path = _download(uri, checksum, size, fs, cache_dir)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise IntegrityError(f"The tensor file {uri} is missing.") from None
    if stat.st_size != size:
        raise IntegrityError(f"The tensor file {uri} has {stat.st_size} bytes; its record says {size}.")
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, checksum)
    with _lock:
        known = key in _verified
    if not known:
        actual = file_checksum(path)
        if actual != checksum:
            if not is_local(uri):
                with suppress(OSError):
                    path.unlink()  # a damaged download is fetched again next time
            raise IntegrityError(
                f"The tensor file {uri} is damaged: its {CHECKSUM} is {actual}, its record says {checksum}."
            )
        with _lock:
            _verified.add(key)
    return _map(path, uri)


def _stream(temp: Path, tensors: dict[str, "torch.Tensor"]) -> tuple[str, int]:
    import torch

    prepared = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    # Widest elements first, so every tensor starts aligned to its element size.
    order = sorted(prepared, key=lambda n: (-prepared[n].element_size(), n))
    header: dict[str, Any] = {}
    offset = 0
    names = {v: k for k, v in _DTYPES.items()}
    for name in order:
        tensor = prepared[name]
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in names:
            raise TypeError(f"Tensor {name!r} has dtype {tensor.dtype}, which tensor files do not store.")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": names[dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    digest = xxhash.xxh3_128()
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as handle:
        for piece in (struct.pack("<Q", len(raw)), raw):
            handle.write(piece)
            digest.update(piece)
        for name in order:
            tensor = prepared[name]
            if tensor.numel() == 0:
                continue
            data = tensor.reshape(-1).view(torch.uint8).numpy()
            for start in range(0, data.shape[0], _CHUNK):
                piece = memoryview(data[start : start + _CHUNK])
                handle.write(piece)
                digest.update(piece)
        handle.flush()
        os.fsync(handle.fileno())
    return digest.hexdigest(), 8 + len(raw) + offset


def _map(path: Path, uri: str) -> dict[str, "torch.Tensor"]:
    import numpy as np
    import torch

    # Copy-on-write: tensors are writable (no torch warning), writes stay private.
    mapped = np.memmap(path, dtype=np.uint8, mode="c")
    try:
        (length,) = struct.unpack("<Q", bytes(mapped[:8]))
        header = json.loads(bytes(mapped[8 : 8 + length]))
        start = 8 + length
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = (int(v) for v in entry["data_offsets"])
            dtype = getattr(torch, _DTYPES[entry["dtype"]])
            shape = [int(v) for v in entry["shape"]]
            if not 0 <= begin <= end <= mapped.shape[0] - start:
                raise ValueError(f"offsets of {name!r} lie outside the file")
            if begin == end:
                tensors[name] = torch.empty(shape, dtype=dtype)
                continue
            data = torch.from_numpy(mapped[start + begin : start + end])
            tensors[name] = data.view(dtype).reshape(shape)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, struct.error) as exc:
        # The checksum matched, so the writer produced this: still refuse it cleanly.
        raise IntegrityError(f"The tensor file {uri} is not a readable safetensors file: {exc}.") from exc
    return tensors


def _download(uri: str, checksum: str, size: int, fs: Any, cache_dir: str | Path | None) -> Path:
    folder = Path(cache_dir or _default_cache_dir())
    local = folder / f"{checksum}.safetensors"
    with suppress(FileNotFoundError):
        if local.stat().st_size == size:
            return local
    if fs is None:
        import fsspec

        fs, _ = fsspec.core.url_to_fs(uri)
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{checksum}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"
    try:
        fs.get_file(uri, str(temp))
        os.replace(temp, local)
    except FileNotFoundError:
        raise IntegrityError(f"The tensor file {uri} is missing.") from None
    except Exception as exc:
        raise IntegrityError(f"The tensor file {uri} cannot be read: {type(exc).__name__}: {exc}.") from exc
    finally:
        with suppress(FileNotFoundError):
            os.unlink(temp)
    return local


def _mark_verified(path: Path, checksum: str) -> None:
    stat = path.stat()
    with _lock:
        _verified.add((str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, checksum))


def _default_cache_dir() -> Path:
    return default_cache_dir(os.environ.get("PREFECT_HOME", "~/.prefect"))


def default_cache_dir(prefect_home: str | Path) -> Path:
    """The local folder of tensor files under a Prefect home (mapped downloads, staged writes)."""
    return Path(prefect_home).expanduser() / "prefect-torch" / "cache" / "tensors"


def forget_verified() -> None:
    """Forget which files were verified (the next read re-hashes them)."""
    with _lock:
        _verified.clear()


__all__ = ["register_access", "write_tensor_file", "stage_tensor_file", "StagedFile", "default_cache_dir", "map_tensor_file", "file_checksum", "forget_verified", "CHECKSUM"]
