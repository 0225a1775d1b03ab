"""Text shown in the UI: numbers, locations without secrets, safe markdown."""

import json

import pytest

from prefect_torch.reporting.text import (
    display_uri,
    fmt_number,
    fmt_seconds,
    md_code,
    md_escape,
    scrub_secrets,
    table_cell,
)


@pytest.mark.parametrize(
    "uri, shown",
    [
        ("s3://AKIAEXAMPLE:wJalrSECRET@bucket/data/housing.csv", "s3://bucket/data/housing.csv"),
        ("https://bucket.s3.amazonaws.com/x.csv?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA", "https://bucket.s3.amazonaws.com/x.csv"),
        ("https://token@example.com/data.parquet#frag", "https://example.com/data.parquet"),
        ("/tmp/data/housing.csv", "/tmp/data/housing.csv"),
    ],
)
def test_display_uri_drops_credentials_and_query_tokens(uri, shown):
    assert display_uri(uri) == shown


def test_display_uri_keeps_the_end_of_a_long_location():
    shown = display_uri("/very/" + "deep/" * 30 + "housing.csv", max_length=40)
    assert len(shown) == 40 and shown.startswith("…") and shown.endswith("/housing.csv")


def test_scrub_secrets_inside_an_error_message():
    text = scrub_secrets("Cannot read s3://key:secret@bucket/a.csv: denied; see https://h/x?sig=abc")
    assert "secret" not in text and "sig=abc" not in text
    assert "s3://bucket/a.csv" in text


@pytest.mark.parametrize(
    "value, text",
    [(0.012345, "0.01235"), (1.5, "1.5"), (123.456, "123.5"), (12345.6, "12,346"), (3e-6, "3.000e-06"),
     (42, "42"), (1234567, "1,234,567"), (None, "—"), (float("nan"), "nan"), (float("inf"), "inf"), (0.0, "0"),
     (253506962.3, "253,506,962"), (9999.7, "10,000"), (0.0246473, "0.02465"), (2.5e12, "2.500e+12")],
)
def test_fmt_number(value, text):
    assert fmt_number(value) == text


def test_fmt_seconds():
    assert fmt_seconds(0.4123) == "0.41 s"
    assert fmt_seconds(12.34) == "12.3 s"
    assert fmt_seconds(245) == "4 min 05 s"
    assert fmt_seconds(7380) == "2 h 03 min"


def test_table_cells_are_strict_json():
    cells = [table_cell(v) for v in (float("nan"), float("inf"), 0.1234567891, 3, None)]
    assert cells == ["nan", "inf", 0.1235, 3, None]
    json.loads(json.dumps(cells, allow_nan=False))


def test_markdown_escaping_keeps_table_cells_whole():
    assert "\\|" in md_escape("a|b") and "\n" not in md_escape("a\nb")
    assert md_escape("<script>") == "&lt;script&gt;"
    assert md_code("x`y") == "``x`y``"


@pytest.mark.parametrize("value", [253506962.3, 12554.31, 0.025005, 0.0246473, 9999.7, 3.14159e-6, -0.5, 2.5e12, 1.0])
def test_a_table_cell_holds_the_number_the_markdown_shows(value):
    # Tables and markdown agree to the digit: the cell is the shown number, commas aside.
    assert table_cell(value) == float(fmt_number(value).replace(",", ""))


def test_every_table_cell_has_the_same_precision():
    # Four significant digits whatever the magnitude (was 0.025005 next to 0.0246473).
    assert [table_cell(v) for v in (0.025005, 0.0246473, 1.234567)] == [0.025, 0.02465, 1.235]
