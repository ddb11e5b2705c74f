"""A site's mock of its table (site_agent.queries.mock), on the real UCI heart-disease tables and small made-up ones."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flip_core.errors import FlipError
from site_agent.queries.mock import MockRefused, describe_mock, make_mock

from helpers import heart_tables

SITES = ("cleveland", "hungarian", "switzerland", "va")
T = 10
SEED = 7
ROWS = {"cleveland": 300, "hungarian": 290, "switzerland": 120, "va": 200}  # 303, 294, 123, 200 real rows


@pytest.fixture(scope="module")
def heart() -> dict[str, pd.DataFrame]:
    return heart_tables(SITES)


@pytest.fixture(scope="module")
def mocks(heart: dict[str, pd.DataFrame]) -> dict[tuple[str, int], pd.DataFrame]:
    return {(site, t): make_mock(table, t, SEED) for site, table in heart.items() for t in (T, 20)}


def levels_of(column: pd.Series) -> bool:
    return bool(column.nunique(dropna=True) <= 20)


def copied_rows(mock: pd.DataFrame, real: pd.DataFrame) -> pd.DataFrame:
    """The mock rows equal to some real row in every column (pandas' merge matches missing with missing)."""
    return mock.merge(real.drop_duplicates(), how="inner", on=list(real.columns))


@pytest.mark.parametrize("site", SITES)
def test_the_mock_has_the_real_columns_dtypes_and_a_rounded_row_count(heart, mocks, site):
    real, mock = heart[site], mocks[site, T]
    assert list(mock.columns) == list(real.columns)
    assert mock.dtypes.to_dict() == real.dtypes.to_dict()
    assert len(mock) == ROWS[site]
    assert mock.index.equals(pd.RangeIndex(ROWS[site]))


@pytest.mark.parametrize(
    ("rows", "expected"), [(10, 10), (12, 10), (14, 10), (15, 20), (16, 20), (124, 120), (125, 130)]
)
def test_the_row_count_is_rounded_to_the_nearest_ten_and_is_at_least_ten(rows, expected):
    table = pd.DataFrame({"x": np.linspace(0.0, 1.0, rows) ** 2, "y": np.zeros(rows)})
    assert len(make_mock(table, 3, SEED)) == expected
    assert len(make_mock(table.iloc[:4], 3, SEED)) == 10


def test_the_mock_is_the_same_for_a_seed_and_differs_for_another(heart):
    real = heart["cleveland"]
    first, again, other = make_mock(real, T, 1), make_mock(real, T, 1), make_mock(real, T, 2)
    pd.testing.assert_frame_equal(first, again)
    assert not first.equals(other)
    assert (first["age"] != other["age"]).mean() > 0.5


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("threshold", [T, 20])
def test_no_mock_row_equals_a_real_row(heart, mocks, site, threshold):
    assert copied_rows(mocks[site, threshold], heart[site]).empty


def test_mock_rows_that_equal_real_rows_are_drawn_again():
    # a and b always agree in the real table; drawn independently, half the mock rows would copy a real one
    real = pd.DataFrame({"a": [0] * 50 + [1] * 50, "b": [0] * 50 + [1] * 50})
    mock = make_mock(real, T, SEED)
    assert len(mock) == 100
    assert (mock["a"] != mock["b"]).all()
    assert copied_rows(mock, real).empty


def test_a_table_whose_every_mock_row_would_be_real_is_refused():
    real = pd.DataFrame({"a": [0, 0, 1, 1] * 25, "b": [0, 1, 0, 1] * 25})
    with pytest.raises(MockRefused, match="real rows"):
        make_mock(real, T, SEED)


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("threshold", [T, 20])
def test_every_mock_level_is_shared_by_at_least_the_threshold_of_real_rows(heart, mocks, site, threshold):
    real, mock = heart[site], mocks[site, threshold]
    for name in real.columns:
        if levels_of(real[name]):
            counts = real[name].value_counts()
            for value in mock[name].dropna().unique():
                assert counts.get(value, 0) >= threshold, (site, name, value)


@pytest.mark.parametrize(
    ("site", "column", "allowed"),
    [
        ("switzerland", "ca", set()),  # 3 and 2 patients: the column is all missing
        ("switzerland", "thal", {3.0, 6.0, 7.0}),
        ("switzerland", "slope", {1.0, 2.0, 3.0}),
        ("switzerland", "fbs", {0.0}),  # 5 with fbs 1
        ("switzerland", "restecg", {0.0, 1.0}),  # 7 with restecg 2
        ("switzerland", "cp", {3, 4}),  # 4 and 4 with cp 1 and 2
        ("va", "sex", {1}),  # 6 women: no woman appears
        ("va", "cp", {2, 3, 4}),  # 8 with cp 1
        ("hungarian", "ca", set()),  # 3 patients with a value
        ("cleveland", "restecg", {0.0, 2.0}),  # 4 with restecg 1
    ],
)
def test_rare_levels_never_appear_and_common_ones_do(mocks, site, column, allowed):
    seen = set(mocks[site, T][column].dropna().unique().tolist())
    assert seen == allowed
    if not allowed:
        assert mocks[site, T][column].isna().all()


def test_a_higher_threshold_drops_more_levels(mocks):
    mock = mocks["switzerland", 20]
    assert set(mock["thal"].dropna().unique()) == {7.0}  # 19 with thal 3, 10 with thal 6
    assert set(mock["slope"].dropna().unique()) == {1.0, 2.0}  # 12 with slope 3


@pytest.mark.parametrize(("site", "column"), [("cleveland", "sex"), ("cleveland", "cp"), ("va", "cp"), ("va", "fbs")])
def test_level_frequencies_follow_the_real_ones_among_the_levels_kept(heart, mocks, site, column):
    real = heart[site][column].value_counts()
    real = real[real >= T]
    mock = mocks[site, T][column].value_counts(normalize=True)
    for value, share in (real / real.sum()).items():
        assert abs(mock.get(value, 0.0) - share) < 0.1, (value, mock.get(value, 0.0), share)


@pytest.mark.parametrize("site", SITES)
def test_numeric_values_lie_inside_the_real_5th_to_95th_percentiles(heart, mocks, site):
    real, mock = heart[site], mocks[site, T]
    checked = 0
    for name in real.columns:
        if levels_of(real[name]):
            continue
        low, high = np.percentile(real[name].dropna(), [5, 95])
        drawn = mock[name].dropna()
        assert drawn.between(low, high).all(), (site, name, drawn.min(), drawn.max(), low, high)
        if (real[name].dropna() % 1 == 0).all():
            assert (drawn % 1 == 0).all(), (site, name)
        checked += 1
    assert checked >= 3  # age and thalach everywhere; trestbps, chol and oldpeak at some sites


def test_numeric_values_avoid_the_sparse_stretches_and_the_tails():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(0, 10, 500), [33.0, 45.0, 57.0], rng.uniform(90, 100, 500), [1e6]])
    mock = make_mock(pd.DataFrame({"x": values}), T, SEED)["x"]
    assert len(mock) == 1000
    assert not mock.between(20, 80).any()  # the bins over the three values in between are dropped
    assert mock.between(0, 10).mean() == pytest.approx(0.5, abs=0.1)
    assert mock.max() <= np.percentile(values, 95)


@pytest.mark.parametrize(
    ("site", "column"),
    [
        ("cleveland", "ca"),  # 4 missing
        ("cleveland", "thal"),  # 2 missing
        ("hungarian", "trestbps"),  # 1 missing
        ("hungarian", "fbs"),  # 8 missing
        ("switzerland", "oldpeak"),  # 6 missing
        ("va", "chol"),  # 7 missing
    ],
)
def test_a_column_with_few_missing_values_has_none_missing_in_the_mock(heart, mocks, site, column):
    assert 0 < heart[site][column].isna().sum() < T
    assert mocks[site, T][column].notna().all()


@pytest.mark.parametrize(
    ("site", "column"),
    [("hungarian", "ca"), ("hungarian", "chol"), ("hungarian", "slope"), ("switzerland", "fbs"), ("va", "trestbps")],
)
def test_a_column_with_many_missing_values_keeps_its_missing_fraction(heart, mocks, site, column):
    real = heart[site][column].isna().mean()
    assert heart[site][column].isna().sum() >= T
    assert mocks[site, T][column].isna().mean() == pytest.approx(real, abs=0.02)


def test_a_table_smaller_than_the_threshold_is_refused_with_a_sentence(heart):
    with pytest.raises(MockRefused) as refused:
        make_mock(heart["va"].head(5), T, SEED)
    assert isinstance(refused.value, FlipError)
    assert "5 rows" in str(refused.value) and "threshold of 10" in str(refused.value)
    assert len(make_mock(heart["va"].head(T), T, SEED)) == 10


def test_a_threshold_under_one_is_refused(heart):
    with pytest.raises(MockRefused, match="at least 1"):
        make_mock(heart["va"], 0, SEED)


def test_text_bool_and_int_columns_keep_their_dtypes():
    n = 60
    real = pd.DataFrame(
        {
            "site": ["north"] * 30 + ["south"] * 25 + ["east"] * 5,
            "label": np.array(["a"] * 40 + ["b"] * 20, dtype=object),
            "smoker": [True] * 35 + [False] * 25,
            "visits": np.arange(n, dtype=np.int32),
            "score": np.linspace(0.0, 1.0, n),
        },
        index=np.arange(n)[::-1] * 3,
    )
    mock = make_mock(real, T, SEED)
    assert mock.dtypes.to_dict() == real.dtypes.to_dict()
    assert mock.index.equals(pd.RangeIndex(n))
    assert set(mock["site"]) == {"north", "south"}
    assert set(mock["label"]) == {"a", "b"} and set(mock["smoker"]) == {True, False}
    assert mock["visits"].between(np.percentile(real["visits"], 5), np.percentile(real["visits"], 95)).all()


def test_an_int_or_bool_column_with_nothing_to_release_is_all_missing_in_its_nullable_dtype():
    real = pd.DataFrame({"flag": [True] * 15 + [False] * 15, "code": np.repeat(np.arange(15), 2), "x": np.zeros(30)})
    mock = make_mock(real, 20, SEED)
    assert str(mock["flag"].dtype) == "boolean" and mock["flag"].isna().all()
    assert str(mock["code"].dtype) == "Int64" and mock["code"].isna().all()
    assert mock["x"].dtype == np.float64 and (mock["x"] == 0).all()


def test_the_description_says_what_a_mock_is_not():
    text = describe_mock()
    assert "independently" in text or "on its own" in text
    assert "relationship between columns" in text and "never to draw conclusions" in text
    assert "\n" not in text
