"""The markdown summary a card leaves behind: what ran, on what, how it went.

A summary is a typed record first (``RunSummary``) and markdown second, so tests
and other reports can read the same facts the UI shows.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from prefect_torch.reporting.text import (
    display_uri,
    fmt_number,
    fmt_seconds,
    md_code,
    md_escape,
    scrub_secrets,
    truncate,
)

# Long enough for any message prefect-torch raises; bounds a pathological one.
MAX_ERROR_CHARS = 2000


class RunSummary(BaseModel):
    """What a training or evaluation card reports when it ends."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(description="Heading of the summary, e.g. the task run's name.")
    status: Literal["completed", "failed"] = Field(description="How the card ended.")
    outcome: str | None = Field(default=None, description="Why it ended, e.g. 'completed 12 epochs' or the early-stopping reason.")
    error: str | None = Field(default=None, description="The error that ended a failed card: type and message.")
    problem: str | None = Field(default=None, description="regression, binary or multiclass.")
    loss: str | None = Field(default=None, description="The loss that was minimised.")
    dataset: str | None = Field(default=None, description="Where the data came from (credentials removed).")
    data_key: str | None = Field(default=None, description="Content key of the dataset.")
    rows: dict[str, int] | None = Field(default=None, description="Row count per split.")
    model: str | None = Field(default=None, description="Short model name, e.g. mlp-64x64.")
    model_spec: dict[str, Any] | None = Field(default=None, description="The model spec as JSON.")
    parameters: int | None = Field(default=None, description="Number of model parameters.")
    optimizer: str | None = Field(default=None, description="Optimizer and learning rate.")
    device: str | None = Field(default=None, description="Device the work ran on.")
    epochs: str | None = Field(default=None, description="Epochs run, e.g. '8 of 20'.")
    steps: int | None = Field(default=None, description="Optimizer steps taken.")
    seconds: float | None = Field(default=None, description="Wall time of the card.")
    train_seconds: float | None = Field(default=None, description="Wall time of the training loop that made the model.")
    cached: bool = Field(
        default=False, description="The model was read from the cache: an earlier run trained it, this one did not."
    )
    model_location: str | None = Field(default=None, description="Where the model is stored (a path or URL).")
    model_note: str | None = Field(
        default=None, description="What became of the model when this card did not store it."
    )
    metrics_title: str = Field(default="Final metrics", description="Heading of the metrics table.")
    metrics: dict[str, float | None] = Field(default_factory=dict, description="Metric name to value.")
    notes: list[str] = Field(default_factory=list, description="Extra lines shown under the table.")

    def to_markdown(self) -> str:
        lines = [f"# {md_escape(self.title)}", ""]
        outcome = self.outcome or ""
        if self.cached:
            outcome = (outcome + " · " if outcome else "") + "read from the cache (an earlier run trained this model)"
        label = "**Completed**" if self.status == "completed" else "**Failed**"
        lines += [f"{label}{': ' + md_escape(outcome) if outcome else ''}", ""]
        if self.error:
            # A blockquote, not a code block: the UIs do not wrap code, and the fix at the end
            # of the message would be scrolled out of sight.
            error = truncate(scrub_secrets(self.error), MAX_ERROR_CHARS)
            lines += [f"> {md_escape(line)}" if line.strip() else ">" for line in error.splitlines()] + [""]
        facts = self._facts()
        if facts:
            # A list, not a two-column table: a table needs a header row, and a key/value
            # table's would be empty; list items also wrap long values instead of clipping them.
            lines += [f"- **{name}:** {value}" for name, value in facts] + [""]
        if self.metrics:
            lines += [f"## {md_escape(self.metrics_title)}", "", "| metric | value |", "|---|---|"]
            lines += [f"| {md_escape(name)} | {fmt_number(value)} |" for name, value in self.metrics.items()]
            lines.append("")
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def _facts(self) -> list[tuple[str, str]]:
        facts: list[tuple[str, str]] = []
        if self.problem:
            facts.append(("Problem", md_escape(self.problem) + (f" (loss: {md_escape(self.loss)})" if self.loss else "")))
        if self.dataset:
            facts.append(("Dataset", md_code(display_uri(self.dataset))))
        if self.data_key:
            facts.append(("Data key", md_code(self.data_key)))
        if self.rows:
            facts.append(("Rows", " · ".join(f"{md_escape(name)} {count:,}" for name, count in self.rows.items())))
        if self.model:
            size = f" — {self.parameters:,} parameters" if self.parameters is not None else ""
            facts.append(("Model", md_escape(self.model) + size))
        if self.model_spec is not None:
            # Plain text that wraps, not code: code is not wrapped, and the UI clipped it.
            facts.append(("Model spec", md_escape(scrub_secrets(_spec_text(self.model_spec)))))
        if self.optimizer:
            facts.append(("Optimizer", md_escape(self.optimizer)))
        if self.device:
            facts.append(("Device", md_escape(self.device)))
        if self.epochs:
            steps = f" ({self.steps:,} optimizer steps)" if self.steps is not None else ""
            facts.append(("Epochs", md_escape(self.epochs) + steps))
        if self.cached:
            earlier = f" in {fmt_seconds(self.train_seconds)}" if self.train_seconds is not None else ""
            facts.append(("Training", f"read from the cache; an earlier run trained this model{earlier}"))
        elif self.train_seconds is not None:
            facts.append(("Training time", fmt_seconds(self.train_seconds)))
        if self.seconds is not None:
            facts.append(("Wall time of this run" if self.cached else "Wall time", fmt_seconds(self.seconds)))
        if self.model_location:
            facts.append(("Model stored at", md_code(display_uri(self.model_location, max_length=400))))
        elif self.model_note:
            facts.append(("Model stored at", md_escape(self.model_note)))
        return facts


def _spec_text(spec: dict[str, Any]) -> str:
    """``activation=relu, dropout=0.0, hidden=[32, 32]``: the spec's fields, sorted."""
    return ", ".join(f"{name}={json.dumps(value, sort_keys=True)}" for name, value in sorted(spec.items()))


def describe_error(exc: BaseException) -> str:
    """``TrainingError: <message>``, without secrets, bounded in length."""
    return truncate(scrub_secrets(f"{type(exc).__name__}: {exc}"), MAX_ERROR_CHARS)
