"""Which parser reads a CSV file must never change what the file means.

Numeric files go through pyarrow's multi-threaded reader, everything else through
pandas; each file below must come out exactly as pandas reads it on its own.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from prefect_torch.engine import csvread
from prefect_torch.engine.csvread import read_csv_bytes
from prefect_torch.errors import DataError

FILES = {
    "floats": b"a,b,y\n0.1,1e-3,2.5\n-1.25,3.0e10,0.0\n1.7976931348623157e308,5e-324,-0.0\n",
    "ints and floats": b"count,ratio,y\n1,0.5,1\n2,0.25,0\n-9223372036854775808,1,1\n",
    "pandas NA spellings": b"a,b,y\n1,NA,1\nnull,2,0\nNone,n/a,1\n#N/A,<NA>,0\nNaN,-nan,1\n,3,0\n",
    "quoted numbers": b'a,y\n"1.5",1\n"2",0\n',
    "blank lines": b"a,y\n1,2\n\n3,4\n\n",
    "crlf": b"a,y\r\n1,2\r\n3,4\r\n",
    "blank lines before the header": b"\n\na,y\n1,2\n",
    "old Mac line ends": b"a,y\r1,2\r3,4\r",
    "integers beyond int64": b"a,y\n18446744073709551615,1\n1,0\n",
    "integers below int64": b"a,y\n-9223372036854775809,1\n1,0\n",
    "large floats": b"a,y\n1e19,1\n2.5e30,0\n",
    "all NaN": b"a,y\nnan,1\nNaN,0\n",
    "true/false text": b"flag,y\ntrue,1\nfalse,0\n",
    "ones and trues": b"flag,y\n1,1\ntrue,0\n",
    "dates": b"day,y\n2024-01-02,1\n2024-01-03,0\n",
    "text categories": b"plan,y\nbasic,1\npro,0\n,1\n",
    "an all-empty column": b"a,b,y\n1,,1\n2,,0\n",
    "spaces around numbers": b"a,y\n 1.5 ,1\n2 ,0\n",
    "infinities": b"a,y\ninf,1\n-Infinity,0\n",
    "semicolons": b"a;b;y\n1,5;2;3\n4;5;6\n",
}


def pandas_reads(raw: bytes) -> pd.DataFrame:
    delimiter = ";" if raw.split(b"\n", 1)[0].count(b";") else ","
    return pd.read_csv(io.BytesIO(raw), sep=delimiter, index_col=False)


@pytest.mark.parametrize("name", FILES)
def test_every_file_reads_exactly_as_pandas_reads_it(name):
    raw = FILES[name]
    frame = read_csv_bytes(raw, f"{name}.csv").frame
    expected = pandas_reads(raw)
    assert list(frame.columns) == list(expected.columns)
    assert list(frame.dtypes) == list(expected.dtypes)
    for column in expected.columns:
        got, want = frame[column].to_numpy(), expected[column].to_numpy()
        if want.dtype.kind == "f":
            assert np.array_equal(got, want, equal_nan=True), column
            assert np.array_equal(np.signbit(got), np.signbit(want)), column  # -0.0 stays -0.0
        else:
            assert list(pd.Series(got).where(pd.notna(got), None)) == list(pd.Series(want).where(pd.notna(want), None))


def test_numeric_files_are_parsed_by_pyarrow_not_pandas(monkeypatch):
    def pandas_must_not_parse(*args, **kwargs):
        raise AssertionError("a numeric file was handed to pandas")

    monkeypatch.setattr(csvread.pd, "read_csv", pandas_must_not_parse)
    read = read_csv_bytes(FILES["pandas NA spellings"], "numeric.csv")
    assert read.frame.shape == (6, 3)
    assert read.first_line == 2


def test_a_ragged_numeric_row_is_still_refused_with_its_line():
    with pytest.raises(DataError, match=r"line 4"):
        read_csv_bytes(b"a,b,y\n1,2,3\n\n4,5\n6,7,8\n", "ragged.csv")


def test_random_floats_round_trip_bitwise_like_pandas():
    rng = np.random.default_rng(7)
    values = rng.normal(scale=rng.choice([1e-30, 1.0, 1e30], size=(2000, 1)), size=(2000, 5))
    raw = pd.DataFrame(values, columns=list("abcde")).to_csv(index=False, float_format="%.17g").encode()
    frame = read_csv_bytes(raw, "random.csv").frame
    assert np.array_equal(frame.to_numpy(), pandas_reads(raw).to_numpy())
