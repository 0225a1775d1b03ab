"""Checkpoints: one plain record of everything needed to resume training exactly.

A checkpoint folder (local path or fsspec URL, one per training lineage) holds
numbered checkpoints, each a pair of files::

    ckpt-<step>-e<epoch>-b<batch>.safetensors   every tensor: model, optimizer state,
                                                 scheduler tensors, best weights, RNG
    ckpt-<step>-e<epoch>-b<batch>.json          everything else (optimizer and scheduler
                                                 structure, LoopState) + one SHA-256
                                                 digest over this JSON and the tensors

The digest covers both files together (the JSON's canonical form, then the
tensors' bytes), so a flipped byte or a truncation in either is detected. Each
file is written atomically (a local write goes to a temporary file, is fsync'ed
and renamed; an object store PUT is atomic) and the tensors file first, the JSON
last: a JSON only ever names a complete tensors file, and a process killed
mid-write leaves at most an orphan tensors file, which is ignored, while the
previous checkpoint stays usable.

Reading never crashes on a bad checkpoint and never resumes from one: a
checkpoint that is damaged (unreadable, not JSON, digest mismatch, tensors file
missing) is logged as a warning naming the file and skipped for the newest
intact one; with none left, training starts over. Checkpoints of the previous
format (``format_version`` 1, whose JSON carried no checksum) are treated as
unverifiable: skipped with a warning, never read. Nothing is pickled; reading a
checkpoint cannot run code.

Both drivers use this module through the Trainer: ``checkpoint_trainer`` /
``resume_trainer`` (and ``CheckpointCallback`` for the fast loop). The lower-level
``save_checkpoint`` / ``load_checkpoint`` work on any model, optimizer and scheduler.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from prefect_torch.engine.fileio import is_local, join, read_bytes, write_bytes
from prefect_torch.engine.loop import Callback, LoopState, Trainer
from prefect_torch.errors import ConfigError, StorageError

logger = logging.getLogger(__name__)

FORMAT = "prefect-torch-checkpoint"
# 2: one digest over JSON and tensors together. 1 (tensors_sha256 only) is skipped as unverifiable.
FORMAT_VERSION = 2
# The newest checkpoint plus one: a damaged newest file still leaves one to resume from.
KEEP = 2

_NAME = re.compile(r"^ckpt-(\d{10})-e(\d{6})-b(\d{6})\.json$")


@dataclass(frozen=True)
class CheckpointData:
    """A verified checkpoint read back: its tensors, its JSON document and where it was."""

    uri: str
    tensors: dict[str, torch.Tensor]
    document: dict[str, Any]

    @property
    def loop_state(self) -> LoopState:
        return LoopState.from_state_dict(self.document["loop_state"])

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors saved under ``prefix.``, with the prefix removed."""
        start = prefix + "."
        return {k[len(start):]: v for k, v in self.tensors.items() if k.startswith(start)}


# -- saving -------------------------------------------------------------------


def save_checkpoint(
    uri: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loop_state: LoopState,
    *,
    best_weights: dict[str, torch.Tensor] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write a checkpoint into the folder ``uri``; returns the path of its JSON file.

    Saves the model's and optimizer's state_dicts, the scheduler's (if any), the
    CPU (and CUDA) RNG state, ``loop_state`` and, for early stopping, the best
    weights. Afterwards, checkpoints newer than this one (left by an earlier
    attempt this run did not resume from: damaged, or resume was off) and older
    ones beyond the newest ``KEEP`` are pruned.
    """
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
    document: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "optimizer": _encode(optimizer.state_dict(), "optimizer", tensors),
        "scheduler": None if scheduler is None else _encode(scheduler.state_dict(), "scheduler", tensors),
        "rng": _encode(_rng_state(), "rng", tensors),
        "best_weights": best_weights is not None,
        "loop_state": loop_state.state_dict(),
    }
    for key, value in (best_weights or {}).items():
        tensors[f"best.{key}"] = value
    payload = save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    document["digest"] = _digest(document, payload)

    name = f"ckpt-{loop_state.step:010d}-e{loop_state.epoch:06d}-b{loop_state.batch:06d}"
    # Tensors first: the JSON is the commit marker and must only name complete tensors.
    write_bytes(join(uri, name + ".safetensors"), payload, storage_options)
    json_uri = join(uri, name + ".json")
    write_bytes(json_uri, json.dumps(document, indent=1).encode(), storage_options)
    _prune(uri, name + ".json", storage_options)
    return json_uri


def checkpoint_trainer(uri: str, trainer: Trainer, storage_options: dict[str, Any] | None = None) -> str:
    """Checkpoint a Trainer (either driver's) into the folder ``uri``."""
    return save_checkpoint(
        uri, trainer.model, trainer.optimizer, trainer.scheduler, trainer.state,
        best_weights=trainer.best_weights, storage_options=storage_options,
    )


class CheckpointCallback(Callback):
    """Checkpoint whenever the loop asks (every ``checkpoint_every`` steps and at epoch ends)."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.uri = uri
        self.storage_options = storage_options
        self.last: str | None = None

    def on_checkpoint(self, trainer: Trainer) -> None:
        self.last = checkpoint_trainer(self.uri, trainer, self.storage_options)


# -- loading ------------------------------------------------------------------


def latest_checkpoint(uri: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The JSON file of the newest checkpoint in the folder ``uri``, if any (not verified:
    ``read_checkpoint`` verifies, and skips damaged ones)."""
    names = _checkpoint_names(uri, storage_options)
    return join(uri, names[-1]) if names else None


def read_checkpoint(
    uri: str, storage_options: dict[str, Any] | None = None, log: logging.Logger | Any | None = None,
) -> CheckpointData | None:
    """The newest intact checkpoint in the folder ``uri``, verified; None when there is none.

    A damaged checkpoint (or one of the unverifiable previous format) is logged as
    a warning on ``log`` (default: this module's logger) naming its file, and
    skipped for the next older one. Raises StorageError only when the storage
    itself cannot be read (not for damaged files).
    """
    log = log or logger
    names = _checkpoint_names(uri, storage_options)
    for position, name in enumerate(reversed(names)):
        json_uri = join(uri, name)
        data, problem = _verified(json_uri, storage_options)
        if data is not None:
            return data
        older = "trying the one before it" if position + 1 < len(names) else "no other checkpoint is left"
        log.warning("Skipping the checkpoint %s: %s; %s.", json_uri, problem, older)
    if names:
        log.warning("No intact checkpoint in %s: training starts over.", uri)
    return None


def _verified(json_uri: str, storage_options: dict[str, Any] | None) -> tuple[CheckpointData | None, str]:
    """The checkpoint whose JSON is ``json_uri`` if it verifies, else None and why not."""
    raw = _read_if_there(json_uri, storage_options)
    if raw is None:
        return None, "its JSON file vanished"
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"it is damaged: not valid JSON ({type(exc).__name__}: {_first_line(exc)})"
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        return None, "it is damaged: not a prefect-torch checkpoint"
    version = document.get("format_version")
    if version == 1:
        return None, ("it was written by an older prefect-torch (checkpoint format 1) whose JSON carries "
                      "no checksum, so it cannot be verified")
    if version != FORMAT_VERSION:
        return None, f"its format version {version!r} is not one this prefect-torch reads ({FORMAT_VERSION})"
    tensors_uri = json_uri.removesuffix(".json") + ".safetensors"
    payload = _read_if_there(tensors_uri, storage_options)
    if payload is None:
        return None, f"its tensors file {tensors_uri} is missing"
    expected = document.pop("digest", None)
    if not isinstance(expected, str) or _digest(document, payload) != expected:
        return None, "it is damaged or truncated: the SHA-256 over its JSON and tensors does not match the one recorded"
    try:
        tensors = load_safetensors(payload)
        LoopState.from_state_dict(document["loop_state"])
    except Exception as exc:  # verified bytes that do not decode: written by a broken writer
        return None, f"it does not decode ({type(exc).__name__}: {_first_line(exc)})"
    return CheckpointData(uri=json_uri, tensors=tensors, document=document), ""


def _digest(document: dict[str, Any], payload: bytes) -> str:
    """SHA-256 over the document's canonical JSON (without the digest), a NUL
    (which canonical JSON never holds), then the tensors' bytes."""
    body = {k: v for k, v in document.items() if k != "digest"}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    digest.update(b"\0")
    digest.update(payload)
    return digest.hexdigest()


def _read_if_there(uri: str, storage_options: dict[str, Any] | None) -> bytes | None:
    try:
        return read_bytes(uri, storage_options)
    except StorageError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return None  # pruned by another writer since the listing, or never written
        raise


def load_checkpoint(
    uri: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    storage_options: dict[str, Any] | None = None,
) -> LoopState:
    """Load the newest intact checkpoint in ``uri`` into the live objects; returns its LoopState.

    Also restores the global RNG state, so dropout continues exactly where it left off.
    """
    data = read_checkpoint(uri, storage_options)
    if data is None:
        raise StorageError(
            f"No intact checkpoint in {uri}. Train from scratch, or point at the run's checkpoint folder."
        )
    apply_checkpoint(data, model, optimizer, scheduler)
    return data.loop_state


def apply_checkpoint(data: CheckpointData, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Put a checkpoint's model, optimizer, scheduler and RNG state into the live objects."""
    document = data.document
    try:
        model.load_state_dict(data.group("model"))
    except RuntimeError as exc:
        raise ConfigError(
            f"The checkpoint {data.uri} was written for a different model ({_first_line(exc)}). "
            "Resume with the same model spec, or start afresh (resume=False / another checkpoint folder)."
        ) from exc
    try:
        optimizer.load_state_dict(_decode(document["optimizer"], data.tensors))
    except (ValueError, KeyError) as exc:
        raise ConfigError(
            f"The checkpoint {data.uri} holds the state of a different optimizer ({_first_line(exc)}). "
            "Resume with the same optimizer spec, or start afresh."
        ) from exc
    if (scheduler is None) != (document["scheduler"] is None):
        raise ConfigError(
            f"The checkpoint {data.uri} was written {'with' if scheduler is None else 'without'} an LR "
            "scheduler. Resume with the same scheduler spec, or start afresh."
        )
    if scheduler is not None:
        scheduler.load_state_dict(_decode(document["scheduler"], data.tensors))
    _set_rng_state(_decode(document["rng"], data.tensors))


def resume_trainer(
    uri: str, trainer: Trainer, storage_options: dict[str, Any] | None = None, log: logging.Logger | Any | None = None,
) -> LoopState | None:
    """Continue a Trainer from the newest intact checkpoint in ``uri``; None when there
    is none (damaged ones are skipped with a warning on ``log``: see ``read_checkpoint``)."""
    data = read_checkpoint(uri, storage_options, log)
    if data is None:
        return None
    apply_checkpoint(data, trainer.model, trainer.optimizer, trainer.scheduler)
    device = trainer.device
    trainer.best_weights = (
        {k: v.to(device) for k, v in data.group("best").items()} if data.document["best_weights"] else None
    )
    trainer.state = data.loop_state
    return trainer.state


def checkpoint_key(model_key: str, optimizer: Any, training: Any, extra: Any = None) -> str:
    """The lineage of a training run: what its checkpoints are filed under.

    The optimizer and training specs (pydantic models) count, except the cadence of
    checkpoints and progress reports, which do not change the numbers.
    """
    from prefect_torch.engine.handles import lineage_key

    training_config = training.model_dump(mode="json", exclude={"checkpoint_every", "progress_every"})
    return lineage_key("training", [optimizer.model_dump(mode="json"), training_config, extra], model_key)


# -- encoding state_dicts as tensors + JSON -------------------------------------


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of ``value`` with every tensor moved into ``tensors``."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value
        return {"__tensor__": path}
    if isinstance(value, dict):
        # state_dicts key optimizer state by parameter index: keep the keys' types.
        return {"__items__": [[_encode(k, f"{path}.k{i}", tensors), _encode(v, f"{path}.{_safe(k, i)}", tensors)]
                              for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(
        f"Cannot checkpoint {path}: a {type(value).__name__} is neither a tensor nor plain data. "
        "Use an optimizer and LR scheduler whose state_dict holds only tensors, numbers, strings and lists."
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
    return value


def _safe(key: Any, index: int) -> str:
    # A tensor name per key; an odd key gets "#<index>", which no plain key can be.
    text = str(key)
    return text if re.fullmatch(r"[A-Za-z0-9_]+", text) else f"#{index}"


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- the folder ---------------------------------------------------------------


def _checkpoint_names(uri: str, storage_options: dict[str, Any] | None) -> list[str]:
    """Names of the complete checkpoints' JSON files, oldest first."""
    found = [(tuple(int(g) for g in m.groups()), name)
             for name in _list(uri, storage_options) if (m := _NAME.match(name))]
    return [name for _, name in sorted(found)]


def _list(uri: str, storage_options: dict[str, Any] | None) -> list[str]:
    if is_local(uri):
        from pathlib import Path

        folder = Path(uri.removeprefix("file://")).expanduser()
        return [p.name for p in folder.iterdir()] if folder.is_dir() else []
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    # Another process may have written since: never trust a cached listing here.
    fs.invalidate_cache(path)
    try:
        return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    except Exception as exc:
        raise StorageError(f"Cannot list checkpoints in {uri}: {type(exc).__name__}: {exc}.") from exc


def _prune(uri: str, written: str, storage_options: dict[str, Any] | None) -> None:
    """Keep the ``KEEP`` newest checkpoints up to ``written`` (the one just saved).

    Newer ones go: an earlier attempt left them and this run did not resume from
    them (damaged, or resume was off). Kept, they would outrank this run's own
    checkpoints and, once ``KEEP`` of them were damaged, prune every new one."""
    names = _checkpoint_names(uri, storage_options)
    if written not in names:
        return  # listing not up to date (eventually consistent storage): prune next time
    mine = names.index(written) + 1
    for name in names[mine:] + names[:mine][:-KEEP]:
        stem = name.removesuffix(".json")
        # JSON first, so a half-pruned checkpoint is never taken for a complete one.
        for suffix in (".json", ".safetensors"):
            _remove(join(uri, stem + suffix), storage_options)


def _remove(uri: str, storage_options: dict[str, Any] | None) -> None:
    if is_local(uri):
        from pathlib import Path

        Path(uri.removeprefix("file://")).expanduser().unlink(missing_ok=True)
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
