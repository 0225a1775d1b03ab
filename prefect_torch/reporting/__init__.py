"""What a Prefect UI user sees: progress, tables, loss curves, summaries, assets, run names.

Cards use this package; the engine never does (it stays Prefect-free and talks
to reporting only through its ``Callback`` hooks).

Artifacts, by key; every key starts with ``<flow>-<dataset file>-<model>``
(``artifact_scope``, e.g. ``train-housing-csv-mlp-64x64-``), so the Artifacts page
groups one model trained on one dataset by one flow:

- ``…-train-progress``: progress of the training, per epoch and per
  ``TrainSpec.progress_every`` steps
- ``…-train-history`` (table), ``…-train-loss-curves`` (markdown with an SVG chart),
  ``…-train-summary`` (markdown): at the end of training, also when it fails
- ``…-evaluate-<split>-metrics`` (table), ``…-evaluate-<split>-summary`` (markdown)
- ``…-model-card`` (markdown): what a training flow produced and where it is stored
- step-wise flow only: ``…-train-step-loss-curve`` (markdown), and
  ``…-train-step-losses`` (table) on each epoch's flow run
"""

from prefect_torch.reporting.assets import asset_key, dataset_asset, model_asset
from prefect_torch.reporting.evaluation import publish_evaluation
from prefect_torch.reporting.model_card import MODEL_CARD_KEY, model_card, publish_model_card
from prefect_torch.reporting.plot import loss_curves_markdown, loss_curves_svg, svg_data_uri
from prefect_torch.reporting.publish import Publisher, artifact_key, artifact_scope, current_run_name, in_run
from prefect_torch.reporting.summary import RunSummary, describe_error
from prefect_torch.reporting.tables import history_rows, history_table, metrics_rows
from prefect_torch.reporting.text import display_uri, scrub_secrets
from prefect_torch.reporting.training import TrainingReport

__all__ = [
    "TrainingReport",
    "publish_evaluation",
    "publish_model_card",
    "model_card",
    "MODEL_CARD_KEY",
    "RunSummary",
    "describe_error",
    "Publisher",
    "artifact_key",
    "artifact_scope",
    "current_run_name",
    "in_run",
    "history_rows",
    "history_table",
    "metrics_rows",
    "loss_curves_svg",
    "loss_curves_markdown",
    "svg_data_uri",
    "asset_key",
    "dataset_asset",
    "model_asset",
    "display_uri",
    "scrub_secrets",
]
