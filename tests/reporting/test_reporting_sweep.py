"""The sweep's artifacts: a row per trial, the metric per trial and the importances as SVG."""

import base64
import re

from prefect_torch.flows.sweep import BestTrial, SweepResult, TrialSummary
from prefect_torch.reporting.sweep import importance_svg, sweep_markdown, trial_rows, trials_svg

TRIALS = [
    TrialSummary(number=0, params={"lr": 0.01, "hidden": [8]}, value=0.5, state="COMPLETE", seconds=1.5,
                 run_url="http://ui/runs/task-run/a"),
    TrialSummary(number=1, params={"lr": 0.001, "hidden": [16, 16]}, value=0.9, state="PRUNED", seconds=0.4),
    TrialSummary(number=2, params={"lr": 0.1, "hidden": [8]}, value=None, state="FAIL", error="TrainingError: NaN"),
    TrialSummary(number=3, params={"lr": 0.02, "hidden": [8]}, value=0.3, state="COMPLETE", seconds=1.2),
]


def test_one_row_per_trial_with_every_parameter_its_state_error_and_link():
    rows = trial_rows(TRIALS)
    assert [r["trial"] for r in rows] == [0, 1, 2, 3]
    assert rows[0] == {"trial": 0, "state": "COMPLETE", "value": 0.5, "seconds": 1.5, "hidden": "[8]", "lr": 0.01,
                       "error": "", "run": "http://ui/runs/task-run/a"}
    assert rows[2]["error"] == "TrainingError: NaN" and rows[2]["value"] is None


def test_the_trial_chart_draws_each_finished_trial_and_the_best_so_far():
    svg = trials_svg(TRIALS, "val_loss", maximize=False)
    dots = re.findall(r"<title>trial (\d+): ([^ ]+) \((\w+)\)</title>", svg)
    assert dots == [("0", "0.5", "complete"), ("1", "0.9", "pruned"), ("3", "0.3", "complete")]
    best_line = re.search(r'<polyline points="([^"]+)"', svg).group(1).split()
    assert len(best_line) == 3  # from the first completed trial on
    ys = [float(p.split(",")[1]) for p in best_line]
    assert ys[0] == ys[1] < ys[2]  # flat through the pruned trial, lower (further down) at trial 3


def test_importances_are_bars_largest_first():
    svg = importance_svg({"hidden": 0.25, "lr": 0.75})
    assert svg.index(">lr<") < svg.index(">hidden<") and "75%" in svg and "25%" in svg


def test_the_summary_embeds_both_charts():
    result = SweepResult(study_name="s", metric="val_loss", direction="minimize", trials=TRIALS, run_here=[0, 1, 2, 3],
                         best=BestTrial(number=3, params={"lr": 0.02}, value=0.3, metrics={"r2": 0.9}, model_uri="/m"))
    markdown = sweep_markdown(result, {"lr": 1.0})
    images = re.findall(r"data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)", markdown)
    assert len(images) == 2
    assert all(base64.b64decode(image).startswith(b"<svg") for image in images)
    assert "Best trial **3**" in markdown and "2 complete, 1 fail, 1 pruned" in markdown
