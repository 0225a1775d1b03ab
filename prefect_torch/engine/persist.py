"""Saved models: weights as safetensors plus a JSON spec, loadable for prediction.

A saved model is a folder (local or fsspec URL) holding ``model.safetensors``
and ``model.json``. The JSON carries the SHA-256 of the weights, checked on load,
and everything needed to turn raw rows into predictions. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from prefect_torch.engine.fileio import join, read_bytes, write_bytes
from prefect_torch.engine.metrics import predict_outputs
from prefect_torch.engine.models import ModelSpec, build_model
from prefect_torch.engine.split import DatasetInfo
from prefect_torch.errors import IntegrityError, StorageError

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"
FORMAT_VERSION = 1


def weights_bytes(model: nn.Module) -> bytes:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return save_safetensors(tensors)


def save_model(
    model: nn.Module,
    spec: ModelSpec,
    info: DatasetInfo,
    uri: str,
    extra: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write the model to the folder ``uri``; returns ``uri``."""
    weights = weights_bytes(model)
    document = {
        "format": "prefect-torch-model",
        "format_version": FORMAT_VERSION,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "model_spec": spec.model_dump(mode="json"),
        "dataset": info.to_dict(),
        **(extra or {}),
    }
    # Weights first: a model.json only ever points at weights already written.
    write_bytes(join(uri, WEIGHTS_FILE), weights, storage_options)
    write_bytes(join(uri, SPEC_FILE), json.dumps(document, indent=2, default=str).encode(), storage_options)
    return uri


@dataclass
class TrainedModel:
    """A loaded model, ready to predict on raw rows."""

    model: nn.Module
    spec: ModelSpec
    info: DatasetInfo
    document: dict[str, Any]
    uri: str

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.document.get("metrics", {}))

    def outputs(self, frame: pd.DataFrame) -> torch.Tensor:
        return predict_outputs(self.model, self.info.encode_features(frame))

    def predict(self, frame: pd.DataFrame) -> pd.Series:
        """Predicted values (regression) or labels (classification), one per row."""
        out = self.outputs(frame)
        if self.info.problem == "regression":
            values = self.info.decode_regression(out).numpy()
        elif self.info.problem == "binary":
            codes = (torch.sigmoid(out.reshape(-1)) >= 0.5).long().numpy()
            values = np.asarray(self.info.classes, dtype=object)[codes]
        else:
            values = np.asarray(self.info.classes, dtype=object)[out.argmax(dim=1).numpy()]
        return pd.Series(values, index=frame.index, name=f"predicted_{self.info.target}")

    def predict_proba(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Class probabilities (classification only), one column per class."""
        if self.info.problem == "regression":
            raise TypeError("predict_proba is for classification models; use predict for regression.")
        out = self.outputs(frame)
        if self.info.problem == "binary":
            p1 = torch.sigmoid(out.reshape(-1)).numpy()
            probs = np.stack([1 - p1, p1], axis=1)
        else:
            probs = torch.softmax(out, dim=1).numpy()
        return pd.DataFrame(probs, index=frame.index, columns=[f"p_{c}" for c in self.info.classes or []])


def load_model(uri: str, storage_options: dict[str, Any] | None = None) -> TrainedModel:
    """Load a model saved by prefect-torch (``train_flow``'s ``model_uri``)."""
    try:
        document = json.loads(read_bytes(join(uri, SPEC_FILE), storage_options))
    except StorageError as exc:
        raise StorageError(f"No prefect-torch model at {uri}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise IntegrityError(f"{join(uri, SPEC_FILE)} is not valid JSON ({exc}); the model folder is damaged.") from exc
    if document.get("format") != "prefect-torch-model":
        raise IntegrityError(f"{join(uri, SPEC_FILE)} is not a prefect-torch model description.")
    weights = read_bytes(join(uri, WEIGHTS_FILE), storage_options)
    if hashlib.sha256(weights).hexdigest() != document["weights_sha256"]:
        raise IntegrityError(
            f"{join(uri, WEIGHTS_FILE)} does not match the checksum in {SPEC_FILE}: the weights were "
            "altered or truncated. Re-train or restore the model folder."
        )
    spec = ModelSpec.model_validate(document["model_spec"])
    info = DatasetInfo.from_dict(document["dataset"])
    model = build_model(spec, info.n_features, info.n_outputs)
    model.load_state_dict(load_safetensors(weights))
    model.eval()
    return TrainedModel(model=model, spec=spec, info=info, document=document, uri=uri)
