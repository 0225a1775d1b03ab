"""train_flow end to end against a real Prefect API: every artifact a UI user sees,
the run names, the asset lineage, and no data rows anywhere."""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

from prefect_torch.flows import train_flow
from prefect_torch.reporting.assets import asset_key
from prefect_torch.reporting.text import round_number
from tests.reporting.artifacts import asset_events, run_artifacts, table_data, task_run_names

pytestmark = pytest.mark.usefixtures("prefect_api")

EPOCHS = 4


def distinctive_frame(rows: int = 240) -> pd.DataFrame:
    """Values with many digits, so any that leaked into an artifact would be found by text search."""
    rng = np.random.default_rng(7)
    frame = pd.DataFrame(
        {name: np.round(rng.uniform(1000, 9999, rows), 7) for name in ("alpha", "beta", "gamma")}
    )
    frame["target"] = np.round(frame["alpha"] * 0.5 - frame["beta"] * 0.25 + rng.normal(size=rows), 7)
    return frame


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flow")
    data = folder / "prices.csv"
    frame = distinctive_frame()
    frame.to_csv(data, index=False)
    state = train_flow(
        dataset={"uri": str(data), "target": "target"},
        model={"hidden": [16]},
        optimizer={"lr": 0.01},
        training={"epochs": EPOCHS, "batch_size": 32, "device": "cpu"},
        output=str(folder / "model"),
        return_state=True,
    )
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    return {
        "flow_run_id": flow_run_id, "result": state.result(), "data": data, "csv": data.read_text(),
        "artifacts": run_artifacts(flow_run_id, scope="train-prices-csv-mlp-16"),
    }


def test_every_artifact_is_there_keyed_by_flow_dataset_and_model(finished_run):
    assert set(finished_run["artifacts"]) == {
        "train-progress", "train-history", "train-loss-curves", "train-summary",
        "evaluate-test-metrics", "evaluate-test-summary", "model-card",
    }


def test_progress_ends_at_100_percent(finished_run):
    progress = finished_run["artifacts"]["train-progress"]
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert progress.description.startswith(f"completed {EPOCHS} epochs · train_loss ")


def test_history_table_has_one_row_per_epoch(finished_run):
    rows = table_data(finished_run["artifacts"]["train-history"])
    assert [row["epoch"] for row in rows] == list(range(1, EPOCHS + 1))
    assert set(rows[0]) == {"epoch", "train_loss", "val_loss", "val_r2", "lr", "seconds", "samples_per_s"}
    # The number the markdown shows: four significant digits (round_number).
    assert rows[-1]["train_loss"] == round_number(finished_run["result"].history[-1]["train_loss"])


def test_loss_curves_are_an_svg_image(finished_run):
    markdown = finished_run["artifacts"]["train-loss-curves"].data
    encoded = re.search(r"\(data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", markdown).group(1)
    svg = ET.fromstring(base64.b64decode(encoded))
    assert len(list(svg.iter("{http://www.w3.org/2000/svg}polyline"))) == 2  # train and val


def test_train_summary_names_problem_data_model_device_and_time(finished_run):
    summary = finished_run["artifacts"]["train-summary"].data
    result = finished_run["result"]
    for fact in ("**Completed**", "- **Problem:** regression (loss: mse)", f"`{result.data_key}`",
                 "mlp-16 — 81 parameters", "- **Device:** cpu", f"- **Epochs:** {EPOCHS} of {EPOCHS}",
                 "- **Wall time:**", "val\\_r2"):
        assert fact in summary, fact


def test_evaluation_table_and_summary(finished_run):
    artifacts, result = finished_run["artifacts"], finished_run["result"]
    rows = {row["metric"]: row["value"] for row in table_data(artifacts["evaluate-test-metrics"])}
    assert set(rows) == {"mse", "mae", "rmse", "r2"}
    assert rows["r2"] == round_number(result.metrics["r2"])
    assert "Metrics on the test split" in artifacts["evaluate-test-summary"].data


def test_model_card_says_where_the_model_is_stored(finished_run):
    card = finished_run["artifacts"]["model-card"]
    result = finished_run["result"]
    assert card.task_run_id is None  # the flow run's own artifact
    assert f"- **Model stored at:** `{result.model_uri}`" in card.data
    assert f"prefect_torch.load_model('{result.model_uri}')" in card.data
    assert "- **Dataset:** `" in card.data and "prices.csv" in card.data
    assert "standardised target" in card.data  # a regression loss says which scale it is on
    assert "data:image/svg+xml;base64," in card.data


def test_no_data_row_appears_in_any_artifact(finished_run):
    lines = finished_run["csv"].strip().splitlines()
    cells = {cell for line in lines[1:] for cell in line.split(",")}
    assert all(len(cell) >= 9 for cell in cells)  # long enough that a match means a leak
    for key, artifact in finished_run["artifacts"].items():
        text = f"{artifact.data} {artifact.description}"
        leaked = sorted(cell for cell in cells if cell in text)
        assert not leaked, f"{key} contains data values: {leaked[:5]}"
        assert not any(line in text for line in lines[1:]), key


def test_task_runs_say_what_ran(finished_run):
    names = task_run_names(finished_run["flow_run_id"])
    model_uri = finished_run["result"].model_uri
    assert names == sorted([
        "data_load[prices.csv]",
        "data_split[target=target 70/15/15]",
        "model_define[mlp-16]",
        "train[mlp-16 adam lr=0.01]",
        "evaluate[test]",
        "model_save[model]",
    ])
    assert model_uri.endswith("/model")


def test_the_model_asset_is_materialized_from_the_dataset_asset(finished_run):
    events = asset_events(finished_run["flow_run_id"], expected=2)
    by_name = {event.event: event for event in events}
    materialized = by_name["prefect.asset.materialization.succeeded"]
    dataset_key, model_key = asset_key(str(finished_run["data"])), asset_key(finished_run["result"].model_uri)
    assert materialized.resource.id == model_key
    assert dataset_key in {related.id for related in materialized.related if related.role == "asset"}
    assert materialized.payload["test_metrics"]["r2"] == round_number(finished_run["result"].metrics["r2"])
    assert by_name["prefect.asset.referenced"].resource.id == dataset_key
