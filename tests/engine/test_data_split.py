import numpy as np
import pandas as pd
import pytest

from prefect_torch.engine.data import LoadSpec, Table, load_table
from prefect_torch.engine.split import SplitSpec, split_table
from prefect_torch.errors import ConfigError, DataError
from tests.datasets import noisy_linear, separable_classes


def test_csv_and_parquet_load_to_the_same_frame_with_content_keys(tmp_path):
    frame = noisy_linear(50)
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    csv = load_table(LoadSpec(uri=str(tmp_path / "d.csv")))
    parquet = load_table(LoadSpec(uri=str(tmp_path / "d.parquet")))
    pd.testing.assert_frame_equal(csv.frame, parquet.frame, check_exact=False)
    assert csv.key.startswith("xxh3-") and csv.key != parquet.key
    assert load_table(LoadSpec(uri=str(tmp_path / "d.csv"))).key == csv.key


def test_split_sizes_follow_fractions_and_are_disjoint():
    splits = split_table(noisy_linear(1000), SplitSpec(target="y", val_fraction=0.2, test_fraction=0.1))
    assert splits.info.rows == {"train": 700, "val": 200, "test": 100}
    assert splits.info.problem == "regression"
    assert splits.train.X.dtype.is_floating_point and splits.train.X.shape == (700, 6)


def test_features_are_standardised_with_train_statistics_only():
    splits = split_table(noisy_linear(2000), SplitSpec(target="y"))
    train_X = splits.train.X.double()
    assert torch_allclose(train_X.mean(0), 0.0, atol=1e-5)
    assert torch_allclose(train_X.std(0, unbiased=False), 1.0, atol=1e-4)
    # val/test use the train statistics, so they are close to but not exactly standardised
    assert not torch_allclose(splits.val.X.double().mean(0), 0.0, atol=1e-6)


def test_every_column_type_standardises_to_the_same_bits():
    """float32 columns are gathered once into the split and standardised in place; the
    same numbers held as float64 or as int64 go the general way. Same tensors, bitwise."""
    rng = np.random.default_rng(3)
    as_float32 = pd.DataFrame({f"x{i}": rng.normal(size=70_000).astype(np.float32) for i in range(5)})
    as_float32["y"] = rng.normal(size=70_000)
    as_float64 = as_float32.astype({f"x{i}": np.float64 for i in range(5)})
    whole = as_float32.assign(**{f"x{i}": np.round(as_float32[f"x{i}"] * 100).astype(np.float32) for i in range(5)})
    as_int64 = whole.astype({f"x{i}": np.int64 for i in range(5)})
    for same_values in ((as_float32, as_float64), (whole, as_int64)):
        left, right = (split_table(frame, SplitSpec(target="y")) for frame in same_values)
        assert left.info.feature_mean == right.info.feature_mean and left.info.feature_std == right.info.feature_std
        for name in ("train", "val", "test"):
            assert left[name].X.dtype == right[name].X.dtype
            assert left[name].X.numpy().tobytes() == right[name].X.numpy().tobytes(), name


def torch_allclose(tensor, value, atol):
    return bool((tensor - value).abs().max() <= atol)


def test_stratified_split_keeps_class_proportions():
    frame = separable_classes(1000, classes=3)
    splits = split_table(frame, SplitSpec(target="label", val_fraction=0.2, test_fraction=0.2))
    overall = frame["label"].value_counts(normalize=True).sort_index().to_numpy()
    for split in (splits.train, splits.val, splits.test):
        share = np.bincount(split.y.numpy(), minlength=3) / len(split)
        assert np.abs(share - overall).max() < 0.02


def test_same_seed_same_split_other_seed_other_split():
    frame = noisy_linear(300)
    a = split_table(frame, SplitSpec(target="y", seed=1))
    b = split_table(frame, SplitSpec(target="y", seed=1))
    c = split_table(frame, SplitSpec(target="y", seed=2))
    assert (a.test.X == b.test.X).all()
    assert not (a.test.X.shape == c.test.X.shape and (a.test.X == c.test.X).all())


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (pd.Series([0.5, 1.7, 2.2, 3.9] * 10), "regression"),
        (pd.Series([0, 1] * 20), "binary"),
        (pd.Series(["yes", "no"] * 20), "binary"),
        (pd.Series([1, 2, 3, 4] * 10), "multiclass"),
        (pd.Series(["a", "b", "c"] * 10), "multiclass"),
        (pd.Series(range(100)), "regression"),
    ],
)
def test_problem_type_is_inferred_from_the_target(target, expected):
    frame = pd.DataFrame({"x": np.arange(len(target), dtype=float), "t": target})
    assert split_table(frame, SplitSpec(target="t", stratify=False)).info.problem == expected


# -- bad input: each names the problem and the fix --------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found.*Check the path"):
        load_table(LoadSpec(uri=str(tmp_path / "nope.csv")))


def test_unreadable_format(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(DataError, match="format.*format='csv'"):
        load_table(LoadSpec(uri=str(path)))


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    noisy_linear(20).to_parquet(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="not a readable Parquet"):
        load_table(LoadSpec(uri=str(path)))


def test_target_column_absent_lists_the_columns():
    with pytest.raises(DataError, match=r"Target column 'price' is not in the data.*'x0'"):
        split_table(noisy_linear(20), SplitSpec(target="price"))


def test_no_feature_columns():
    with pytest.raises(DataError, match="no feature columns"):
        split_table(pd.DataFrame({"y": [1.0, 2.0, 3.0]}), SplitSpec(target="y"))


def test_non_numeric_features_are_named_with_the_fix():
    frame = noisy_linear(30)
    frame["city"] = "Paris"
    frame["colour"] = "red"
    with pytest.raises(DataError, match=r"\['city', 'colour'\].*get_dummies.*features"):
        split_table(frame, SplitSpec(target="y"))


def test_nan_in_features_names_column_and_row():
    frame = noisy_linear(30)
    frame.loc[4, "x2"] = np.nan
    with pytest.raises(DataError, match=r"'x2' is empty or NaN at row 5.*'x2': 1.*dropna"):
        split_table(frame, SplitSpec(target="y"))


def test_nan_in_target():
    frame = noisy_linear(30)
    frame.loc[7, "y"] = np.nan
    with pytest.raises(DataError, match="'y' has 1 missing values"):
        split_table(frame, SplitSpec(target="y"))


def test_too_few_rows_for_the_split():
    with pytest.raises(DataError, match="2 rows.*at least 3"):
        split_table(noisy_linear(2), SplitSpec(target="y"))


def test_class_too_small_to_stratify():
    frame = separable_classes(60, classes=2)
    frame.loc[0, "label"] = "rare"
    with pytest.raises(DataError, match="Class 'rare'.*1 row.*stratify=False"):
        split_table(frame, SplitSpec(target="label"))


def test_unknown_problem_type():
    with pytest.raises(ConfigError, match="problem"):
        SplitSpec(target="y", problem="ranking")


def test_fractions_that_leave_no_training_rows():
    with pytest.raises(ConfigError, match="leave rows for training"):
        SplitSpec(target="y", val_fraction=0.5, test_fraction=0.5)


def test_table_from_frame_is_keyed_by_content():
    a, b = noisy_linear(40), noisy_linear(40)
    assert Table.from_frame(a).key == Table.from_frame(b).key
    b.loc[3, "x1"] += 1e-9
    assert Table.from_frame(a).key != Table.from_frame(b).key


def test_the_feature_matrix_is_the_columns_side_by_side_in_any_chunking(monkeypatch):
    """Arrow-backed columns (read-only, as a Parquet read gives them) are transposed into a
    row-major matrix chunk by chunk, without a warning about read-only arrays."""
    import warnings

    import pyarrow as pa

    from prefect_torch.engine import split

    rng = np.random.default_rng(5)
    columns = {f"x{i}": rng.normal(size=10_001).astype(np.float32) for i in range(7)}
    frame = pa.table(columns).to_pandas(split_blocks=True, self_destruct=True)
    assert not frame["x0"].to_numpy().flags.writeable
    expected = np.column_stack(list(columns.values()))
    for chunk_bytes in (7 * 4 * 1000, 1 << 30):  # ten and a bit chunks, then one
        monkeypatch.setattr(split, "_TRANSPOSE_BYTES", chunk_bytes)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            matrix = split._FeatureMatrix(frame, list(columns)).matrix
        assert matrix.flags.c_contiguous and matrix.dtype == np.float32
        assert matrix.tobytes() == expected.tobytes()
