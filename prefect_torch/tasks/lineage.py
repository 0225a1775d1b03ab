"""Lineage cache keys: hash(card name, its config, its code version, its inputs' keys).

Stock Prefect keys a task by cloudpickling its inputs and by the run id; that is
slow for models, unstable for tensors and never reused across runs. Here every
value a card passes on carries a key of its own (a dataset's key comes from its
content, a model's from the lineage that produced it), so a downstream key costs
the same for a 1k- or a 100M-parameter model and is the same in every process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import CachePolicy

import prefect_torch
from prefect_torch.engine.handles import lineage_key
from prefect_torch.errors import ConfigError, PrefectTorchError


def input_key(value: Any) -> Any:
    """A small, stable, JSON-able stand-in for a card input."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    key = getattr(value, "key", None)
    if isinstance(key, str):
        return {"key": key}
    if hasattr(value, "model_dump"):  # a pydantic spec: its JSON is its identity
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [input_key(v) for v in value]
    if isinstance(value, dict):
        return {str(k): input_key(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    import pandas as pd

    if isinstance(value, pd.DataFrame):
        from prefect_torch.engine.data import frame_key

        return {"key": frame_key(value)}
    raise ConfigError(
        f"Cannot derive a cache key from a {type(value).__name__} input. Pass prefect-torch values "
        "(tables, splits, handles, specs) or plain JSON values to cached cards, or use cache_policy=NO_CACHE."
    )


@dataclass
class Lineage(CachePolicy):
    """Cache key from the card's name, config, code version and its inputs' keys.

    ``ignore`` names inputs that do not change the result (callbacks, for example).
    """

    code_version: str = "1"
    ignore: tuple[str, ...] = ()

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any):
        keyed = {name: input_key(value) for name, value in sorted(inputs.items()) if name not in self.ignore}
        version = f"{prefect_torch.__version__}/{self.code_version}"
        return lineage_key(task_ctx.task.name, json.dumps(keyed, sort_keys=True), code_version=version)


@dataclass
class SourceLineage(Lineage):
    """Lineage of a card that reads a dataset: its key includes the file's content
    fingerprint (bytes on disk, ETag in a store), so changed data is recomputed.

    A local file's fingerprint is remembered by its state (size, mtime, inode) under
    the Prefect home, so an unchanged file is not read again, even in a new process."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any):
        from prefect_torch.engine.fingerprint import source_key

        spec = inputs["spec"]
        try:
            source = source_key(spec.uri, cache_dir=fingerprint_cache())
        except (PrefectTorchError, OSError):
            # Unreadable data has no key. Without one the card runs uncached and
            # fails with the loader's clear error; raising here would make Prefect
            # log a misleading "Error encountered when computing cache key" first.
            return None
        fingerprinted = {**inputs, "source": source}
        return super().compute_key(task_ctx, fingerprinted, flow_parameters, **kwargs)


def fingerprint_cache():
    """Folder of remembered dataset-file fingerprints, under the Prefect home."""
    from prefect.settings import PREFECT_HOME

    from prefect_torch.engine.fingerprint import cache_folder

    return cache_folder(PREFECT_HOME.value())
