"""Hostile and malformed data: every case ends in a typed DataError that names the
file, the line (and character or column) and the fix, or in a correct result.

Files are written byte for byte into tmp_path, so each case is exactly the bytes
it names.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefect_torch.engine.csvread import gunzip
from prefect_torch.engine.csvscan import scan_csv
from prefect_torch.engine.data import LoadSpec, Table, load_table
from prefect_torch.engine.models import ModelSpec, build_model
from prefect_torch.engine.persist import TrainedModel
from prefect_torch.engine.split import SplitSpec, split_table
from prefect_torch.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
FORMULA = "=cmd|' /C calc'!A0"


def write(tmp_path: Path, data: bytes, name: str = "data.csv") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def load(tmp_path: Path, data: bytes, name: str = "data.csv", **spec) -> Table:
    return load_table(LoadSpec(uri=write(tmp_path, data, name), **spec))


def refused(tmp_path: Path, data: bytes, *fragments: str, name: str = "data.csv", **spec) -> str:
    """Loading ``data`` raises DataError naming the file and every fragment."""
    with pytest.raises(DataError) as caught:
        load(tmp_path, data, name, **spec)
    message = str(caught.value)
    assert name in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert "Traceback" not in message
    return message


def split_refused(tmp_path: Path, data: bytes, *fragments: str, **spec) -> str:
    table = load(tmp_path, data)
    with pytest.raises(DataError) as caught:
        split_table(table, SplitSpec(target="y", val_fraction=0.2, test_fraction=0.2, stratify=False, **spec))
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    return message


# --- empty, header, columns ------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\n", b"  \r\n\n", b"\xef\xbb\xbf"], ids=["zero", "lf", "blank", "bom"])
def test_empty_file_is_refused(tmp_path, data):
    refused(tmp_path, data, "is empty", "header row")


def test_header_only_is_refused(tmp_path):
    refused(tmp_path, b"a,b,y\n", "has a header (a, b, y) but no data rows")
    refused(tmp_path, b"a,b,y", "no data rows")


def test_no_header_is_detected_and_a_header_suggested(tmp_path):
    refused(tmp_path, b"1,2.5,3\n4,5,6\n", "line 1", "holds numbers, not column names",
            "no header row", "Add a first line naming the columns")
    refused(tmp_path, b"-1,1e3,0\n4,5,6\n", "no header row")


def test_duplicate_column_names_are_refused(tmp_path):
    refused(tmp_path, b"a,b,a\n1,2,3\n", "line 1", "'a' appears 2 times", "columns 1, 3", "rename")


def test_empty_column_name_is_refused(tmp_path):
    refused(tmp_path, b"a,,y\n1,2,3\n", "line 1", "header column 2 has no name")


# --- ragged rows, quotes, truncation --------------------------------------------


def test_row_with_a_missing_field_names_its_line(tmp_path):
    refused(tmp_path, b"a,b,y\n1,2,3\n4,5\n6,7,8\n", "line 3:", "2 fields, but the header has 3",
            "A field is missing")


def test_row_with_an_extra_field_names_its_line(tmp_path):
    refused(tmp_path, b"a,b,y\n1,2,3\n4,5,6\n7,8,9,10\n", "line 4:", "4 fields, but the header has 3",
            "must be quoted")


def test_first_data_row_with_an_extra_field_is_not_turned_into_an_index(tmp_path):
    # pandas alone would read "1" as the index and shift every column left.
    refused(tmp_path, b"a,b,y\n1,2,3,4\n5,6,7\n", "line 2:", "4 fields")


def test_ragged_row_line_counts_quoted_line_breaks_and_blank_lines(tmp_path):
    data = b'a,b,y\n"two\nlines",1,2\n\n3,4,5\n6,7\n'
    refused(tmp_path, data, "line 6:", "2 fields")


def test_unclosed_quote_at_end_of_file(tmp_path):
    refused(tmp_path, b'a,b,y\n1,2,3\n4,"5,6\n', "line 3, character 3", "never closed")


def test_quote_inside_an_unquoted_field_is_refused(tmp_path):
    refused(tmp_path, b'a,b,y\n1,2"x,3\n4,5,6\n', "line 2, character 4", "not quoted", '"2""x"')
    refused(tmp_path, b'a,b,y\n1, "x",3\n', "line 2, character 4", "no space")


def test_text_after_a_closing_quote_is_refused(tmp_path):
    refused(tmp_path, b'a,b,y\n1,"2"x,3\n', "line 2, character 5", "follows the closing quote")


def test_trailing_delimiter_on_rows_only_names_the_line(tmp_path):
    refused(tmp_path, b"a,b,y\n1,2,3,\n4,5,6,\n", "line 2:", "ends with a ','")


def test_trailing_delimiter_on_header_and_rows_drops_the_empty_column(tmp_path):
    frame = load(tmp_path, b"a,b,y,\n1,2,3,\n4,5,6,\n").frame
    assert list(frame.columns) == ["a", "b", "y"]
    assert frame.to_numpy().tolist() == [[1, 2, 3], [4, 5, 6]]


def test_trailing_delimiter_on_header_with_values_below_is_refused(tmp_path):
    refused(tmp_path, b"a,b,\n1,2,3\n", "has values but no name")


def test_last_line_cut_mid_field(tmp_path):
    refused(tmp_path, b"a,b,y\n1.25,2.5,0\n3.75,4.", "line 3:", "cut short")


def test_last_line_cut_inside_a_quoted_field(tmp_path):
    refused(tmp_path, b'a,b,y\n1,2,0\n3,"long te', "line 3, character 3", "never closed", "cut short")


# --- delimiter, encoding, line endings, binary ----------------------------------


@pytest.mark.parametrize("delimiter", [";", "\t", "|"], ids=["semicolon", "tab", "pipe"])
def test_other_delimiters_are_sniffed_and_read_correctly(tmp_path, delimiter):
    d = delimiter.encode()
    data = d.join([b"a", b"b", b"y"]) + b"\n" + d.join([b"1.5", b"2", b"x"]) + b"\n"
    frame = load(tmp_path, data).frame
    assert list(frame.columns) == ["a", "b", "y"]
    assert frame.iloc[0].tolist() == [1.5, 2, "x"]


def test_tsv_file_is_read_as_tab_separated(tmp_path):
    frame = load(tmp_path, b"a\tb\n1\t2\n", name="data.tsv").frame
    assert frame.to_numpy().tolist() == [[1, 2]]


def test_explicit_delimiter_overrides_sniffing(tmp_path):
    frame = load(tmp_path, b"a;b\n1,5;2\n", delimiter=";").frame
    assert frame["a"].tolist() == ["1,5"]


def test_wrong_delimiter_never_gives_a_single_column_frame(tmp_path):
    refused(tmp_path, b"abc\n1;2\n", "single column", "';'")


def test_utf8_bom_is_accepted(tmp_path):
    frame = load(tmp_path, b"\xef\xbb\xbfa,b\n1,2\n").frame
    assert list(frame.columns) == ["a", "b"]


def test_latin1_bytes_are_refused_with_position_never_mojibake(tmp_path):
    refused(tmp_path, b"a,name\n1,ok\n2,caf\xe9\n", "line 3, character 6", "0xe9", "not valid UTF-8",
            "Re-save it as UTF-8")


def test_valid_utf8_text_is_kept(tmp_path):
    frame = load(tmp_path, "a,name\n1,café ☕\n".encode()).frame
    assert frame["name"].tolist() == ["café ☕"]


def test_nul_byte_is_refused_with_position(tmp_path):
    refused(tmp_path, b"a,b\n1,2\n3,4\x00\n", "line 3, character 4", "NUL byte")


def test_mixed_crlf_and_lf_are_accepted(tmp_path):
    frame = load(tmp_path, b"a,b\r\n1,2\n3,4\r\n5,6").frame
    assert frame.to_numpy().tolist() == [[1, 2], [3, 4], [5, 6]]
    assert list(frame.columns) == ["a", "b"]


def test_old_mac_cr_line_endings_are_accepted(tmp_path):
    assert load(tmp_path, b"a,b\r1,2\r3,4\r").frame.to_numpy().tolist() == [[1, 2], [3, 4]]


def test_gzip_file_named_csv_is_read(tmp_path):
    frame = load(tmp_path, gzip.compress(b"a,b\n1,2\n") + gzip.compress(b"3,4\n")).frame
    assert frame.to_numpy().tolist() == [[1, 2], [3, 4]]


def test_truncated_gzip_is_refused(tmp_path):
    data = gzip.compress(b"a,b\n" + b"1,2\n" * 5000)
    refused(tmp_path, data[: len(data) // 2], "gzip-compressed but truncated")


def test_gzip_expansion_is_bounded():
    bomb = gzip.compress(b"0" * 1_000_000)
    with pytest.raises(DataError, match="expands to more than 1,000 bytes"):
        gunzip(bomb, "bomb.csv", limit=1000)


@pytest.mark.parametrize(
    "data, what",
    [(b"PK\x03\x04rest", "ZIP archive"), ("a,b\n1,2\n".encode("utf-16"), "UTF-16"), (b"PAR1xxxxPAR1", "Parquet")],
    ids=["xlsx", "utf16", "parquet-named-csv"],
)
def test_binary_files_named_csv_are_refused_by_kind(tmp_path, data, what):
    refused(tmp_path, data, what, format="csv")


def test_first_line_too_long_to_be_a_header_is_refused(tmp_path):
    refused(tmp_path, b"1," * (3 * 1024 * 1024), "longer than 4 MiB")


# --- values in numeric features and targets --------------------------------------


@pytest.mark.parametrize(
    "value, fragment",
    [
        (b"NaN", "is empty or NaN"),
        (b"", "is empty or NaN"),
        (b"inf", "is inf"),
        (b"-inf", "is -inf"),
        (b"1e400", "too large for float64"),
    ],
    ids=["NaN", "empty", "inf", "-inf", "1e400"],
)
def test_missing_or_infinite_feature_value_names_column_and_line(tmp_path, value, fragment):
    data = b"a,b,y\n1,2,0\n3,4,1\n5," + value + b",0\n7,8,1\n9,10,0\n"
    split_refused(tmp_path, data, "Feature column 'b'", fragment, "line 4 of", "data.csv", "dropna")


def test_non_numeric_feature_value_names_column_value_and_line(tmp_path):
    data = b"a,b,y\n1,2,0\n3,4,1\n5,6,0\n7,seven,1\n"
    split_refused(tmp_path, data, "Column 'b' has 'seven' at line 5 of", "get_dummies")


def test_feature_line_numbers_count_quoted_line_breaks_and_blank_lines(tmp_path):
    data = b'note,b,y\n"multi\nline",1,0\n\nplain,NaN,1\nx,3,0\ny,4,1\n'
    split_refused(tmp_path, data, "Feature column 'b'", "line 5 of", features=["b"])


def test_missing_and_infinite_targets_name_the_line(tmp_path):
    split_refused(tmp_path, b"a,y\n1,0.5\n2,\n3,0.1\n4,0.2\n", "Target column 'y'", "line 3 of")
    split_refused(tmp_path, b"a,y\n1,0.5\n2,0.7\n3,1e400\n4,0.2\n", "infinite", "line 4 of")


def test_integers_too_big_for_int64_are_numbers_not_text(tmp_path):
    data = b"a,b,y\n1,99999999999999999999999,0\n2,3,1\n3,4,0\n4,5,1\n5,6,0\n"
    spec = SplitSpec(target="y", val_fraction=0.0, test_fraction=0.0)
    splits = split_table(load(tmp_path, data), spec)
    assert splits.info.features == ["a", "b"]
    assert splits.info.feature_mean[1] > 1e21  # the big value was used as a number


def test_formula_strings_are_kept_verbatim_as_data(tmp_path):
    data = f'a,b,y\n1,2,"{FORMULA}"\n3,4,safe\n5,6,"{FORMULA}"\n7,8,safe\n9,1,"{FORMULA}"\n2,3,safe\n'.encode()
    table = load(tmp_path, data)
    assert table.frame["y"].tolist()[0] == FORMULA
    splits = split_table(table, SplitSpec(target="y", val_fraction=0.2, test_fraction=0.2))
    assert splits.info.classes == [FORMULA, "safe"]  # a label like any other


def test_formula_string_in_a_feature_is_a_non_numeric_error(tmp_path):
    data = f'a,b,y\n1,2,0\n3,"{FORMULA}",1\n5,6,0\n7,8,1\n'.encode()
    split_refused(tmp_path, data, "Column 'b'", repr(FORMULA), "line 3 of")


# --- labels unseen in training, prediction on bad rows ----------------------------


def _classifier(tmp_path) -> tuple[TrainedModel, pd.DataFrame]:
    rows = "a,b,y\n" + "".join(f"{i},{i % 7},{'cat' if i % 2 else 'dog'}\n" for i in range(40))
    splits = split_table(load(tmp_path, rows.encode()), SplitSpec(target="y"))
    spec = ModelSpec()
    model = build_model(spec, splits.info.n_features, splits.info.n_outputs).eval()
    trained = TrainedModel(model=model, spec=spec, info=splits.info, document={}, uri=str(tmp_path))
    return trained, pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0], "y": ["cat", "bird"]})


def test_label_unseen_in_training_is_refused_at_evaluation(tmp_path):
    trained, frame = _classifier(tmp_path)
    with pytest.raises(DataError, match=r"labels the model never saw in training: \['bird'\].*cat"):
        trained.info.encode_target(frame["y"])


def test_predict_ignores_a_target_column_with_unseen_labels(tmp_path):
    trained, frame = _classifier(tmp_path)
    predicted = trained.predict(frame)
    assert set(predicted) <= {"cat", "dog"} and len(predicted) == 2


@pytest.mark.parametrize("value, fragment", [(np.nan, "is empty or NaN"), ("x", "Column 'b' has 'x'")])
def test_predict_refuses_bad_feature_values_instead_of_guessing(tmp_path, value, fragment):
    trained, frame = _classifier(tmp_path)
    frame = frame.astype({"b": object})
    frame.loc[1, "b"] = value
    with pytest.raises(DataError, match=fragment) as caught:
        trained.predict(frame)
    assert "data row 2" in str(caught.value)


# --- positive controls ------------------------------------------------------------


def test_rfc4180_quoting_parses_exactly(tmp_path):
    data = (b'id,text,y\r\n'
            b'1,"comma, inside",0\r\n'
            b'2,"say ""hi""",1\r\n'
            b'3,"line one\r\nline two\nline three",0\r\n'
            b'4,"",1\r\n'
            b'5,"""",0\r\n')
    frame = load(tmp_path, data).frame
    text = frame["text"].tolist()
    assert text[:3] == ["comma, inside", 'say "hi"', "line one\r\nline two\nline three"]
    assert pd.isna(text[3]) and text[4] == '"'
    assert frame["id"].tolist() == [1, 2, 3, 4, 5]
    assert frame["y"].tolist() == [0, 1, 0, 1, 0]


def test_ordinary_file_loads_like_pandas(tmp_path):
    rng = np.random.default_rng(0)
    expected = pd.DataFrame(rng.normal(size=(2000, 8)), columns=[f"x{i}" for i in range(8)])
    expected["label"] = rng.choice(["a", "b", "c"], 2000)
    table = load(tmp_path, expected.to_csv(index=False).encode())
    pd.testing.assert_frame_equal(table.frame, pd.read_csv(io.StringIO(expected.to_csv(index=False))))
    assert table.where(0) == f"line 2 of {tmp_path / 'data.csv'}"


def test_scan_agrees_with_python_csv_module_on_random_files():
    """Record lines and field counts of the vectorised scan match Python's csv module
    on seeded random files (quoted delimiters, line breaks and quotes; blank lines;
    CRLF; ragged rows), with windows small enough to exercise the windowed paths."""
    rng = random.Random(7)
    checked = refusals = 0
    for _ in range(150):
        delimiter = rng.choice([",", ";", "\t"])
        raw = _random_csv(rng, delimiter)
        reference = _csv_module_records(raw, delimiter)
        wrong = [line for line, n in reference[1:] if n != reference[0][1]]
        for window in (5, 64, 1 << 20):
            if wrong:
                with pytest.raises(DataError, match=f"line {wrong[0]}:"):
                    scan_csv(raw, delimiter, "f.csv", window=window)
                refusals += 1
                continue
            layout = scan_csv(raw, delimiter, "f.csv", window=window)
            lines = layout.record_lines if layout.record_lines is not None else range(2, layout.n_records + 2)
            assert list(lines) == [line for line, _ in reference[1:]], raw
            assert layout.n_fields == reference[0][1]
            checked += 1
    assert checked > 100 and refusals > 100  # both outcomes exercised


def _random_csv(rng: random.Random, d: str) -> bytes:
    def field() -> str:
        r = rng.random()
        if r < 0.5:
            return str(rng.randint(0, 999))
        if r < 0.6:
            return ""
        text = rng.choice(["a", "b c", f"x{d}y", 'say "hi"', "multi\nline", "cr\r\nlf", ""])
        return '"' + text.replace('"', '""') + '"'

    n_columns = rng.randint(1, 5)
    lines = [d.join(f"c{i}" for i in range(n_columns))]
    for _ in range(rng.randint(1, 30)):
        if rng.random() < 0.1:
            lines.append("")
        n = n_columns + (rng.choice([-1, 1]) if rng.random() < 0.04 else 0)
        lines.append(d.join(field() for _ in range(max(n, 1))))
    end = rng.choice(["\n", "\r\n"])
    return (end.join(lines) + rng.choice(["", end])).encode()


def _csv_module_records(raw: bytes, delimiter: str) -> list[tuple[int, int]]:
    """(first line, field count) of each non-blank record, per Python's csv module."""
    reader = csv.reader(io.StringIO(raw.decode(), newline=""), delimiter=delimiter, strict=True)
    records, previous = [], 0
    for row in reader:
        first, previous = previous + 1, reader.line_num
        if row:
            records.append((first, len(row)))
    return records


# --- one 50 MB line: bounded memory, measured in a fresh process --------------------

_MEASURE = textwrap.dedent("""
    import json, resource, sys
    from prefect_torch.engine.data import LoadSpec, load_table
    from prefect_torch.errors import DataError
    try:
        table = load_table(LoadSpec(uri=sys.argv[1]))
        outcome = "loaded %d rows" % len(table.frame)
    except DataError as exc:
        outcome = "DataError: " + str(exc)[:300]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"outcome": outcome, "peak": peak}))
""")

MB50 = 50 * 1024 * 1024


@pytest.mark.slow
@pytest.mark.parametrize(
    "content, expected",
    [
        (b"a,b,label\n1," + b"x" * MB50 + b",0\n2,3,1\n", "loaded 2 rows"),
        (b"a,b,label\n1,2," + b"7" * MB50 + b"\n", "loaded 1 rows"),
        (b"a," * (MB50 // 2), "DataError: "),
        (b"a,b,label\n" + b"1," * (MB50 // 2) + b"\n", "DataError: "),
        (b'a,b,label\n1,"' + b"x," * (MB50 // 2) + b'",0\n', "loaded 1 rows"),
    ],
    ids=["huge-text-field", "huge-number", "no-line-break", "25M-fields", "huge-quoted-field"],
)
def test_single_50mb_line_has_bounded_memory(tmp_path, content, expected):
    path = write(tmp_path, content)
    del content
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, path], capture_output=True, text=True, timeout=300,
        cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["outcome"].startswith(expected), report["outcome"]
    assert len(report["outcome"]) < 1000  # messages never echo the huge field
    assert report["peak"] < 1.5 * 2**30, f"peak RSS {report['peak'] / 2**20:.0f} MiB"


# --- Parquet -----------------------------------------------------------------------


def _parquet_bytes(**options) -> bytes:
    frame = pd.DataFrame({"a": np.arange(2000, dtype=float), "y": np.arange(2000) % 3})
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame), buffer, **options)
    return buffer.getvalue()


def _damaged(data: bytes, at: int, length: int = 16) -> bytes:
    damaged = bytearray(data)
    damaged[at:at + length] = b"\xff" * length
    return bytes(damaged)


def test_parquet_positive_control(tmp_path):
    table = load(tmp_path, _parquet_bytes(), name="data.parquet")
    assert table.frame.shape == (2000, 2) and table.frame["a"].sum() == sum(range(2000))
    assert table.where(4) == f"row 5 of {tmp_path / 'data.parquet'}"


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda b: b[: len(b) // 2], "does not start and end with the Parquet marker"),
        (lambda b: b[:-1], "does not start and end with the Parquet marker"),
        (lambda b: b"", "is empty"),
        (lambda b: _damaged(b, len(b) - 40, 24), "truncated or corrupted"),
    ],
    ids=["half", "last-byte", "empty", "footer"],
)
def test_truncated_or_corrupted_parquet_is_refused(tmp_path, damage, fragment):
    refused(tmp_path, damage(_parquet_bytes()), "not a readable Parquet file", fragment, name="data.parquet")


def test_corrupted_compressed_parquet_page_is_refused(tmp_path):
    data = _parquet_bytes(compression="snappy")
    refused(tmp_path, _damaged(data, 100), "truncated or corrupted", name="data.parquet")


def test_corrupted_parquet_page_with_checksum_is_refused(tmp_path):
    data = _parquet_bytes(compression="none", write_page_checksum=True)
    refused(tmp_path, _damaged(data, 100), "CRC checksum", name="data.parquet")


def test_parquet_with_duplicate_columns_is_refused(tmp_path):
    path = tmp_path / "dup.parquet"
    pq.write_table(pa.table([pa.array([1, 2]), pa.array([3, 4])], names=["a", "a"]), path)
    with pytest.raises(DataError, match=r"duplicate column names \['a'\]"):
        load_table(LoadSpec(uri=str(path)))


def test_header_row_too_long_is_refused_with_an_explicit_delimiter(tmp_path):
    refused(tmp_path, b"a;" * (3 * 1024 * 1024) + b"\n", "header row is longer than 4 MiB", delimiter=";")


def test_blank_lines_before_the_header_are_skipped(tmp_path):
    table = load(tmp_path, b"\n\r\na,b\n1,2\n\n3,4\n")
    assert list(table.frame.columns) == ["a", "b"] and table.frame.to_numpy().tolist() == [[1, 2], [3, 4]]
    assert [table.where(0), table.where(1)] == [f"line {n} of {tmp_path / 'data.csv'}" for n in (4, 6)]
