"""The loss-curve chart: valid SVG, one curve per loss, sensible scales."""

import base64
import re
import xml.etree.ElementTree as ET

import pytest

from prefect_torch.reporting.plot import (
    MAX_POINTS,
    loss_curves_markdown,
    loss_curves_svg,
    loss_scale_note,
    prefers_log_axis,
    step_loss_markdown,
    svg_data_uri,
)

SVG = "{http://www.w3.org/2000/svg}"


def history(train, val=None):
    return [
        {"epoch": i + 1, "train_loss": t, "val_loss": None if val is None else val[i], "val_metrics": {}}
        for i, t in enumerate(train)
    ]


def polylines(svg: str) -> list[list[tuple[float, float]]]:
    root = ET.fromstring(svg)
    lines = []
    for line in root.iter(f"{SVG}polyline"):
        lines.append([tuple(map(float, p.split(","))) for p in line.get("points").split()])
    return lines


def test_train_and_val_curves_are_drawn_with_a_legend():
    svg = loss_curves_svg(history([1.0, 0.5, 0.3, 0.25], [1.1, 0.6, 0.4, 0.42]))
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    train, val = polylines(svg)
    assert len(train) == len(val) == 4
    # SVG y grows downwards: a falling loss ends lower on the chart, at a larger y
    assert train[0][1] < train[-1][1]
    # x follows the epochs, left to right
    assert [p[0] for p in train] == sorted(p[0] for p in train)
    text = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "train loss" in text and "val loss" in text and "epoch" in text


def test_without_validation_only_the_train_curve():
    assert len(polylines(loss_curves_svg(history([0.9, 0.5])))) == 1


def test_non_finite_losses_are_left_out_not_drawn_at_infinity():
    (train,) = polylines(loss_curves_svg(history([0.9, float("nan"), 0.4, float("inf")])))
    assert len(train) == 2
    assert all(0 <= x <= 720 and 0 <= y <= 360 for x, y in train)


def test_a_loss_spanning_decades_gets_a_log_axis():
    svg = loss_curves_svg(history([100.0, 1.0, 0.01]))
    assert "log scale" in svg
    (train,) = polylines(svg)
    # on a log axis the two drops of 100x are equally tall
    assert abs((train[1][1] - train[0][1]) - (train[2][1] - train[1][1])) < 1.0


def test_one_epoch_and_no_epoch_still_render():
    ET.fromstring(loss_curves_svg(history([0.5])))
    empty = loss_curves_svg([])
    ET.fromstring(empty)
    assert "no finite loss values" in empty


def test_long_runs_are_thinned_keeping_first_and_last_epoch():
    losses = [1.0 / (i + 1) for i in range(5000)]
    (train,) = polylines(loss_curves_svg(history(losses)))
    assert len(train) <= MAX_POINTS
    assert train[0][0] < train[-1][0]


def test_titles_are_escaped():
    ET.fromstring(loss_curves_svg(history([1.0, 0.5]), title="a <b> & c"))


def test_markdown_embeds_the_chart_as_a_data_uri_image():
    markdown = loss_curves_markdown(history([0.8, 0.4, 0.2], [0.9, 0.5, 0.45]), "mse")
    match = re.search(r"!\[[^\]]*\]\(data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert match, markdown
    ET.fromstring(base64.b64decode(match.group(1)))
    assert "val loss: 0.9 → 0.45 (lowest 0.45 at epoch 3)" in markdown
    assert svg_data_uri("<svg/>") == "data:image/svg+xml;base64,PHN2Zy8+"


def test_a_first_epoch_far_above_the_rest_gets_a_log_axis():
    # 0.41 then ~0.02: on a linear axis train and validation merge into one flat line.
    train, val = [0.41, 0.031, 0.026, 0.023, 0.021, 0.02], [0.12, 0.03, 0.027, 0.025, 0.024, 0.024]
    assert prefers_log_axis(train + val)
    svg = loss_curves_svg(history(train, val))
    assert "log scale" in svg
    ys = [y for line in polylines(svg) for _, y in line[1:]]
    assert max(ys) - min(ys) > 30  # the later epochs spread over the chart (about 7 px on a linear axis)


@pytest.mark.parametrize("values, log", [
    ([1.0, 0.5, 0.3, 0.25], False),   # a steady fall: linear reads best
    ([1.0, 0.9], False),
    ([100.0, 1.0, 0.01], True),       # decades
    ([0.41, 0.2, 0.15, 0.12], False), # a 3.4x range spread over the axis
    ([0.5, 0.1, 0.1, 0.1, 0.1], True),  # 5x range, everything after the first crowded at the bottom
    ([-1.0, 2.0], False),             # a log axis cannot show a negative loss
])
def test_when_the_axis_is_logarithmic(values, log):
    assert prefers_log_axis(values) is log


def test_a_regression_loss_says_it_is_on_the_standardised_target():
    note = loss_scale_note("regression", 15922.4)
    markdown = loss_curves_markdown(history([0.8, 0.4], [0.9, 0.5]), "mse", scale_note=note)
    assert "standardised target" in markdown and "15,922" in markdown
    encoded = re.search(r"base64,([A-Za-z0-9+/=]+)\)", markdown).group(1)
    assert "mse loss (standardised target)" in base64.b64decode(encoded).decode()
    assert loss_scale_note("binary", None) is None and loss_scale_note("regression", None) is None


def test_the_per_step_curve_has_one_point_per_optimizer_step():
    losses = [(step, 1.0 / step) for step in range(1, 121)]
    markdown = step_loss_markdown(losses, "mse", steps_per_epoch=60)
    encoded = re.search(r"base64,([A-Za-z0-9+/=]+)\)", markdown).group(1)
    svg = base64.b64decode(encoded).decode()
    (line,) = polylines(svg)
    assert len(line) == 120 and "optimizer step" in svg
    assert "120 optimizer steps: 1 at step 1 → 0.008333 at step 120" in markdown
