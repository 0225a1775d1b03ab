"""Table rows and markdown summaries: what they hold and what they never hold."""

import json

from prefect_torch.reporting.summary import RunSummary, describe_error
from prefect_torch.reporting.tables import history_rows, history_table, metrics_rows
from prefect_torch.errors import TrainingError


def record(epoch, train, val=None, metric=None):
    return {
        "epoch": epoch, "train_loss": train, "val_loss": val,
        "val_metrics": {"r2": metric} if metric is not None else {},
        "lr": 0.001, "seconds": 0.123456789, "samples_per_s": 51234.56,
    }


def test_history_rows_flatten_metrics_and_stay_strict_json():
    rows = history_rows([record(1, 0.5, 0.6, 0.91), record(2, float("nan"), None, None)])
    assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "val_r2", "lr", "seconds", "samples_per_s"]
    assert rows[0]["val_r2"] == 0.91 and rows[0]["seconds"] == 0.1235 and rows[0]["samples_per_s"] == 51235
    assert rows[1]["train_loss"] == "nan" and rows[1]["val_loss"] is None
    json.dumps(rows, allow_nan=False)


def test_long_histories_are_thinned_and_say_so():
    history = [record(i + 1, 1.0 / (i + 1)) for i in range(2000)]
    rows, covers = history_table(history, max_rows=100)
    assert len(rows) == 100 and rows[0]["epoch"] == 1 and rows[-1]["epoch"] == 2000
    assert covers.startswith("100 of 2,000 epochs")
    assert history_table(history[:3])[1] == "3 epochs"


def test_metrics_rows():
    assert metrics_rows({"accuracy": 0.9751234567, "roc_auc": float("nan")}) == [
        {"metric": "accuracy", "value": 0.9751}, {"metric": "roc_auc", "value": "nan"},
    ]


def test_summary_markdown_lists_the_facts():
    markdown = RunSummary(
        title="Training summary — train[mlp-64x64 adam lr=0.001]", status="completed",
        outcome="completed 3 epochs", problem="regression", loss="mse", data_key="sha256-abc",
        rows={"train": 700, "val": 150, "test": 150}, model="mlp-64x64",
        model_spec={"hidden": [64, 64]}, parameters=4481, optimizer="adam lr=0.001", device="cpu",
        epochs="3 of 3", steps=33, seconds=1.5, model_location="/models/m1",
        metrics={"train_loss": 0.25, "val_loss": 0.3},
    ).to_markdown()
    for fact in ("**Completed**: completed 3 epochs", "- **Problem:** regression (loss: mse)", "`sha256-abc`",
                 "train 700 · val 150 · test 150", "mlp-64x64 — 4,481 parameters", "- **Device:** cpu",
                 "3 of 3 (33 optimizer steps)", "- **Wall time:** 1.50 s", "- **Model stored at:** `/models/m1`",
                 "| train\\_loss | 0.25 |"):
        assert fact in markdown, fact


def test_no_table_has_an_empty_header_row():
    markdown = RunSummary(
        title="t", status="completed", problem="regression", device="cpu", model_spec={"hidden": [64, 64]},
        metrics={"mse": 253506962.3},
    ).to_markdown()
    lines = markdown.splitlines()
    headers = [lines[i - 1] for i, line in enumerate(lines) if line.startswith("|---")]
    assert headers == ["| metric | value |"]


def test_the_model_spec_is_text_that_wraps_not_one_long_code_span():
    spec = {"hidden": [512, 512, 256, 128], "activation": "gelu", "dropout": 0.1, "batch_norm": True}
    markdown = RunSummary(title="t", status="completed", model_spec=spec).to_markdown()
    line = next(line for line in markdown.splitlines() if "Model spec" in line)
    assert "`" not in line and "hidden=[512, 512, 256, 128]" in line and ", " in line


def test_a_cached_model_says_so_and_keeps_its_training_time_apart():
    markdown = RunSummary(
        title="t", status="completed", outcome="completed 6 epochs", seconds=1.1, train_seconds=42.0, cached=True,
    ).to_markdown()
    assert "read from the cache (an earlier run trained this model)" in markdown
    assert "- **Training:** read from the cache; an earlier run trained this model in 42.0 s" in markdown
    assert "- **Wall time of this run:** 1.10 s" in markdown
    fresh = RunSummary(title="t", status="completed", seconds=43.0, train_seconds=42.0).to_markdown()
    assert "cache" not in fresh and "- **Training time:** 42.0 s" in fresh


def test_tables_and_markdown_show_the_same_number():
    from prefect_torch.reporting.tables import metrics_rows

    metrics = {"mse": 253506962.3, "mae": 12554.31, "r2": 0.912345678, "tiny": 3.14159e-6}
    markdown = RunSummary(title="t", status="completed", metrics=metrics).to_markdown()
    for row in metrics_rows(metrics):
        shown = next(line for line in markdown.splitlines() if line.startswith(f"| {row['metric']} |"))
        assert float(shown.split("|")[2].strip().replace(",", "")) == row["value"], (shown, row)


def test_failed_summary_shows_the_error_without_secrets():
    error = TrainingError("The training loss became nan at epoch 3 reading s3://AKIA:topsecret@bucket/x.csv")
    summary = RunSummary(title="t", status="failed", outcome="stopped in epoch 3 of 5", error=describe_error(error))
    markdown = summary.to_markdown()
    assert "**Failed**: stopped in epoch 3 of 5" in markdown
    assert "> TrainingError: The training loss became nan at epoch 3" in markdown
    assert "topsecret" not in markdown and "AKIA" not in markdown


def test_a_pipe_in_a_value_does_not_break_the_list_or_a_table():
    markdown = RunSummary(title="t", status="completed", device="cuda|0", model_note="a | b",
                          metrics={"a|b": 1.0}).to_markdown()
    assert "- **Device:** cuda\\|0" in markdown.splitlines()
    assert "| a\\|b | 1 |" in markdown.splitlines()
