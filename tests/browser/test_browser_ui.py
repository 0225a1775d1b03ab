"""What a Prefect UI user sees, checked in headless Chromium against a real server.

One train_flow run (in a subprocess, against ``prefect server start``), then the
UI is walked the way a user would: the flow run's Artifacts tab, each artifact's
page through the links the UI itself offers, the task runs, the asset event and
the deployment's parameter form. Screenshots land in test-output/browser/.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

EXPECTED_KEYS = (
    "train-progress", "train-history", "train-loss-curves", "train-summary",
    "evaluate-test-metrics", "evaluate-test-summary", "model-card",
)
# The SPA loads lazily on a shared, busy machine: generous waits, no timing asserts.
WAIT_MS = 90_000


@pytest.fixture(scope="module")
def trained(prefect_server):
    folder = prefect_server["root"] / "run"
    folder.mkdir()
    completed = subprocess.run(
        [sys.executable, str(REPO / "tests" / "browser" / "run_training.py"), str(folder)],
        env=prefect_server["env"], cwd=folder, capture_output=True, text=True, timeout=420,
    )
    line = next((line for line in completed.stdout.splitlines() if line.startswith("RESULT ")), None)
    if completed.returncode != 0 or line is None:
        pytest.fail(f"train_flow failed (exit {completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}")
    return json.loads(line.removeprefix("RESULT "))


@pytest.fixture(scope="module")
def page(browser):
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    page.close()


@pytest.fixture(scope="module")
def artifact_pages(prefect_server, trained, page, screenshots):
    """The flow run's Artifacts tab, then each card's link, then the link to the artifact itself."""
    from playwright.sync_api import expect

    base = prefect_server["base"]
    page.goto(f"{base}/v2/runs/flow-run/{trained['flow_run_id']}?tab=Artifacts")
    for key in EXPECTED_KEYS:
        expect(page.locator(f'a[href$="/artifacts/key/{key}"]')).to_be_visible()
    page.screenshot(path=screenshots / "01-flow-run-artifacts.png", full_page=True)
    key_pages = {key: page.locator(f'a[href$="/artifacts/key/{key}"]').get_attribute("href") for key in EXPECTED_KEYS}
    urls = {}
    for key, href in key_pages.items():
        page.goto(base + href)
        link = page.locator('a[href*="/artifacts/artifact/"]').first
        expect(link).to_be_visible()
        urls[key] = base + link.get_attribute("href")
    return urls


def open_artifact(page, url: str, heading: str, flow_run: str = "train[housing.csv]"):
    from playwright.sync_api import expect

    page.goto(url)
    expect(page.get_by_text(heading, exact=False).first).to_be_visible()
    # The artifact belongs to the run it should: its sidebar links to that flow run.
    expect(page.get_by_role("link", name=flow_run, exact=True).first).to_be_visible()
    return page


def test_progress_artifact_reached_100_percent(page, artifact_pages, trained, screenshots):
    from playwright.sync_api import expect

    open_artifact(page, artifact_pages["train-progress"], "Progress")
    expect(page.get_by_text("Progress: 100%")).to_be_visible()
    expect(page.get_by_text(f"completed {trained['epochs']} epochs", exact=False).first).to_be_visible()
    page.screenshot(path=screenshots / "02-progress.png", full_page=True)


def test_history_table_shows_every_epoch(page, artifact_pages, trained, screenshots):
    from playwright.sync_api import expect

    open_artifact(page, artifact_pages["train-history"], "train_loss")
    table = page.locator("table").first
    for column in ("epoch", "train_loss", "val_loss", "val_r2", "lr", "samples_per_s"):
        expect(table.get_by_role("columnheader", name=column, exact=True)).to_be_visible()
    rows = table.locator("tbody tr")
    expect(rows).to_have_count(trained["epochs"])
    assert rows.nth(0).locator("td").first.inner_text().strip() == "1"
    page.screenshot(path=screenshots / "03-history-table.png", full_page=True)


def test_training_summary_renders_as_markdown(page, artifact_pages, screenshots):
    from playwright.sync_api import expect

    open_artifact(page, artifact_pages["train-summary"], "Training summary")
    expect(page.get_by_role("heading", name=re.compile(r"Training summary — train\[mlp-32x32"))).to_be_visible()
    for label in ("Problem", "Data key", "Model spec", "Device", "Wall time", "Model stored at"):
        expect(page.get_by_role("cell", name=label, exact=True)).to_be_visible()
    expect(page.get_by_role("heading", name=re.compile(r"Final epoch"))).to_be_visible()
    page.screenshot(path=screenshots / "04-train-summary.png", full_page=True)


def _assert_plot_rendered(page) -> None:
    from playwright.sync_api import expect

    image = page.locator('img[src^="data:image/svg+xml"]').first
    expect(image).to_be_visible()
    # Decoded and laid out: a broken image has naturalWidth 0.
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    box = image.bounding_box()
    assert box is not None and box["width"] > 300 and box["height"] > 150, box


def test_loss_curves_render_as_an_image(page, artifact_pages, screenshots):
    open_artifact(page, artifact_pages["train-loss-curves"], "Loss curves")
    _assert_plot_rendered(page)
    page.get_by_text("val loss:", exact=False).first.wait_for()
    page.screenshot(path=screenshots / "05-loss-curves.png", full_page=True)


def test_model_card_says_where_the_model_is_and_shows_the_curves(page, artifact_pages, trained, screenshots):
    from playwright.sync_api import expect

    open_artifact(page, artifact_pages["model-card"], "Model card")
    expect(page.get_by_text(trained["model_uri"], exact=True).first).to_be_visible()
    expect(page.get_by_role("heading", name="Metrics on the test split")).to_be_visible()
    _assert_plot_rendered(page)
    page.screenshot(path=screenshots / "06-model-card.png", full_page=True)


def test_the_classic_ui_renders_the_plot_too(page, prefect_server, artifact_pages, screenshots):
    # The V1 UI is one click away ("Switch to V1 UI"); its markdown renderer is a different one.
    artifact_id = artifact_pages["train-loss-curves"].rsplit("/", 1)[-1]
    open_artifact(page, f"{prefect_server['base']}/artifacts/artifact/{artifact_id}", "Loss curves")
    _assert_plot_rendered(page)
    page.screenshot(path=screenshots / "07-loss-curves-v1.png", full_page=True)


def test_task_runs_are_named_for_what_ran(page, prefect_server, trained, screenshots):
    from playwright.sync_api import expect

    page.goto(f"{prefect_server['base']}/v2/runs/flow-run/{trained['flow_run_id']}?tab=TaskRuns")
    for name in ("data_split[target=y 70/15/15]", "model_define[mlp-32x32]", "train[mlp-32x32 adam lr=0.003]",
                 "evaluate[test]"):
        expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
    expect(page.get_by_role("link", name=re.compile(r"^data_load\[.*housing\.csv\]$"))).to_be_visible()
    expect(page.get_by_role("link", name=re.compile(r"^model_save\[.*model\]$"))).to_be_visible()
    page.screenshot(path=screenshots / "08-task-runs.png", full_page=True)


def test_the_model_asset_event_links_the_dataset(page, prefect_server, trained, screenshots):
    from playwright.sync_api import expect

    event = _materialization_event(prefect_server["base"], trained["flow_run_id"])
    day = event["occurred"][:10]
    page.goto(f"{prefect_server['base']}/v2/events/event/{day}/{event['id']}")
    expect(page.get_by_text("prefect.asset.materialization.succeeded")).to_be_visible()
    expect(page.get_by_text("mlp-32x32 model")).to_be_visible()
    expect(page.get_by_text(re.compile(r"^model_save\["))).to_be_visible()
    related = {r["prefect.resource.id"] for r in event["related"] if r.get("prefect.resource.role") == "asset"}
    assert any(key.endswith("/housing.csv") for key in related), related
    page.screenshot(path=screenshots / "09-asset-lineage.png", full_page=True)


def _materialization_event(base: str, flow_run_id: str) -> dict:
    """The server stores events in batches: poll its API for the model's materialization."""
    query = {
        "filter": {
            "event": {"prefix": ["prefect.asset.materialization"]},
            "related": {"id": [f"prefect.flow-run.{flow_run_id}"]},
        },
        "limit": 5,
    }
    deadline = time.monotonic() + 90
    while True:
        events = httpx.post(f"{base}/api/events/filter", json=query, timeout=10).json()["events"]
        if events:
            return events[0]
        if time.monotonic() > deadline:
            pytest.fail("No asset materialization event reached the server within 90 s.")
        time.sleep(1)


def test_a_failed_run_shows_the_error_in_its_summary(page, prefect_server, trained, screenshots):
    from playwright.sync_api import expect

    base = prefect_server["base"]
    query = {
        "artifacts": {"flow_run_id": {"any_": [trained["failed_flow_run_id"]]}, "key": {"any_": ["train-summary"]}},
    }
    (artifact,) = httpx.post(f"{base}/api/artifacts/filter", json=query, timeout=10).json()
    open_artifact(page, f"{base}/v2/artifacts/artifact/{artifact['id']}", "Training summary", "train[overflow.csv]")
    markdown = page.get_by_test_id("markdown-display")
    expect(markdown.get_by_text("Failed", exact=True)).to_be_visible()
    expect(markdown.get_by_text(re.compile(r"TrainingError: The training loss became inf at epoch 1, batch 0"))).to_be_visible()
    expect(markdown.get_by_text("No epoch completed before the error.")).to_be_visible()
    # The whole message wraps into view, including the fix at its end.
    fix = markdown.get_by_text(re.compile(r"check the data for extreme values"))
    expect(fix).to_be_in_viewport()
    page.screenshot(path=screenshots / "11-failed-run-summary.png", full_page=True)


def test_parameter_form_shows_descriptions_defaults_and_choices(page, prefect_server, trained, screenshots):
    from playwright.sync_api import expect

    page.goto(f"{prefect_server['base']}/v2/deployments/deployment/{trained['deployment_id']}/run")
    for description in (
        "Where the data is (local path or s3:// URL), the target column and how to split it.",
        "Optimizer: adam, adamw, sgd or rmsprop.",
        "Passes over the training split.",
        "Learning-rate schedule.",
        "auto (CUDA when available), cpu or cuda.",
        "Folder or URL to save the model to; a folder under the Prefect home when empty.",
    ):
        expect(page.get_by_text(description, exact=True)).to_be_visible()
    # Defaults are filled in, not left empty: the MLP's layer sizes [64, 64] and the batch size 64.
    expect(page.locator('input[value="64"]')).to_have_count(3)
    page.screenshot(path=screenshots / "10-parameter-form.png", full_page=True)
