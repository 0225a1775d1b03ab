"""Scheduled retraining with champion/challenger promotion: ``retrain_flow``.

One run: find the newest dataset under ``data.uri``; train a challenger on it
(in this run, or on the GPU pool when ``training.device`` is 'cuda'); evaluate
the challenger and the current champion on the same held-out rows of that
dataset; register the challenger as a new version; move the ``champion`` alias
to it only if the chosen metric improved by at least ``min_improvement``. The
decision, both scores and the reason are recorded as a markdown artifact.

What the registry sees, in order: the challenger's model folder, then its
version document, then (if promoted) the alias move, as a compare-and-swap
against the champion this run evaluated. A run that fails or is killed before
the end leaves the champion as it was; a concurrent promotion by another run
makes this one keep the champion rather than overwrite it.
"""

from __future__ import annotations

import glob
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from prefect_torch.blocks.registry import DEFAULT_ALIAS, ModelRegistry, ModelVersion, RegistryConflictError
from prefect_torch.engine.loop import TrainSpec
from prefect_torch.engine.metrics import PRIMARY_METRIC
from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec
from prefect_torch.engine.spec import Spec
from prefect_torch.errors import ConfigError, DataError
from prefect_torch.flows.params import DatasetSpec
from prefect_torch.flows.routing import (
    RoutingSpec,
    evaluate_stored,
    heldout_rows,
    load_storage,
    train_routed,
)

#: Metrics where a larger value is better; every other metric is an error or loss.
HIGHER_IS_BETTER = {"r2": True, "accuracy": True, "f1_macro": True, "roc_auc": True,
                    "mse": False, "mae": False, "rmse": False, "log_loss": False}
DATA_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")
MetricName = Literal["auto", "r2", "mse", "mae", "rmse", "accuracy", "f1_macro", "log_loss", "roc_auc"]
_GLOB_CHARS = re.compile(r"[*?\[]")


class NewestDataset(DatasetSpec):
    """Where new datasets arrive, and how to learn from them."""

    uri: str = Field(
        title="URI",
        description=(
            "Where new datasets arrive: a folder, a glob such as /data/housing/*.csv, or an "
            "s3:// prefix. The newest CSV or Parquet file there is trained on."
        )
    )

    def for_file(self, uri: str) -> DatasetSpec:
        """The dataset spec of one file found under ``uri``."""
        return DatasetSpec(**{**self.model_dump(include=set(DatasetSpec.model_fields)), "uri": uri})


class PromotionSpec(Spec):
    """When a challenger replaces the champion."""

    metric: MetricName = Field(
        default="auto",
        description="Metric compared on the held-out rows; 'auto' is r2 for regression and accuracy for classification.",
    )
    min_improvement: float = Field(
        default=0.0,
        ge=0.0,
        description="Promote only if the challenger beats the champion by at least this much, in the metric's units (it must always be strictly better).",
    )
    alias: str = Field(default=DEFAULT_ALIAS, description="Registry alias of the model in production.")


class RetrainResult(BaseModel):
    """What one retraining run decided, and why."""

    model_name: str = Field(description="Registered model name.")
    promoted: bool = Field(description="Whether the challenger became the champion.")
    reason: str = Field(description="Why it was or was not promoted.")
    metric: str = Field(description="The metric compared.")
    higher_is_better: bool = Field(description="Whether a larger value of the metric is better.")
    challenger_score: float = Field(description="The challenger's metric on the held-out rows.")
    champion_score: float | None = Field(description="The champion's metric on the same rows; empty without a champion.")
    challenger_version: int = Field(description="Registry version of the challenger.")
    champion_version: int | None = Field(description="Version the alias points at after this run.")
    previous_champion_version: int | None = Field(description="Version the alias pointed at before this run.")
    dataset_uri: str = Field(description="The dataset trained and evaluated on.")
    heldout_rows: int = Field(description="Rows both models were evaluated on.")
    challenger_model_uri: str = Field(description="Where the challenger model is stored.")


# -- finding the newest dataset ----------------------------------------------------------


@task(name="find_newest_dataset", cache_policy=NO_CACHE, persist_result=False)
def find_newest_dataset(uri: str) -> str:
    """The newest CSV or Parquet file under ``uri`` (folder, glob or URL prefix)."""
    found = _local_files(uri) if "://" not in uri or uri.startswith("file://") else _remote_files(uri)
    found = [(mtime, name) for mtime, name in found if _is_dataset(name)]
    if not found:
        raise DataError(
            f"No dataset under {uri}: no {', '.join(DATA_SUFFIXES)} file there. Put the new "
            "data there, or point data.uri at the folder, glob or prefix where it arrives."
        )
    return max(found)[1]


def _is_dataset(name: str) -> bool:
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return base.lower().endswith(DATA_SUFFIXES) and not base.startswith((".", "_"))


def _local_files(uri: str) -> list[tuple[float, str]]:
    path = os.path.expanduser(uri.removeprefix("file://"))
    if _GLOB_CHARS.search(path):
        names = glob.glob(path, recursive=True)
    elif os.path.isdir(path):
        names = [str(p) for p in Path(path).rglob("*")]
    else:
        names = [path] if os.path.isfile(path) else []
    return [(os.stat(name).st_mtime, name) for name in names if os.path.isfile(name)]


def _remote_files(uri: str) -> list[tuple[float, str]]:
    import fsspec

    protocol = uri.split("://", 1)[0]
    # A fresh client without listing cache: a new upload must be seen at once.
    options = {"skip_instance_cache": True, "use_listings_cache": False} if protocol in ("s3", "s3a") else {}
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
        if _GLOB_CHARS.search(path):
            entries = fs.glob(path, detail=True)
        elif path.endswith("/") or fs.isdir(path):
            entries = fs.find(path, detail=True)
        else:  # a key prefix such as bucket/data/housing-
            parent = path.rsplit("/", 1)[0]
            entries = {n: i for n, i in fs.find(parent, detail=True).items() if n.startswith(path)}
    except FileNotFoundError:
        return []
    except Exception as exc:
        raise DataError(f"Cannot list {uri}: {type(exc).__name__}: {exc}. Check the URL, endpoint and credentials.") from exc
    found = []
    for name, info in entries.items():
        if info.get("type") == "directory":
            continue
        stamp = info.get("LastModified") or info.get("mtime") or info.get("created") or 0
        seconds = stamp.timestamp() if isinstance(stamp, datetime) else float(stamp)
        found.append((seconds, f"{protocol}://{name}"))
    return found


# -- the decision -----------------------------------------------------------------------


def decide(
    metric: str,
    challenger: float,
    champion: float | None,
    min_improvement: float,
) -> tuple[bool, str]:
    """Whether the challenger replaces the champion, and a sentence saying why."""
    higher = HIGHER_IS_BETTER[metric]
    if champion is None:
        return True, f"No champion yet: the first model becomes the champion ({metric} {challenger:.6g})."
    if not math.isfinite(challenger):
        return False, f"The challenger's {metric} is {challenger}: not a usable score; the champion stays."
    if not math.isfinite(champion):
        return True, f"The champion's {metric} on the new data is {champion}; the challenger's {challenger:.6g} replaces it."
    improvement = challenger - champion if higher else champion - challenger
    direction = "higher" if higher else "lower"
    compared = f"{metric} {challenger:.6g} vs champion {champion:.6g} ({direction} is better, improvement {improvement:+.6g})"
    if improvement <= 0:
        return False, f"Not better: {compared}; the champion stays."
    if improvement < min_improvement:
        return False, f"Better by less than min_improvement {min_improvement:g}: {compared}; the champion stays."
    return True, f"Better by at least min_improvement {min_improvement:g}: {compared}."


def _metric_for(problem: str, chosen: str, available: dict[str, float]) -> str:
    metric = PRIMARY_METRIC[problem] if chosen == "auto" else chosen
    if metric not in available:
        raise ConfigError(
            f"promotion.metric {metric!r} is not measured for {problem} problems; "
            f"use one of {sorted(available)} or 'auto'."
        )
    return metric


def _check_not_placeholder(**values: str) -> None:
    for name, value in values.items():
        if "{{" in value and "}}" in value:
            raise ConfigError(
                f"Parameter {name} is still the template {value!r}: the deployment was applied "
                "without that environment variable. Set it and run `prefect deploy --all` again, "
                "or edit the retrain deployment's parameters in prefect.yaml (or the UI)."
            )


# -- the artifact -----------------------------------------------------------------------


def _record(model_name: str, rows: list[tuple[str, str]], title: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    table = "\n".join(f"| {field} | {value} |" for field, value in rows)
    key = "retrain-" + (re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-") or "model")
    create_markdown_artifact(
        markdown=f"# {title}\n\n| | |\n|---|---|\n{table}\n",
        key=key,
        description=f"Champion/challenger decision for {model_name}",
    )


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.6g}"


# -- the flow ---------------------------------------------------------------------------


@flow(name="retrain", result_serializer="json")
def retrain_flow(
    data: NewestDataset,
    model_name: str = "model",
    model: ModelSpec = ModelSpec(),
    optimizer: OptimizerSpec = OptimizerSpec(),
    training: TrainSpec = TrainSpec(),
    promotion: PromotionSpec = PromotionSpec(),
    routing: RoutingSpec = RoutingSpec(),
    storage_block: str | None = None,
    registry_folder: str = "registry",
) -> RetrainResult:
    """Train a challenger on the newest data, compare it with the champion on the
    same held-out rows, and promote it only if it is better.

    Args:
        data: Where new datasets arrive (the newest file is used) and how to split it.
        model_name: Name of the model in the registry.
        model: The network to train.
        optimizer: The optimizer and its settings.
        training: The training loop; device 'cuda' trains on the GPU pool.
        promotion: The metric compared and the margin a challenger must beat.
        routing: Which deployment trains on the GPU and what to do without one.
        storage_block: Saved Torch Storage block for models and the registry;
            empty: PREFECT_TORCH_STORAGE_BLOCK on the worker, else a local folder.
        registry_folder: Folder of the registry inside the storage.
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    _check_not_placeholder(**{"data.uri": data.uri, "data.target": data.target, "model_name": model_name})
    registry = ModelRegistry(storage=load_storage(storage_block), folder=registry_folder)
    champion_record = registry.current_alias(model_name, promotion.alias)
    dataset = data.for_file(find_newest_dataset(data.uri))
    logger.info("Challenger trains on %s; champion: %s.", dataset.uri,
                f"version {champion_record.version}" if champion_record else "none")
    try:
        trained = train_routed(dataset, model, optimizer, training, routing, storage_block)
        rows = heldout_rows(dataset)
        challenger_metrics = evaluate_stored(registry.storage, trained.model_path, rows, "challenger")
        champion: ModelVersion | None = None
        champion_metrics = None
        if champion_record is not None:
            champion = registry.get_version(model_name, champion_record.version)
            champion_metrics = evaluate_stored(registry.storage, champion.model_path, rows, "champion")
    except Exception as exc:
        _record(model_name, [("Decision", "kept the champion: the challenger failed"),
                             ("Dataset", dataset.uri), ("Error", f"{type(exc).__name__}: {exc}")],
                f"Retrain {model_name}: challenger failed")
        raise

    metric = _metric_for(trained.problem, promotion.metric, challenger_metrics)
    champion_score = champion_metrics.get(metric) if champion_metrics is not None else None
    promote, reason = decide(metric, challenger_metrics[metric], champion_score, promotion.min_improvement)
    version = registry.register(
        model_name,
        trained.model_path,
        metrics=challenger_metrics,
        problem=trained.problem,
        data_key=trained.data_key,
        dataset_uri=dataset.uri,
        specs=_specs(dataset, model, optimizer, training),
        code_version=trained.code_version,
        description=reason,
        flow_run_id=str(flow_run.id) if flow_run.id else None,
    )
    previous = champion_record.version if champion_record else None
    current = previous
    if promote:
        try:
            registry.set_alias(model_name, promotion.alias, version.version, expected_version=previous,
                               reason=reason, flow_run_id=version.flow_run_id)
            current = version.version
        except RegistryConflictError as exc:
            promote, reason = False, f"{reason} Not promoted: {exc}"
            moved = registry.current_alias(model_name, promotion.alias)
            current = moved.version if moved else None
    logger.info("%s %s", "Promoted." if promote else "Champion kept.", reason)
    result = RetrainResult(
        model_name=model_name, promoted=promote, reason=reason, metric=metric,
        higher_is_better=HIGHER_IS_BETTER[metric], challenger_score=challenger_metrics[metric],
        champion_score=champion_score, challenger_version=version.version, champion_version=current,
        previous_champion_version=previous, dataset_uri=dataset.uri, heldout_rows=len(rows),
        challenger_model_uri=trained.model_uri,
    )
    _record(model_name, _decision_rows(result, promotion.min_improvement),
            f"Retrain {model_name}: {'challenger promoted' if promote else 'champion kept'}")
    return result


def _specs(dataset: DatasetSpec, model: ModelSpec, optimizer: OptimizerSpec, training: TrainSpec) -> dict[str, Any]:
    return {
        "dataset": dataset.model_dump(mode="json"),
        "model": model.model_dump(mode="json"),
        "optimizer": optimizer.model_dump(mode="json"),
        "training": training.model_dump(mode="json"),
    }


def _decision_rows(result: RetrainResult, margin: float) -> list[tuple[str, str]]:
    return [
        ("Decision", "promoted the challenger" if result.promoted else "kept the champion"),
        ("Reason", result.reason),
        ("Metric", f"{result.metric} ({'higher' if result.higher_is_better else 'lower'} is better)"),
        ("Challenger", f"version {result.challenger_version}: {_fmt(result.challenger_score)}"),
        ("Champion", f"version {result.previous_champion_version}: {_fmt(result.champion_score)}"
         if result.previous_champion_version else "none"),
        ("Min improvement", f"{margin:g}"),
        ("Held-out rows", str(result.heldout_rows)),
        ("Dataset", result.dataset_uri),
        ("Challenger model", result.challenger_model_uri),
        ("Decided at", datetime.now(timezone.utc).isoformat(timespec="seconds")),
    ]


__all__ = [
    "retrain_flow",
    "find_newest_dataset",
    "decide",
    "NewestDataset",
    "PromotionSpec",
    "RetrainResult",
    "HIGHER_IS_BETTER",
]
