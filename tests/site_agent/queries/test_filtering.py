"""A parsed filter as a row mask over a site's table, checked against pandas computed independently."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from flip_core.filters import And, Compare, FilterInvalid, Not, Or, parse
from flip_core.filters import Filter as FilterType
from flip_core.paths import data_dir
from site_agent.data.formats import read_table
from site_agent.queries.filtering import column_kind, mask

Truth = Callable[[pd.DataFrame], "pd.Series[bool]"]


@pytest.fixture
def table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": [30.0, 55.0, np.nan, 70.0, 50.0, 62.0, np.nan],
            "sex": [1.0, 1.0, 0.0, np.nan, 0.0, 1.0, 1.0],
            "cp": [1, 2, 3, 4, 1, 2, 3],
            "name": ["ann", None, "bob", "cy", np.nan, "dee", "bob"],
            "code": ["1", "2", 1, None, "x", 2.0, "1.0"],
            "flag": [True, False, True, False, True, False, True],
            "n": pd.array([1, None, 3, 4, 5, 6, None], dtype="Int64"),
            "kind": pd.Categorical(["a", "b", None, "a", "b", "c", "a"]),
            "seen": pd.date_range("2024-01-01", periods=7),
        }
    )


def rows(text: str, table: pd.DataFrame) -> np.ndarray:
    result = mask(parse(text, list(table.columns)), table)
    assert isinstance(result, np.ndarray) and result.dtype == bool and result.shape == (len(table),)
    return result


CASES: list[tuple[str, Truth]] = [
    ("age > 50 and sex = 1", lambda t: (t.age > 50) & (t.sex == 1)),
    ("age > 50 or sex = 1", lambda t: (t.age > 50) | (t.sex == 1)),
    ("50 < age", lambda t: t.age > 50),
    ("age >= 50", lambda t: t.age >= 50),
    ("age <= 50", lambda t: t.age <= 50),
    ("age < 50", lambda t: t.age < 50),
    ("age = 55", lambda t: t.age == 55),
    ("age != 55", lambda t: (t.age != 55) & t.age.notna()),  # a missing age is unknown, not "not 55"
    ("not (age > 50)", lambda t: (t.age <= 50) & t.age.notna()),
    ("not not (age > 50)", lambda t: t.age > 50),
    ("not (age > 50 and sex = 1)", lambda t: (t.age <= 50) | (t.sex != 1) & t.sex.notna()),
    ("not (age > 50 or sex = 1)", lambda t: (t.age <= 50) & (t.sex != 1) & t.sex.notna()),
    ("age > 50 or not (sex = 1)", lambda t: (t.age > 50) | ((t.sex != 1) & t.sex.notna())),
    ("cp in (1, 3)", lambda t: t.cp.isin([1, 3])),
    ("cp not in (1, 3)", lambda t: ~t.cp.isin([1, 3])),
    ("sex in (0)", lambda t: t.sex == 0),
    ("sex not in (0)", lambda t: (t.sex != 0) & t.sex.notna()),
    ("not (sex not in (0))", lambda t: t.sex == 0),
    ("age between 50 and 62", lambda t: (t.age >= 50) & (t.age <= 62)),
    ("not (age between 50 and 62)", lambda t: ((t.age < 50) | (t.age > 62)) & t.age.notna()),
    ("age is null", lambda t: t.age.isna()),
    ("age is not null", lambda t: t.age.notna()),
    ("not (age is null)", lambda t: t.age.notna()),
    ("age is null or age > 60", lambda t: t.age.isna() | (t.age > 60)),
    ("not (age is null or age > 60)", lambda t: t.age.notna() & (t.age <= 60)),
    ("name = 'bob'", lambda t: t.name == "bob"),
    ("name != 'bob'", lambda t: (t.name != "bob") & t.name.notna()),
    ("not (name = 'bob')", lambda t: (t.name != "bob") & t.name.notna()),
    ("name < 'c'", lambda t: t.name.isin(["ann", "bob"])),
    ("name between 'b' and 'cz'", lambda t: t.name.isin(["bob", "cy"])),
    ("name in ('ann', 'dee')", lambda t: t.name.isin(["ann", "dee"])),
    ("name not in ('ann', 'dee')", lambda t: ~t.name.isin(["ann", "dee"]) & t.name.notna()),
    ("name is null", lambda t: t.name.isna()),
    ("code = 1", lambda t: pd.Series([True, False, True, False, False, False, True])),  # "1", 1 and "1.0"
    ("code != 1", lambda t: pd.Series([False, True, False, False, True, True, False])),
    ("code = '1'", lambda t: pd.Series([True, False, True, False, False, False, False])),  # by its text
    ("code in (2, 'x')", lambda t: pd.Series([False, True, False, False, True, True, False])),
    ("flag = true", lambda t: t.flag),
    ("flag != 1", lambda t: ~t.flag),
    ("n > 3", lambda t: pd.Series([False, False, False, True, True, True, False])),
    ("not (n > 3)", lambda t: pd.Series([True, False, True, False, False, False, False])),
    ("n in (1, 6)", lambda t: pd.Series([True, False, False, False, False, True, False])),
    ("kind = 'a'", lambda t: t.kind == "a"),
    ("kind != 'a'", lambda t: (t.kind != "a") & t.kind.notna()),
    ("kind in ('b', 'c')", lambda t: t.kind.isin(["b", "c"])),
    ("seen is not null", lambda t: t.seen.notna()),
]


@pytest.mark.parametrize(("text", "truth"), CASES, ids=[text for text, _ in CASES])
def test_mask_matches_pandas(text: str, truth: Truth, table: pd.DataFrame) -> None:
    assert rows(text, table).tolist() == truth(table).fillna(False).astype(bool).tolist()


def test_missing_values_are_unknown_in_both_directions(table: pd.DataFrame) -> None:
    missing = table.age.isna().to_numpy()
    assert not (rows("age > 50", table) & missing).any()
    assert not (rows("not (age > 50)", table) & missing).any()
    assert (rows("age > 50", table) | rows("not (age > 50)", table) | missing).all()


def test_the_empty_filter_keeps_every_row(table: pd.DataFrame) -> None:
    assert rows("", table).tolist() == [True] * len(table)
    assert mask(parse(""), table.iloc[:0]).shape == (0,)


def test_a_tree_built_by_hand_gets_the_same_logic(table: pd.DataFrame) -> None:
    tree = Or((Not(Compare("age", ">", 50)), And((Compare("sex", "=", 1), Compare("cp", "<", 3)))))
    expected = ((table.age <= 50) | ((table.sex == 1) & (table.cp < 3))).to_numpy()
    assert mask(FilterType("", tree), table).tolist() == expected.tolist()
    assert mask(FilterType("", And(())), table).all() and not mask(FilterType("", Or(())), table).any()


def refusal(text: str, table: pd.DataFrame) -> str:
    with pytest.raises(FilterInvalid) as caught:
        mask(parse(text), table)
    assert caught.value.field == "where"
    return str(caught.value)


def test_a_number_column_is_not_compared_with_text(table: pd.DataFrame) -> None:
    assert refusal("age > 'old'", table) == "column 'age' holds numbers; 'old' is text"
    assert "column 'cp' holds numbers; 'a' is text" in refusal("cp in (1, 'a')", table)
    assert "column 'age' holds numbers" in refusal("age between 'a' and 'b'", table)
    assert "column 'n' holds numbers" in refusal("n = 'x'", table)
    assert "column 'age' holds numbers" in refusal("age > 1 or age = 'x'", table)  # refused before any row is read


def test_a_text_column_is_not_ordered_against_a_number(table: pd.DataFrame) -> None:
    assert "column 'name' holds text; 5 is a number" in refusal("name > 5", table)
    assert "column 'kind' holds text" in refusal("kind <= 1", table)
    assert "column 'name' holds text" in refusal("name between 1 and 2", table)


def test_other_dtypes_are_refused_except_is_null(table: pd.DataFrame) -> None:
    assert f"column 'seen' holds {table.seen.dtype} values" in refusal("seen > 1", table)
    assert "column 'seen' holds" in refusal("seen = '2024-01-01'", table)


def test_an_unknown_column_names_those_that_exist(table: pd.DataFrame) -> None:
    listing = ", ".join(table.columns)
    assert refusal("agee > 1", table) == f"unknown column 'agee' in the filter: the columns are {listing}"
    assert "unknown column 'Age'" in refusal("Age is null", table)


def test_a_repeated_column_name_is_refused() -> None:
    twice = pd.DataFrame([[1, 2]], columns=["a", "a"])
    assert "column 'a' appears 2 times" in refusal("a = 1", twice)


def test_column_kinds(table: pd.DataFrame) -> None:
    kinds = {name: column_kind(table[name]) for name in table.columns}
    assert kinds == {
        "age": "number",
        "sex": "number",
        "cp": "number",
        "name": "text",
        "code": "text",
        "flag": "number",
        "n": "number",
        "kind": "text",
        "seen": str(table.seen.dtype),
    }
    assert column_kind(pd.Series(["a"], dtype="string")) == "text"


def test_the_uci_heart_switzerland_table() -> None:
    path = data_dir() / "heart-disease" / "processed.switzerland.data"
    table = read_table(path, "uci-heart")
    assert len(table) == 123
    cohort = rows("age > 50 and sex = 1", table)
    assert cohort.tolist() == ((table.age > 50) & (table.sex == 1)).tolist()
    assert 0 < cohort.sum() < len(table)
    assert table.ca.isna().any()  # many missing: three-valued logic matters here
    unknown = rows("not (ca > 0) and chol is not null", table)
    assert unknown.tolist() == ((table.ca <= 0) & table.chol.notna()).tolist()
    assert (
        rows("trestbps between 120 and 140 or cp in (1, 4)", table).tolist()
        == (table.trestbps.between(120, 140) | table.cp.isin([1, 4])).tolist()
    )


def test_small_and_nullable_dtypes_compare_exactly() -> None:
    table = pd.DataFrame(
        {
            "u": np.array([1, 2, 3], dtype="uint8"),
            "b": pd.array([True, None, False], dtype="boolean"),
            "f": pd.array([1.5, None, 2.0], dtype="Float64"),
        }
    )
    assert rows("u = 300", table).tolist() == [False, False, False]  # no wrap-around into uint8
    assert rows("u > -1", table).tolist() == [True, True, True]
    assert rows("u < 10000000000000000000000", table).tolist() == [True, True, True]
    assert rows("not (b = true)", table).tolist() == [False, False, True]
    assert rows("not (f > 1.6)", table).tolist() == [True, False, False]
