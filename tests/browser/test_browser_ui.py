"""What a Prefect UI user sees, checked in headless Chromium against a real server.

train_flow and the step-wise flow run (in a subprocess, against ``prefect server
start``), then the UI is walked the way a user would: the flow run's Artifacts tab,
each artifact's page through the links the UI itself offers, the task runs, the
asset event, the step-wise run's graph and epochs, a cached rerun's model card, the
deployment's parameter form and the retrain deployment applied without its
variables. Screenshots land in test-output/browser/.
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

# Each artifact the train_flow run publishes, by what its card on the run's Artifacts tab
# shows (its description): how a user tells them apart.
CARDS = {
    "train-progress": "completed 6 epochs",
    "train-history": "Per-epoch history of train[mlp-32x32",
    "train-loss-curves": "Train and validation loss per epoch of train[mlp-32x32",
    "train-summary": "Summary of train[mlp-32x32",
    "evaluate-test-metrics": "Metrics of mlp-32x32 on the test split",
    "evaluate-test-summary": "Summary of evaluate[test]",
    "model-card": "The model trained by train[housing.csv]",
}
# The keys group one model on one dataset by flow.
SCOPE = "train-housing-csv-mlp-32x32"
STEPWISE_SCOPE = "train-stepwise-housing-csv-mlp-32x32"
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
    """The flow run's Artifacts tab, each card found by what it shows, then its link."""
    base = prefect_server["base"]
    page.goto(f"{base}/v2/runs/flow-run/{trained['flow_run_id']}?tab=Artifacts")
    hrefs = {kind: card_link(page, text) for kind, text in CARDS.items()}
    page.screenshot(path=screenshots / "01-flow-run-artifacts.png", full_page=True)
    return {kind: artifact_url(page, base, href) for kind, href in hrefs.items()}


def card_link(page, text: str) -> str:
    """The link of the artifact card that shows ``text``: the nearest artifact link around it."""
    from playwright.sync_api import expect

    shown = page.get_by_text(text, exact=False).first
    expect(shown).to_be_visible()
    href = shown.evaluate(
        """element => {
            for (let node = element; node; node = node.parentElement) {
                const link = node.matches('a[href*="/artifacts/"]') ? node : node.querySelector('a[href*="/artifacts/"]');
                if (link) return link.getAttribute('href');
            }
            return null;
        }"""
    )
    assert href, f"no artifact link around the card showing {text!r}"
    return href


def artifact_url(page, base: str, href: str) -> str:
    """The artifact's own page. Prefect 3.9 links a run's card there; 3.8 links the key's
    page, whose newest version (this run's: keys are scoped) links to it."""
    from playwright.sync_api import expect

    if "/artifacts/artifact/" in href:
        return base + href
    page.goto(base + href)
    link = page.locator('a[href*="/artifacts/artifact/"]').first
    expect(link).to_be_visible()
    return base + link.get_attribute("href")


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
    markdown = page.get_by_test_id("markdown-display")
    for label in ("Problem:", "Data key:", "Model spec:", "Device:", "Wall time:", "Model stored at:"):
        expect(markdown.get_by_text(label, exact=True)).to_be_visible()
    assert_no_empty_header_row(page)
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
    assert_no_empty_header_row(page)
    # The model spec wraps inside the card instead of running off its right edge.
    spec = page.get_by_test_id("markdown-display").locator("li", has_text="Model spec:").first
    assert spec.evaluate("li => li.scrollWidth <= li.clientWidth + 1")
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
    for name in ("data_load[housing.csv]", "data_split[target=y 70/15/15]", "model_define[mlp-32x32]",
                 "train[mlp-32x32 adam lr=0.003]", "evaluate[test]", "model_save[model]"):
        expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
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
        "artifacts": {"flow_run_id": {"any_": [trained["failed_flow_run_id"]]}, "key": {"like_": "%-train-summary"}},
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


def assert_no_empty_header_row(page) -> None:
    """Every table in the markdown has a header a person can read."""
    headers = page.get_by_test_id("markdown-display").locator("thead tr")
    texts = [headers.nth(i).inner_text().strip() for i in range(headers.count())]
    assert all(texts), f"a table with an empty header row: {texts}"


# -- the step-wise run ----------------------------------------------------------------------


def flow_run_graph(base: str, flow_run_id: str) -> list[dict]:
    """The nodes of the run's graph at its top level, as the UI draws it (graph-v2)."""
    graph = httpx.get(f"{base}/api/flow_runs/{flow_run_id}/graph-v2", timeout=30).json()
    return [node for _, node in graph["nodes"]]


def all_task_run_names(base: str, flow_run_ids: list[str]) -> list[str]:
    names, offset = [], 0
    while True:
        page = httpx.post(f"{base}/api/task_runs/filter", timeout=30, json={
            "flow_runs": {"id": {"any_": flow_run_ids}}, "limit": 200, "offset": offset,
        }).json()
        names += [run["name"] for run in page]
        offset += len(page)
        if len(page) < 200:
            return names


def epoch_runs(base: str, flow_run_id: str) -> list[dict]:
    runs = httpx.post(f"{base}/api/flow_runs/filter", timeout=30, json={
        "flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}, "sort": "START_TIME_ASC",
    }).json()
    return sorted(runs, key=lambda run: run["name"])


def test_the_stepwise_graph_shows_one_node_per_epoch(page, prefect_server, trained, screenshots):
    from playwright.sync_api import expect

    base, run_id, epochs = prefect_server["base"], trained["stepwise_flow_run_id"], trained["stepwise_epochs"]
    nodes = flow_run_graph(base, run_id)
    labels = [node["label"] for node in nodes]
    assert [n["label"] for n in nodes if n["kind"] == "flow-run"] == [
        f"train-stepwise-epoch / epoch {e}/{epochs}" for e in range(1, epochs + 1)
    ]
    # The top level reads at a glance: the setup and closing cards and the epochs, no batch.
    assert not [label for label in labels if "-b" in label], labels
    assert len(nodes) <= 12, labels
    # A batch is two clicks away: its epoch's run holds its cards.
    epoch_ids = [run["id"] for run in epoch_runs(base, run_id)]
    inner = [node["label"] for node in flow_run_graph(base, epoch_ids[0])]
    assert "training_loss[e1-b0]" in inner and "training_epoch_end[e1]" in inner

    page.goto(f"{base}/v2/runs/flow-run/{run_id}")
    expect(page.get_by_text(f"epoch 1/{epochs}").first).to_be_visible()
    page.wait_for_timeout(2000)  # the graph canvas draws after the data arrives
    page.screenshot(path=screenshots / "12-stepwise-run-graph.png", full_page=True)
    page.goto(f"{base}/v2/runs/flow-run/{epoch_ids[0]}?tab=TaskRuns")
    expect(page.get_by_role("link", name="training_loss[e1-b6]", exact=True)).to_be_visible()  # newest first
    page.screenshot(path=screenshots / "13-stepwise-epoch-task-runs.png", full_page=True)


def test_the_stepwise_run_publishes_the_fast_paths_artifacts_and_the_per_step_loss(
    page, prefect_server, trained, screenshots
):
    from playwright.sync_api import expect

    base, run_id = prefect_server["base"], trained["stepwise_flow_run_id"]
    title = "train-stepwise[housing.csv]"
    page.goto(f"{base}/v2/runs/flow-run/{run_id}?tab=Artifacts")
    hrefs = {
        kind: card_link(page, text) for kind, text in {
            "progress": f"completed {trained['stepwise_epochs']} epochs",
            "history": f"Per-epoch history of {title}",
            "loss-curves": f"Train and validation loss per epoch of {title}",
            "step-loss-curve": f"Training loss of every optimizer step of {title}",
            "model-card": f"The model trained by {title}",
        }.items()
    }
    page.screenshot(path=screenshots / "14-stepwise-artifacts.png", full_page=True)
    urls = {kind: artifact_url(page, base, href) for kind, href in hrefs.items()}

    open_artifact(page, urls["loss-curves"], "Loss curves", title)
    _assert_plot_rendered(page)
    open_artifact(page, urls["step-loss-curve"], "Loss per optimizer step", title)
    _assert_plot_rendered(page)
    steps = 2 * 7  # 420 training rows in batches of 64, two epochs
    expect(page.get_by_text(re.compile(rf"^{steps} optimizer steps: ")).first).to_be_visible()
    page.screenshot(path=screenshots / "15-stepwise-step-loss.png", full_page=True)
    open_artifact(page, urls["model-card"], "Model card", title)
    _assert_plot_rendered(page)
    assert_no_empty_header_row(page)
    expect(page.get_by_text("standardised target", exact=False).first).to_be_visible()
    page.screenshot(path=screenshots / "16-stepwise-model-card.png", full_page=True)

    # Each epoch's run shows the loss of each of its optimizer steps.
    first_epoch = epoch_runs(base, run_id)[0]
    page.goto(f"{base}/v2/runs/flow-run/{first_epoch['id']}?tab=Artifacts")
    href = card_link(page, "Training loss of each optimizer step in epoch 1")
    page.goto(artifact_url(page, base, href))
    table = page.locator("table").first
    expect(table.get_by_role("columnheader", name="train_loss", exact=True)).to_be_visible()
    expect(table.locator("tbody tr")).to_have_count(7)
    page.screenshot(path=screenshots / "17-stepwise-epoch-step-losses.png", full_page=True)


def test_keys_are_scoped_and_no_run_name_is_cut(prefect_server, trained):
    base = prefect_server["base"]
    run_ids = [trained["flow_run_id"], trained["stepwise_flow_run_id"]]
    run_ids += [run["id"] for run in epoch_runs(base, trained["stepwise_flow_run_id"])]
    names = all_task_run_names(base, run_ids)
    # Whole file names: nothing cut from the left (a path's start), nothing but a long
    # folder name's end (the step-wise default folder, named by lineage).
    assert not [name for name in names if "[…" in name], names
    assert not [name for name in names if name.startswith(("data_load", "model_save")) and "/" in name], names
    assert names.count("data_load[housing.csv]") == 2
    assert "training_init_optimizer[adam lr=0.003]" in names  # no random suffix
    saves = sorted(name for name in names if name.startswith("model_save"))
    assert saves[0] == "model_save[model]" and re.fullmatch(r"model_save\[training-[0-9a-f]+…?\]", saves[1]), saves

    artifacts = httpx.post(f"{base}/api/artifacts/filter", timeout=30, json={
        "artifacts": {"flow_run_id": {"any_": run_ids}, "key": {"exists_": True}},
    }).json()
    keys = {artifact["key"] for artifact in artifacts}
    assert f"{SCOPE}-model-card" in keys and f"{STEPWISE_SCOPE}-model-card" in keys
    assert not [key for key in keys if not key.startswith((SCOPE + "-", STEPWISE_SCOPE + "-"))], keys


def test_a_cached_rerun_says_its_model_came_from_the_cache(page, prefect_server, trained, screenshots):
    from playwright.sync_api import expect

    base = prefect_server["base"]
    page.goto(f"{base}/v2/runs/flow-run/{trained['cached_flow_run_id']}?tab=Artifacts")
    url = artifact_url(page, base, card_link(page, "The model trained by train[small.csv]"))
    open_artifact(page, url, "Model card", "train[small.csv]")
    markdown = page.get_by_test_id("markdown-display")
    expect(markdown.get_by_text("read from the cache", exact=False).first).to_be_visible()
    expect(markdown.get_by_text("Wall time of this run:", exact=True)).to_be_visible()
    page.screenshot(path=screenshots / "18-cached-model-card.png", full_page=True)


# -- deploying without the retrain variables ---------------------------------------------------


@pytest.fixture(scope="module")
def deployed_without_variables(prefect_server):
    """``prefect-torch pools create`` then ``prefect deploy --all`` as the README shows it,
    without the PREFECT_TORCH_RETRAIN_* and PREFECT_TORCH_MODEL_NAME variables."""
    env = {k: v for k, v in prefect_server["env"].items()
           if not k.startswith(("PREFECT_TORCH_RETRAIN_", "PREFECT_TORCH_MODEL_NAME"))}
    for command in ([sys.executable, "-m", "prefect_torch.cli", "pools", "create"],
                    [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]):
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    deployment = httpx.get(f"{prefect_server['base']}/api/deployments/name/retrain/retrain", timeout=30).json()
    return {"deployment": deployment, "output": done.stdout + done.stderr}


def test_without_its_variables_the_retrain_schedule_is_paused_and_says_why(
    page, prefect_server, deployed_without_variables, screenshots
):
    from playwright.sync_api import expect

    deployment = deployed_without_variables["deployment"]
    assert [schedule["active"] for schedule in deployment["schedules"]] == [False]
    for variable in ("PREFECT_TORCH_RETRAIN_DATA", "PREFECT_TORCH_RETRAIN_TARGET", "PREFECT_TORCH_MODEL_NAME"):
        assert variable in deployment["description"]
        assert variable in deployed_without_variables["output"]
    runs = httpx.post(f"{prefect_server['base']}/api/flow_runs/filter", timeout=30, json={
        "deployments": {"id": {"any_": [deployment["id"]]}},
    }).json()
    assert runs == []  # nothing queued that could only fail

    page.goto(f"{prefect_server['base']}/v2/deployments/deployment/{deployment['id']}?tab=Description")
    expect(page.get_by_role("switch", name="toggle At 02:00 AM")).not_to_be_checked()
    expect(page.get_by_text("Schedule paused", exact=False).first).to_be_visible()
    page.screenshot(path=screenshots / "19-retrain-deployment-paused.png", full_page=True)
