"""What the Train card shows while it runs and when it ends.

``TrainingReport`` is an engine ``Callback`` (the loop stays Prefect-free) plus a
context manager around ``Trainer.fit``::

    report = TrainingReport(model.spec, optimizer, logger=logger)
    trainer = Trainer(module, optim, splits, training, [report])
    with report.running(trainer):
        trainer.fit()

While training: a progress artifact, updated at every epoch end and every
``TrainSpec.progress_every`` optimizer steps. At the end, success or failure:
the per-epoch history table, the loss curves and a markdown summary; a failed
run keeps the history up to the failure and names the error.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

from prefect_torch.engine.loop import Callback, EpochRecord, Trainer
from prefect_torch.engine.models import ModelSpec, count_parameters
from prefect_torch.engine.optim import OptimizerSpec
from prefect_torch.reporting.plot import loss_curves_markdown, loss_scale_note
from prefect_torch.reporting.publish import Publisher, artifact_key, artifact_scope, current_run_name, never_fails
from prefect_torch.reporting.summary import RunSummary, describe_error
from prefect_torch.reporting.tables import history_table
from prefect_torch.reporting.text import fmt_number

# Per-step and per-epoch updates closer together than this are skipped (the
# last one always goes out): each is an API call, and tiny epochs would
# otherwise spend more time reporting than training.
DEFAULT_MIN_INTERVAL_S = 1.0


class TrainingReport(Callback):
    """Progress, per-epoch history, loss curves and summary of one training run."""

    # on_step_end reads the loop's host-side counters and clocks only: CUDA graphs stay on.
    cuda_graph_safe = True

    def __init__(
        self,
        model_spec: ModelSpec,
        optimizer: OptimizerSpec,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        key_prefix: str = "train",
        min_interval_s: float = DEFAULT_MIN_INTERVAL_S,
        scope: str | None = None,
        model_note: str = "not stored by this card; it returns the trained model in memory to the next card",
    ):
        self.model_spec = model_spec
        self.optimizer = optimizer
        self.publisher = Publisher(logger)
        self.logger = self.publisher.logger
        # Keys start with the flow, dataset and model (``artifact_scope``): the Artifacts page
        # groups the runs of one model on one dataset.
        self.scope = artifact_scope(model_spec.short_name()) if scope is None else scope
        self.keys = {
            name: artifact_key(self.scope, key_prefix, name) for name in ("progress", "history", "loss-curves", "summary")
        }
        self.model_note = model_note
        self.min_interval_s = min_interval_s
        self.progress_id = None
        self.summary: RunSummary | None = None
        self._started = self._epoch_started = self._last_update = 0.0

    # -- around fit -------------------------------------------------------------

    @contextlib.contextmanager
    def running(self, trainer: Trainer) -> Iterator["TrainingReport"]:
        """Publish progress from here on, and the end-of-card artifacts on the way out."""
        self._started = self._epoch_started = time.perf_counter()
        self.progress_id = self.publisher.progress(
            self.keys["progress"], _percent(trainer),
            f"starting: {trainer.spec.epochs} epochs of {trainer.steps_per_epoch:,} optimizer steps "
            f"on {trainer.device}",
        )
        self._last_update = time.perf_counter()
        try:
            yield self
        except Exception as exc:
            with never_fails("training report", self.logger):
                self.finish(trainer, exc)
            raise
        with never_fails("training report", self.logger):
            self.finish(trainer, None)

    def finish(self, trainer: Trainer, error: BaseException | None) -> None:
        """The last progress update, then history table, loss curves and summary."""
        state = trainer.state
        history = list(state.history)
        if error is None:
            self._progress(trainer, f"{state.stop_reason}" + _losses(history), final=True, percent=100.0)
        else:
            self._progress(
                trainer, f"failed in epoch {state.epoch + 1} of {trainer.spec.epochs}: {type(error).__name__}",
                final=True,
            )
        title = current_run_name("train")
        if history:
            rows, covers = history_table(history)
            self.publisher.table(self.keys["history"], rows, f"Per-epoch history of {title}: {covers}.")
            self.publisher.markdown(
                self.keys["loss-curves"],
                loss_curves_markdown(
                    history, trainer.loss_name,
                    scale_note=loss_scale_note(trainer.info.problem, trainer.info.target_std),
                ),
                f"Train and validation loss per epoch of {title}.",
            )
        self.summary = self.build_summary(trainer, title, error)
        self.publisher.markdown(self.keys["summary"], self.summary.to_markdown(), f"Summary of {title}.")

    def build_summary(self, trainer: Trainer, title: str, error: BaseException | None) -> RunSummary:
        state, spec = trainer.state, trainer.spec
        history = state.history
        notes = []
        if state.best_epoch and trainer.best_weights is not None and state.best_epoch < len(history):
            notes.append(f"Weights restored from the best epoch ({state.best_epoch}).")
        if state.best_epoch:
            notes.append(f"Lowest validation loss {fmt_number(state.best_val_loss)} at epoch {state.best_epoch}.")
        if error is not None and not history:
            notes.append("No epoch completed before the error.")
        last = history[-1] if history else None
        metrics: dict[str, float | None] = {}
        if last is not None:
            metrics = {"train_loss": last["train_loss"], "val_loss": last["val_loss"]}
            metrics.update({f"val_{k}": v for k, v in last["val_metrics"].items()})
        return RunSummary(
            title=f"Training summary — {title}",
            status="completed" if error is None else "failed",
            outcome=state.stop_reason if error is None else
            f"stopped in epoch {state.epoch + 1} of {spec.epochs}, after {state.step:,} optimizer steps",
            error=describe_error(error) if error is not None else None,
            problem=trainer.info.problem,
            loss=trainer.loss_name,
            data_key=trainer.info.data_key,
            rows=dict(trainer.info.rows) or None,
            model=self.model_spec.short_name(),
            model_spec=self.model_spec.model_dump(mode="json"),
            parameters=count_parameters(trainer.model),
            optimizer=self.optimizer.short_name(),
            device=str(trainer.device),
            epochs=f"{len(history)} of {spec.epochs}",
            steps=state.step,
            seconds=time.perf_counter() - self._started,
            model_note=self.model_note,
            metrics_title=f"Final epoch ({last['epoch']})" if last else "Final metrics",
            metrics=metrics,
            notes=notes,
        )

    # -- loop hooks -------------------------------------------------------------

    def on_step_end(self, trainer: Trainer) -> None:
        every = trainer.spec.progress_every
        state = trainer.state
        # The epoch's last step is reported by on_epoch_end, with its losses.
        if not every or state.step % every or state.batch >= len(trainer.plans):
            return
        rows_done = min(state.batch * trainer.spec.batch_size, len(trainer.train_data))
        elapsed = time.perf_counter() - self._epoch_started
        speed = f" · {rows_done / elapsed:,.0f} samples/s" if elapsed > 0 else ""
        text = (
            f"epoch {state.epoch + 1}/{trainer.spec.epochs} · step {state.step:,}/{_total_steps(trainer):,} · "
            f"batch {state.batch}/{len(trainer.plans)}{speed}"
        )
        if self._progress(trainer, text):
            self.logger.info("%s (%.0f%%)", text, _percent(trainer))

    def on_epoch_end(self, trainer: Trainer, record: EpochRecord) -> None:
        self._epoch_started = time.perf_counter()
        text = (
            f"epoch {record.epoch}/{trainer.spec.epochs} · step {trainer.state.step:,}/{_total_steps(trainer):,}"
            + _losses([record.to_dict()])
        )
        self._progress(trainer, text)  # the last epoch's update is forced by finish()

    def _progress(self, trainer: Trainer, text: str, final: bool = False, percent: float | None = None) -> bool:
        """Update the progress artifact unless the last update was too recent; True if sent."""
        now = time.perf_counter()
        if not final and now - self._last_update < self.min_interval_s:
            return False
        self._last_update = now
        self.publisher.update_progress(self.progress_id, _percent(trainer) if percent is None else percent, text)
        return True


def _total_steps(trainer: Trainer) -> int:
    return max(1, trainer.spec.epochs * trainer.steps_per_epoch)


def _percent(trainer: Trainer) -> float:
    return 100.0 * min(1.0, trainer.state.step / _total_steps(trainer))


def _losses(history: list[dict]) -> str:
    if not history:
        return ""
    last = history[-1]
    parts = [f"train_loss {fmt_number(last['train_loss'])}"]
    if last.get("val_loss") is not None:
        parts.append(f"val_loss {fmt_number(last['val_loss'])}")
    parts += [f"val_{k} {fmt_number(v)}" for k, v in (last.get("val_metrics") or {}).items()]
    return " · " + " · ".join(parts)

