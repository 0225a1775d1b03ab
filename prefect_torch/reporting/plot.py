"""Loss curves as a small hand-written SVG line chart.

Why SVG in a ``data:`` URI: both Prefect 3.8 UIs render a markdown image whose
source is ``data:image/...`` (the V2 UI allows the ``data`` protocol for ``img``
explicitly), while an inline ``<svg>`` element is stripped by their HTML
sanitiser, and an external image URL would need the network. One self-contained
image, no matplotlib.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any, Sequence
from xml.sax.saxutils import escape

from prefect_torch.reporting.tables import thin
from prefect_torch.reporting.text import fmt_number

TRAIN_COLOR = "#2563eb"
VAL_COLOR = "#ea580c"
# At most this many points per curve: keeps the artifact small on very long runs.
MAX_POINTS = 600
# A log loss axis when the loss spans more than this factor ...
LOG_SCALE_RATIO = 10.0
# ... or more than this one while most points sit in the bottom LOW_SHARE of a linear axis
# (the first epoch's loss dwarfs the rest and the curves would merge into one flat line).
LOG_SCALE_MIN_RATIO = 3.0
LOW_SHARE = 0.2
STEP_COLOR = "#0f766e"


@dataclass(frozen=True)
class Series:
    label: str
    color: str
    points: list[tuple[float, float]]  # (epoch, loss); non-finite losses are dropped


def loss_series(history: Sequence[dict[str, Any]]) -> list[Series]:
    """Train and (when there is a validation split) validation loss per epoch."""
    series = []
    for field, label, color in (("train_loss", "train loss", TRAIN_COLOR), ("val_loss", "val loss", VAL_COLOR)):
        points = [
            (float(row["epoch"]), float(row[field]))
            for row in history
            if isinstance(row.get(field), (int, float)) and math.isfinite(row[field])
        ]
        if points:
            series.append(Series(label, color, thin(points, MAX_POINTS)))
    return series


def loss_curves_svg(
    history: Sequence[dict[str, Any]],
    title: str = "Loss per epoch",
    y_label: str = "loss",
    width: int = 720,
    height: int = 360,
) -> str:
    """An SVG line chart of train and validation loss against epoch.

    Non-finite losses (a diverged epoch) are left out rather than drawn at infinity.
    """
    return line_chart_svg(loss_series(history), title, "epoch", y_label, width, height, mark_best="val loss")


# Left, right, top and bottom margins around a chart's plot area, in pixels.
PLOT_MARGINS = (72, 24, 44, 52)


def svg_frame(title: str, width: int, height: int, title_x: int = PLOT_MARGINS[0]) -> list[str]:
    """The opening of a chart's SVG: the canvas, an opaque background (the chart stays
    readable in the UI's dark theme) and the title. Close it with ``</svg>``."""
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="#ffffff" rx="6"/>',
        f'<text x="{title_x}" y="26" font-size="15" font-weight="bold" fill="#111827">{escape(title)}</text>',
    ]


def line_chart_svg(
    series: list[Series],
    title: str,
    x_label: str,
    y_label: str,
    width: int = 720,
    height: int = 360,
    mark_best: str | None = None,
) -> str:
    """An SVG line chart of ``series``; the y axis is logarithmic when the values call for it
    (``prefers_log_axis``), and the y label then says so."""
    left, right, top, bottom = PLOT_MARGINS
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = svg_frame(title, width, height)
    if not series:
        parts.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#6b7280">'
            "no finite loss values to plot</text></svg>"
        )
        return "".join(parts)

    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    x_min, x_max = min(xs), max(xs)
    if x_max == x_min:
        x_min, x_max = x_min - 1, x_max + 1
    scale = _YScale.fit(ys)

    def px(x: float) -> float:
        return left + (x - x_min) / (x_max - x_min) * plot_w

    def py(y: float) -> float:
        return top + (1 - scale.position(y)) * plot_h

    # axes, grid and ticks
    for tick in scale.ticks():
        y = py(tick)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        parts.append(
            f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end" fill="#374151">{escape(fmt_number(tick, 3))}</text>'
        )
    for tick in _epoch_ticks(x_min, x_max):
        x = px(tick)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 5}" stroke="#6b7280"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 19}" text-anchor="middle" fill="#374151">{tick:g}</text>')
    parts.append(
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#9ca3af"/>'
    )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 10}" text-anchor="middle" fill="#111827">{escape(x_label)}</text>'
    )
    if scale.log:
        y_label = y_label[:-1] + ", log scale)" if y_label.endswith(")") else y_label + " (log scale)"
    y_title = escape(y_label)
    parts.append(
        f'<text transform="translate(16 {top + plot_h / 2}) rotate(-90)" text-anchor="middle" fill="#111827">{y_title}</text>'
    )

    # the curves: a line through the points, and a dot on each when there are few
    for s in series:
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s.points)
        parts.append(
            f'<polyline points="{coords}" fill="none" stroke="{s.color}" stroke-width="2" stroke-linejoin="round"/>'
        )
        if len(s.points) <= 60:
            parts.extend(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{s.color}"/>' for x, y in s.points
            )

    # mark the best validation epoch: the one early stopping would keep
    val = next((s for s in series if s.label == mark_best), None)
    if val is not None:
        bx, by = min(val.points, key=lambda p: p[1])
        parts.append(
            f'<circle cx="{px(bx):.1f}" cy="{py(by):.1f}" r="5" fill="none" stroke="{VAL_COLOR}" stroke-width="2"/>'
        )

    # legend, top right
    legend_x = left + plot_w - 190
    for i, s in enumerate(series):
        y = top + 16 + i * 18
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 22}" y1="{y - 4}" y2="{y - 4}" stroke="{s.color}" stroke-width="3"/>')
        last = s.points[-1][1]
        parts.append(
            f'<text x="{legend_x + 28}" y="{y}" fill="#111827">{escape(s.label)} {escape(fmt_number(last))}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def svg_data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def loss_scale_note(problem: str | None, target_std: float | None) -> str | None:
    """For a regression trained on a standardised target: which scale its loss is on."""
    if problem != "regression" or target_std is None:
        return None
    return (
        f"The loss is on the standardised target (the target minus its train mean, divided by its "
        f"train standard deviation {fmt_number(target_std)}); test metrics are in the target's own units."
    )


def loss_curves_markdown(
    history: Sequence[dict[str, Any]], loss_name: str, heading: str = "Loss curves", scale_note: str | None = None
) -> str:
    """Markdown with the chart as an image, and the numbers it shows in words.

    ``scale_note`` (``loss_scale_note``) marks a loss on a standardised target, on the
    axis and under the chart."""
    y_label = f"{loss_name} loss" + (" (standardised target)" if scale_note else "")
    svg = loss_curves_svg(history, title=f"{loss_name} loss per epoch", y_label=y_label)
    lines = [f"## {heading}", "", f"![Train and validation {loss_name} loss per epoch]({svg_data_uri(svg)})", ""]
    for s in loss_series(history):
        first, last = s.points[0][1], s.points[-1][1]
        best_epoch, best = min(s.points, key=lambda p: p[1])
        lines.append(
            f"- {s.label}: {fmt_number(first)} → {fmt_number(last)} "
            f"(lowest {fmt_number(best)} at epoch {best_epoch:g})"
        )
    if len(history) > MAX_POINTS:
        lines.append(f"- {len(history):,} epochs, drawn with at most {MAX_POINTS} points per curve")
    if scale_note:
        lines.append(f"- {scale_note}")
    return "\n".join(lines)


def step_loss_markdown(
    losses: Sequence[tuple[int, float]], loss_name: str, steps_per_epoch: int | None = None,
    scale_note: str | None = None, heading: str = "Loss per optimizer step",
) -> str:
    """Markdown with the training loss of every optimizer step as a chart, and its figures.

    ``losses`` holds (step, loss) pairs: the mean loss of the batches that step applied.
    """
    points = [(float(step), float(loss)) for step, loss in losses if math.isfinite(loss)]
    series = [Series("train loss per step", STEP_COLOR, thin(points, MAX_POINTS * 4))] if points else []
    y_label = f"{loss_name} loss" + (" (standardised target)" if scale_note else "")
    svg = line_chart_svg(series, f"{loss_name} loss per optimizer step", "optimizer step", y_label)
    lines = [f"## {heading}", "", f"![Training {loss_name} loss of every optimizer step]({svg_data_uri(svg)})", ""]
    if points:
        best_step, best = min(points, key=lambda p: p[1])
        lines.append(
            f"- {len(losses):,} optimizer steps: {fmt_number(points[0][1])} at step {points[0][0]:g} → "
            f"{fmt_number(points[-1][1])} at step {points[-1][0]:g} (lowest {fmt_number(best)} at step {best_step:g})"
        )
    if steps_per_epoch:
        lines.append(f"- {steps_per_epoch:,} optimizer steps per epoch")
    if len(points) > MAX_POINTS * 4:
        lines.append(f"- drawn with at most {MAX_POINTS * 4:,} points")
    if scale_note:
        lines.append(f"- {scale_note}")
    return "\n".join(lines)


def prefers_log_axis(values: Sequence[float]) -> bool:
    """Whether a loss axis should be logarithmic: all values positive, and either they span
    more than LOG_SCALE_RATIO, or more than LOG_SCALE_MIN_RATIO with most of them crowded
    into the bottom LOW_SHARE of a linear axis (a first epoch far above the rest)."""
    if not values:
        return False
    lo, hi = min(values), max(values)
    if lo <= 0 or hi == lo:
        return False
    ratio = hi / lo
    if ratio > LOG_SCALE_RATIO:
        return True
    if ratio <= LOG_SCALE_MIN_RATIO:
        return False
    median = sorted(values)[len(values) // 2]
    return (median - lo) / (hi - lo) < LOW_SHARE


@dataclass(frozen=True)
class _YScale:
    low: float
    high: float
    log: bool

    @classmethod
    def fit(cls, values: Sequence[float]) -> "_YScale":
        lo, hi = min(values), max(values)
        if prefers_log_axis(values):
            # Bounds at 1, 2 or 5 times a power of ten: the curves fill the chart.
            return cls(math.log10(_log_bound(lo, down=True)), math.log10(_log_bound(hi, down=False)), True)
        if hi == lo:
            pad = abs(hi) * 0.1 or 1.0
            lo, hi = lo - pad, hi + pad
        step = _nice_step((hi - lo) / 5)
        low = math.floor(lo / step) * step
        # Losses are non-negative: start at 0 when the curve comes close to it.
        if lo >= 0 and low < 0:
            low = 0.0
        return cls(low, math.ceil(hi / step) * step, False)

    def position(self, y: float) -> float:
        value = math.log10(y) if self.log else y
        return (value - self.low) / (self.high - self.low)

    def ticks(self) -> list[float]:
        if self.log:
            decades = range(math.floor(self.low), math.ceil(self.high) + 1)
            # Few decades: 2x and 5x ticks too, so the curve sits between labelled lines.
            factors = (1, 2, 5) if len(decades) <= 3 else (1,)
            ticks = [f * 10.0 ** e for e in decades for f in factors]
            return [t for t in ticks if self.low - 1e-9 <= math.log10(t) <= self.high + 1e-9]
        step = _nice_step((self.high - self.low) / 5)
        count = int(round((self.high - self.low) / step))
        return [self.low + i * step for i in range(count + 1)]


def _log_bound(value: float, down: bool) -> float:
    """The nearest 1, 2 or 5 times a power of ten below (``down``) or above ``value``."""
    power = 10.0 ** math.floor(math.log10(value))
    candidates = [f * power for f in (0.5, 1, 2, 5, 10)]
    if down:
        return max(c for c in candidates if c <= value * (1 + 1e-9))
    return min(c for c in candidates if c >= value * (1 - 1e-9))


def _nice_step(raw: float) -> float:
    """1, 2 or 5 times a power of ten, at least ``raw``."""
    if raw <= 0 or not math.isfinite(raw):
        return 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if factor * power >= raw * 0.999:
            return factor * power
    return 10 * power


def _epoch_ticks(lo: float, hi: float) -> list[float]:
    step = max(1.0, _nice_step((hi - lo) / 8))
    first = math.ceil(lo / step) * step
    ticks = []
    value = first
    while value <= hi + 1e-9:
        ticks.append(value)
        value += step
    return ticks

