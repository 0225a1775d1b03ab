"""What a sweep shows in the Prefect UI: a table of every trial, the metric of each
trial against its number (with the best so far), and the parameters that mattered
most (Optuna's importances), as self-contained SVG images like the loss curves."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape

from prefect_torch.reporting.plot import PLOT_MARGINS, _nice_step, svg_data_uri, svg_frame
from prefect_torch.reporting.text import fmt_number, md_escape, table_cell

if TYPE_CHECKING:
    from prefect_torch.flows.sweep import SweepResult, TrialSummary

STATE_COLORS = {"COMPLETE": "#2563eb", "PRUNED": "#9ca3af", "FAIL": "#dc2626"}
BEST_COLOR = "#ea580c"
MAX_IMPORTANCES = 8


def trial_rows(trials: list["TrialSummary"]) -> list[dict[str, Any]]:
    """One row per trial: number, state, metric, seconds, each parameter, error, link to its run."""
    names = sorted({name for trial in trials for name in trial.params})
    rows = []
    for trial in trials:
        row: dict[str, Any] = {"trial": trial.number, "state": trial.state, "value": table_cell(trial.value),
                               "seconds": table_cell(trial.seconds, 3)}
        for name in names:
            value = trial.params.get(name)
            row[name] = json.dumps(value) if isinstance(value, (list, dict)) else table_cell(value)
        row["error"] = trial.error or ""
        row["run"] = trial.run_url or ""
        rows.append(row)
    return rows


def trials_svg(trials: list["TrialSummary"], metric: str, maximize: bool, width: int = 720, height: int = 320) -> str:
    """The metric of every finished trial against its number, coloured by state,
    with a line through the best value so far."""
    points = [(t.number, t.value, t.state) for t in trials if t.value is not None and math.isfinite(t.value)]
    left, right, top, bottom = PLOT_MARGINS
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = svg_frame(f"{metric} per trial", width, height)
    if not points:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#6b7280">no trial values yet</text></svg>')
        return "".join(parts)
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x_lo, x_hi = min(xs) - 0.5, max(xs) + 0.5
    step = _nice_step((max(ys) - min(ys)) / 5 or abs(ys[0]) * 0.1 or 1.0)
    y_lo, y_hi = math.floor(min(ys) / step) * step, math.ceil(max(ys) / step) * step
    if y_hi == y_lo:
        y_hi = y_lo + step

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h

    tick = y_lo
    while tick <= y_hi + step * 1e-6:
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" stroke="#e5e7eb"/>')
        parts.append(f'<text x="{left - 8}" y="{py(tick) + 4:.1f}" text-anchor="end" fill="#374151">{escape(fmt_number(tick, 3))}</text>')
        tick += step
    x_step = max(1, int(_nice_step((x_hi - x_lo) / 10)))
    for number in range(int(math.ceil(x_lo)), int(x_hi) + 1, x_step):
        parts.append(f'<text x="{px(number):.1f}" y="{top + plot_h + 19}" text-anchor="middle" fill="#374151">{number}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#9ca3af"/>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 10}" text-anchor="middle" fill="#111827">trial</text>')
    # best so far, over completed trials in trial order
    best: float | None = None
    line = []
    for number, value, state in sorted(points):
        if state == "COMPLETE" and (best is None or (value > best if maximize else value < best)):
            best = value
        if best is not None:
            line.append(f"{px(number):.1f},{py(best):.1f}")
    if line:
        parts.append(f'<polyline points="{" ".join(line)}" fill="none" stroke="{BEST_COLOR}" stroke-width="2"/>')
    for number, value, state in points:
        color = STATE_COLORS.get(state, "#6b7280")
        parts.append(f'<circle cx="{px(number):.1f}" cy="{py(value):.1f}" r="4" fill="{color}"><title>trial {number}: '
                     f'{escape(fmt_number(value))} ({state.lower()})</title></circle>')
    legend = [("complete", STATE_COLORS["COMPLETE"]), ("pruned", STATE_COLORS["PRUNED"]), ("best so far", BEST_COLOR)]
    for i, (label, color) in enumerate(legend):
        x = left + plot_w - 330 + i * 110
        parts.append(f'<circle cx="{x}" cy="{top - 14}" r="4" fill="{color}"/>')
        parts.append(f'<text x="{x + 8}" y="{top - 10}" fill="#111827">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def importance_svg(importances: dict[str, float], width: int = 720) -> str:
    """Horizontal bars: each parameter's share of the metric's variance (fANOVA)."""
    items = sorted(importances.items(), key=lambda kv: -kv[1])[:MAX_IMPORTANCES]
    bar_h, top, left = 24, 44, 160
    height = top + max(1, len(items)) * (bar_h + 8) + 16
    plot_w = width - left - 80
    parts = svg_frame("Parameter importance", width, height, title_x=24)
    for i, (name, share) in enumerate(items):
        y = top + i * (bar_h + 8)
        parts.append(f'<text x="{left - 8}" y="{y + bar_h / 2 + 4}" text-anchor="end" fill="#111827">{escape(name)}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{max(1.0, share * plot_w):.1f}" height="{bar_h}" fill="#2563eb"/>')
        parts.append(f'<text x="{left + share * plot_w + 6:.1f}" y="{y + bar_h / 2 + 4}" fill="#374151">{share:.0%}</text>')
    parts.append("</svg>")
    return "".join(parts)


def sweep_markdown(result: "SweepResult", importances: dict[str, float]) -> str:
    """The sweep's summary: the best trial, the per-trial chart and the importances."""
    best = result.best
    counts: dict[str, int] = {}
    for trial in result.trials:
        counts[trial.state] = counts.get(trial.state, 0) + 1
    maximize = result.direction == "maximize"
    lines = [
        f"# Sweep {md_escape(result.study_name)}", "",
        f"Best trial **{best.number}**: {md_escape(result.metric)} = {fmt_number(best.value)} ({result.direction}d)", "",
        "| parameter | value |", "|---|---|",
        *[f"| {md_escape(k)} | {md_escape(json.dumps(v))} |" for k, v in best.params.items()], "",
        "Test metrics: " + ", ".join(f"{k} {fmt_number(v)}" for k, v in best.metrics.items()), "",
        f"Model: `{best.model_uri}`" + (f" (registered as version {best.registered_version}"
                                         f"{', champion' if best.promoted else ''})" if best.registered_version else ""),
        "", "Trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())), "",
        f"![{md_escape(result.metric)} per trial]({svg_data_uri(trials_svg(result.trials, result.metric, maximize))})",
    ]
    if importances:
        lines += ["", f"![Parameter importance]({svg_data_uri(importance_svg(importances))})", ""]
        lines += [f"- {md_escape(name)}: {share:.0%}" for name, share in importances.items()]
    return "\n".join(lines)
