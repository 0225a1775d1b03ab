"""Datasets and models as Prefect assets, so lineage reads dataset → model.

An asset key is a URI: the dataset's is where it was read from, the model's is
where it was saved. Local paths become absolute ``file://`` URIs. Credentials,
query strings and the characters Prefect refuses in keys are removed: ``%`` is
one of them, so percent-encoding is not an option and such characters become ``_``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import urlsplit

from typing import Any

from prefect.assets import Asset, AssetProperties
from prefect.context import AssetContext
from prefect.types.names import MAX_ASSET_KEY_LENGTH, RESTRICTED_ASSET_CHARACTERS

from prefect_torch.engine.models import ModelSpec
from prefect_torch.reporting.text import display_uri, scrub_secrets, table_cell, truncate

MATERIALIZED_BY = "prefect-torch"


def asset_key(uri: str) -> str:
    """The asset key of a dataset or model location: a URI Prefect accepts."""
    text = scrub_secrets(str(uri).strip())
    if "://" in text and not text.lower().startswith("file://"):
        parts = urlsplit(text)
        key = f"{parts.scheme.lower()}://{parts.netloc}{parts.path}"
    else:
        path = Path(text.removeprefix("file://")).expanduser().resolve()
        key = "file://" + path.as_posix()
    for char in RESTRICTED_ASSET_CHARACTERS:
        key = key.replace(char, "_")
    if len(key) > MAX_ASSET_KEY_LENGTH:
        # Keep the start (scheme, bucket) and a digest of the whole, so keys stay unique.
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        key = key[: MAX_ASSET_KEY_LENGTH - 18] + "--" + digest
    return key


def dataset_asset(uri: str) -> Asset:
    """The dataset read from ``uri``."""
    name = display_uri(uri, max_length=60).rstrip("/").rsplit("/", 1)[-1] or "dataset"
    return Asset(
        key=asset_key(uri),
        properties=AssetProperties(name=name, description=f"Dataset read by prefect-torch from {display_uri(uri, 400)}."),
    )


def model_asset(uri: str, spec: ModelSpec) -> Asset:
    """The model saved to ``uri`` (safetensors weights + JSON spec)."""
    return Asset(
        key=asset_key(uri),
        properties=AssetProperties(
            name=f"{spec.short_name()} model",
            description=truncate(
                f"prefect-torch model {spec.short_name()} (safetensors + model.json) at {display_uri(uri, 400)}. "
                "Load it with prefect_torch.load_model.", 2500,
            ),
        ),
    )


def record_materialization(metadata: dict[str, Any]) -> None:
    """Attach ``metadata`` to the materialization event of every asset the current task
    materializes (shown in the UI's event feed); nothing happens in a plain task."""
    context = AssetContext.get()
    if context is None:
        return
    clean = {name: _json_safe(value) for name, value in metadata.items()}
    for asset in context.downstream_assets:
        context.add_asset_metadata(asset.key, clean)


def _json_safe(value: Any) -> Any:
    # Event payloads are strict JSON: no NaN or Infinity.
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return table_cell(value)
