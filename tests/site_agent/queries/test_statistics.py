"""A site's answers to federated queries (site_agent.queries.statistics), checked against pandas on the real UCI
tables."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest

from flip_core.query import MAX_BINS, MISSING_LEVEL, OTHER_LEVEL, QUANTILE_NAMES, QUANTILES, QueryKind, QueryRequest
from site_agent.disclosure.suppression import line_is_safe, line_sets
from site_agent.queries.statistics import DOMINANCE_P, FEW_VALUES, QueryRefused, answer

from helpers import heart_tables

SITES = ("cleveland", "hungarian", "switzerland", "va")
T = 10
CATEGORICAL = ("sex", "cp", "fbs", "restecg", "exang", "slope", "ca", "thal", "num")


@pytest.fixture(scope="module")
def heart() -> dict[str, pd.DataFrame]:
    return heart_tables(SITES)


def ask(
    kind: QueryKind, columns: tuple[str, ...] = (), edges: tuple[float, ...] = (), threshold: int = 0
) -> QueryRequest:
    return QueryRequest("q1", "proj", "ana", "heart", kind, columns, edges=edges, threshold=threshold)


def every(table: pd.DataFrame) -> np.ndarray:
    return np.ones(len(table), dtype=bool)


def rows_at(table: pd.DataFrame, column: str, label: str, listed: list[str] | None = None) -> pd.Series:
    """Rows whose value has this level label (the heart tables hold whole numbers only); ``OTHER_LEVEL``: the rows
    of no other ``listed`` level (values too few rows of the whole table hold, and missing ones if not listed)."""
    if label == OTHER_LEVEL:
        named = pd.Series(False, index=table.index)
        for other in listed or []:
            if other != OTHER_LEVEL:
                named |= rows_at(table, column, other)
        return ~named
    return table[column].isna() if label == MISSING_LEVEL else table[column] == float(label)


def true_counts(table: pd.DataFrame, mask: np.ndarray, released: dict[str, Any]) -> list[int]:
    """pandas' count of the cohort at every cell of a released count table, in its C order."""
    cohort = table[mask]
    counts = []
    for combo in itertools.product(*released["levels"]):
        match = pd.Series(True, index=cohort.index)
        for column, label, listed in zip(released["dims"], combo, released["levels"], strict=True):
            match &= rows_at(cohort, column, label, listed)
        counts.append(int(match.sum()))
    return counts


def assert_honest_count_table(table: pd.DataFrame, mask: np.ndarray, released: dict[str, Any]) -> list[int]:
    """Released cells are pandas' counts; small ones are withheld; no line gives a withheld cell away."""
    truth = true_counts(table, mask, released)
    cells = released["cells"]
    assert len(cells) == len(truth)
    for cell, count in zip(cells, truth, strict=True):
        assert cell is None or cell == count
        if count < T:
            assert cell is None
    counts = np.array(truth)
    withheld = np.array([c is None for c in cells])
    shape = tuple(len(levels) for levels in released["levels"])
    for line in line_sets(shape):
        if withheld[line].any():
            mass = int(counts[line][withheld[line]].sum())
            assert (mass >= T and withheld[line].sum() >= 2) or released["total"] is None or withheld[line].all()
    return truth


def determined_cells(counts: np.ndarray, withheld: np.ndarray, lines: list[np.ndarray]) -> list[int]:
    """Withheld cells solvable exactly from the lines' sums and the released cells (linear algebra)."""
    hidden = np.flatnonzero(withheld)
    if hidden.size == 0:
        return []
    equations = np.array([np.isin(hidden, line).astype(float) for line in lines])
    rank = np.linalg.matrix_rank(equations)
    return [
        int(cell)
        for j, cell in enumerate(hidden)
        if np.linalg.matrix_rank(np.vstack([equations, np.eye(hidden.size)[j]])) == rank
    ]


def test_count_without_columns_is_the_cohort_size(heart: dict[str, pd.DataFrame]) -> None:
    cleveland = heart["cleveland"]
    assert answer(ask(QueryKind.COUNT), cleveland, every(cleveland), T) == {
        "dims": [],
        "levels": [],
        "cells": [303],
        "total": 303,
        "noise": 0,
    }
    old = (cleveland["age"] > 70).to_numpy()  # 6 patients
    assert answer(ask(QueryKind.COUNT), cleveland, old, T) == {
        "dims": [],
        "levels": [],
        "cells": [None],
        "total": None,
        "noise": 0,
    }


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize(
    "columns", [("sex",), ("cp",), ("sex", "cp"), ("num",), ("slope", "exang"), ("sex", "cp", "fbs")]
)
def test_count_by_matches_pandas_and_withholds_small_cells(
    heart: dict[str, pd.DataFrame], site: str, columns: tuple[str, ...]
) -> None:
    table = heart[site]
    for mask in (every(table), (table["age"] > 50).to_numpy()):
        released = answer(ask(QueryKind.COUNT, columns), table, mask, T)
        assert released["dims"] == list(columns)
        truth = assert_honest_count_table(table, mask, released)
        assert sum(truth) == int(mask.sum())
        assert released["total"] == int(mask.sum())


def test_the_switzerland_table_is_mostly_withheld_and_zeros_look_like_small_counts(
    heart: dict[str, pd.DataFrame],
) -> None:
    swiss = heart["switzerland"]
    by_cp = answer(ask(QueryKind.COUNT, ("sex", "cp")), swiss, every(swiss), T)
    assert by_cp["levels"] == [["0", "1"], ["3", "4", OTHER_LEVEL]]  # cp 1 and 2: under T rows each, not named
    truth = true_counts(swiss, every(swiss), by_cp)
    assert any(0 < c < T for c in truth)
    assert all(by_cp["cells"][i] is None for i, c in enumerate(truth) if c < T)
    women = (swiss.sex == 0).to_numpy()
    by_sex = answer(ask(QueryKind.COUNT, ("sex",)), swiss, women, T)  # 10 women, no man: a true zero
    small = truth.index(1)  # women with cp 3 (one)
    assert json.dumps(by_sex["cells"][1]) == json.dumps(by_cp["cells"][small]) == "null"
    fbs = answer(ask(QueryKind.COUNT, ("fbs",)), swiss, every(swiss), T)
    assert fbs["levels"] == [["0", OTHER_LEVEL, MISSING_LEVEL]]  # fbs is missing for 75 of 123, 1 for 5
    assert fbs["cells"] == [None, None, 75]  # 43 and 5: the 5 alone would be 123 - 43 - 75
    assert fbs["total"] == 123


def test_levels_come_from_the_whole_site_table_not_only_the_cohort(heart: dict[str, pd.DataFrame]) -> None:
    cleveland = heart["cleveland"]
    women = (cleveland["sex"] == 0).to_numpy()
    released = answer(ask(QueryKind.COUNT, ("sex",)), cleveland, women, T)
    assert released["levels"] == [["0", "1"]]  # men are a level though the cohort has none
    assert released["cells"] == [None, None]  # 97 women, 0 men: the zero is withheld, and 97 with it
    assert released["total"] == 97
    # ca lacks a value in 4 rows of the whole table: too few to name, they are counted as other, and the level is
    # listed even where the cohort has none of them
    assert answer(ask(QueryKind.COUNT, ("ca",)), cleveland, women, T)["levels"] == [["0", "1", "2", "3", OTHER_LEVEL]]
    # the same with a value: fewer than T patients hold it in the whole table, so it is not named
    tiny = cleveland.assign(ward=["A"] * 300 + ["B"] * 3)
    assert answer(ask(QueryKind.COUNT, ("ward",)), tiny, every(tiny), T)["levels"] == [["A", OTHER_LEVEL]]


@pytest.mark.parametrize("site", SITES)
def test_no_withheld_cell_can_be_solved_from_the_released_cells_and_margins(
    heart: dict[str, pd.DataFrame], site: str
) -> None:
    table = heart[site]
    checked = 0
    for size in (1, 2, 3):
        for columns in itertools.combinations(CATEGORICAL[:7], size):
            released = answer(ask(QueryKind.COUNT, columns), table, every(table), T)
            truth = np.array(assert_honest_count_table(table, every(table), released))
            withheld = np.array([c is None for c in released["cells"]])
            shape = tuple(len(levels) for levels in released["levels"])
            assert determined_cells(truth, withheld, line_sets(shape)) == []
            checked += 1
    assert checked == 7 + 21 + 35


def test_crosstab_takes_exactly_two_columns(heart: dict[str, pd.DataFrame]) -> None:
    hungarian = heart["hungarian"]
    crosstab = answer(ask(QueryKind.CROSSTAB, ("sex", "num")), hungarian, every(hungarian), T)
    assert crosstab == answer(ask(QueryKind.COUNT, ("sex", "num")), hungarian, every(hungarian), T)
    truth = pd.crosstab(hungarian["sex"], hungarian["num"]).to_numpy().ravel().tolist()
    assert truth == [69, 12, 119, 94]
    assert crosstab["cells"] == truth
    with pytest.raises(QueryRefused, match="exactly 2 column"):
        answer(ask(QueryKind.CROSSTAB, ("sex",)), hungarian, every(hungarian), T)


def test_hist_counts_below_each_bin_above_and_missing(heart: dict[str, pd.DataFrame]) -> None:
    va = heart["va"]
    edges = (100.0, 120.0, 140.0, 160.0)
    released = answer(ask(QueryKind.HIST, ("trestbps",), edges), va, every(va), T)
    assert released["dims"] == ["trestbps"]
    assert released["levels"] == [["below 100", "[100, 120)", "[120, 140)", "[140, 160]", "above 160", MISSING_LEVEL]]
    assert released["edges"] == list(edges)
    v = va["trestbps"]
    truth = [
        int((v < 100).sum()),
        int(((v >= 100) & (v < 120)).sum()),
        int(((v >= 120) & (v < 140)).sum()),
        int(((v >= 140) & (v <= 160)).sum()),  # the last bin is closed on the right
        int((v > 160).sum()),
        int(v.isna().sum()),
    ]
    assert int((v == 160).sum()) > 0 and sum(truth) == 200
    for cell, count in zip(released["cells"], truth, strict=True):
        assert cell == count if count >= T else cell is None
    assert released["total"] == 200
    counts, withheld = np.array(truth), np.array([c is None for c in released["cells"]])
    assert line_is_safe(counts, withheld, np.arange(len(truth)), T)


def test_hist_refuses_more_bins_than_the_cohort_allows(heart: dict[str, pd.DataFrame]) -> None:
    swiss = heart["switzerland"]
    edges = tuple(float(e) for e in range(30, 80, 3))  # 16 bins; 123 rows allow 12
    with pytest.raises(QueryRefused, match=r"16 bins are more than this cohort allows at this site: at most 12"):
        answer(ask(QueryKind.HIST, ("age",), edges), swiss, every(swiss), T)
    many = tuple(float(e) for e in range(MAX_BINS + 2))
    with pytest.raises(QueryRefused, match=rf"1 to {MAX_BINS} bins"):
        answer(ask(QueryKind.HIST, ("age",), many), heart["cleveland"], every(heart["cleveland"]), 1)
    with pytest.raises(QueryRefused, match="1 to 100 bins"):
        answer(ask(QueryKind.HIST, ("age",), (40.0,)), swiss, every(swiss), T)
    with pytest.raises(QueryRefused, match="increasing order"):
        answer(ask(QueryKind.HIST, ("age",), (40.0, 30.0)), swiss, every(swiss), T)


def test_missing_counts_per_column_protect_each_pair(heart: dict[str, pd.DataFrame]) -> None:
    hungarian = heart["hungarian"]
    released = answer(ask(QueryKind.MISSING, ("chol", "slope", "age")), hungarian, every(hungarian), T)
    assert released["dims"] == ["column", "state"]
    assert released["levels"] == [["chol", "slope", "age"], ["missing", "present"]]
    # chol: 23 missing; slope: 190; age: none missing, and a zero takes its pair with it
    assert released["cells"] == [23, 271, 190, 104, None, None]
    assert released["total"] == 294
    everything = answer(ask(QueryKind.MISSING), hungarian, every(hungarian), T)
    assert everything["levels"][0] == list(hungarian.columns)
    for i, column in enumerate(hungarian.columns):
        lacking = int(hungarian[column].isna().sum())
        pair = everything["cells"][2 * i : 2 * i + 2]
        assert pair == ([lacking, 294 - lacking] if min(lacking, 294 - lacking) >= T else [None, None])


def test_stats_match_pandas_at_each_site(heart: dict[str, pd.DataFrame]) -> None:
    for site, table in heart.items():
        for mask in (every(table), (table["age"] > 50).to_numpy()):
            released = answer(ask(QueryKind.STATS, ("age", "chol", "trestbps")), table, mask, T)
            assert released["total"] == int(mask.sum())
            for column, got in released["columns"].items():
                values = table.loc[mask, column].dropna()
                assert got["n"] == len(values) and got["missing"] == int(mask.sum()) - len(values), site
                assert got["mean"] == pytest.approx(values.mean(), rel=1e-12)
                assert got["std"] == pytest.approx(values.std(ddof=1), rel=1e-12, abs=1e-12)
                expected = np.quantile(values.to_numpy(), QUANTILES, method="inverted_cdf")  # values of the column
                assert list(got["quantiles"]) == list(QUANTILE_NAMES)
                for name, level, value in zip(QUANTILE_NAMES, QUANTILES, expected.tolist(), strict=True):
                    if min(level, 1 - level) * len(values) >= T:  # T values or more on either side
                        assert got["quantiles"][name] == pytest.approx(value, rel=1e-12)
                    else:
                        assert got["quantiles"][name] is None, (site, column, name)


def test_sketch_centroids_are_means_of_at_least_threshold_consecutive_values(heart: dict[str, pd.DataFrame]) -> None:
    for table in heart.values():
        for column in ("age", "chol", "trestbps", "oldpeak"):
            values = np.sort(table[column].dropna().to_numpy())
            got = answer(ask(QueryKind.STATS, (column,)), table, every(table), T)["columns"][column]
            sketch = got["sketch"]
            _, held = np.unique(values, return_counts=True)
            if held.size <= FEW_VALUES and held.min() < T:  # a few values, one of them rare: no sketch leaves
                assert sketch is None and (got["mean"] is None) == (held.size <= 3)
                continue
            assert len(sketch) == min(100, len(values) // T)
            weights = [w for _, w in sketch]
            assert sum(weights) == len(values) and min(weights) >= T and max(weights) - min(weights) <= 1
            edges = np.cumsum([0, *weights])
            for (mean, _), lo, hi in zip(sketch, edges[:-1], edges[1:], strict=True):
                assert mean == pytest.approx(values[lo:hi].mean(), rel=1e-12, abs=1e-12)


def test_no_raw_extreme_leaves_in_stats(heart: dict[str, pd.DataFrame]) -> None:
    """Every released number is a quantile (numpy's own, checked above) or a mean of at least T values:
    the smallest value leaves only as part of such a mean, so it equals the minimum only where T or
    more patients share the minimum (the Swiss chol, recorded as 0 for everyone)."""
    checked = 0
    for table in heart.values():
        for mask in (every(table), (table["age"] > 55).to_numpy()):
            released = answer(ask(QueryKind.STATS, ("age", "chol", "trestbps", "thalach")), table, mask, T)
            for column, got in released["columns"].items():
                values = table.loc[mask, column].dropna().to_numpy()
                if got["n"] is None:
                    continue
                averages = [got["mean"], got["std"], *(m for m, _ in got["sketch"] or [])]
                for extreme in (values.min(), values.max()):
                    if (values == extreme).sum() < T:
                        assert extreme not in averages
                        checked += 1
                # the first and last centroids average the T or more smallest and largest values
                if got["sketch"] is not None:
                    assert got["sketch"][0][0] > values.min() or (values == values.min()).sum() >= T
                    assert got["sketch"][-1][0] < values.max() or (values == values.max()).sum() >= T
    assert checked > 40


def test_a_cohort_below_the_threshold_withholds_everything_but_the_levels(heart: dict[str, pd.DataFrame]) -> None:
    swiss = heart["switzerland"]
    old = (swiss["age"] > 70).to_numpy()
    assert 0 < old.sum() < T
    by_cp = answer(ask(QueryKind.COUNT, ("cp",)), swiss, old, T)
    assert by_cp == {
        "dims": ["cp"],
        "levels": [["3", "4", OTHER_LEVEL]],
        "cells": [None] * 3,
        "total": None,
        "noise": 0,
    }
    hist = answer(ask(QueryKind.HIST, ("age",), (60.0, 80.0)), swiss, old, T)
    assert hist["cells"] == [None] * 4 and hist["total"] is None and len(hist["levels"][0]) == 4
    missing = answer(ask(QueryKind.MISSING, ("chol",)), swiss, old, T)
    assert missing["cells"] == [None, None] and missing["total"] is None
    stats = answer(ask(QueryKind.STATS, ("age",)), swiss, old, T)
    assert stats == {
        "columns": {"age": {"n": None, "missing": None, "mean": None, "std": None, "quantiles": None, "sketch": None}},
        "total": None,
        "noise": 0,
    }


def test_a_column_with_too_few_values_withholds_its_statistics(heart: dict[str, pd.DataFrame]) -> None:
    va = heart["va"]
    got = answer(ask(QueryKind.STATS, ("ca", "age")), va, every(va), T)  # ca: 2 values, 198 missing
    assert got["columns"]["ca"] == {
        "n": None,
        "missing": None,  # 200 - 198 would give the 2 back
        "mean": None,
        "std": None,
        "quantiles": None,
        "sketch": None,
    }
    assert got["columns"]["age"]["n"] == 200 and got["total"] == 200


def test_the_project_threshold_raises_the_sites_never_lowers_it(heart: dict[str, pd.DataFrame]) -> None:
    cleveland = heart["cleveland"]
    low = answer(ask(QueryKind.COUNT, ("cp",), threshold=3), cleveland, every(cleveland), T)
    assert low["cells"] == [23, 50, 86, 144]
    high = answer(ask(QueryKind.COUNT, ("cp",), threshold=30), cleveland, every(cleveland), T)
    assert high["levels"] == [["2", "3", "4", OTHER_LEVEL]]  # cp 1: 23 patients, too few to name under 30
    assert high["cells"] == [None, 86, 144, None]  # 23 < 30, and 50 covers it


@pytest.mark.parametrize(
    "request_",
    [
        ask(QueryKind.COUNT, ("sex", "cp")),
        ask(QueryKind.HIST, ("oldpeak",), (0.0, 1.5, 3.0)),
        ask(QueryKind.MISSING),
        ask(QueryKind.STATS, ("age", "oldpeak", "ca")),
    ],
)
def test_answers_survive_a_strict_json_round_trip(heart: dict[str, pd.DataFrame], request_: QueryRequest) -> None:
    for table in heart.values():
        released = answer(request_, table, every(table), T)
        blob = json.dumps(released, allow_nan=False)
        assert json.loads(blob) == released
        for number in _numbers(released):
            assert type(number) in (int, float) and math.isfinite(number)


def _numbers(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, int | float) and not isinstance(value, bool) else []


def test_level_labels_write_whole_numbers_without_a_point_and_sort_numerically() -> None:
    table = pd.DataFrame({"x": [10.0, 2.0, 2.5, 1e-7, np.nan, 2.0] * 5, "word": ["b", "a", "b", "c", None, "a"] * 5})
    released = answer(ask(QueryKind.COUNT, ("x", "word")), table, every(table), 1)
    assert released["levels"] == [["1e-07", "2", "2.5", "10", MISSING_LEVEL], ["a", "b", "c", MISSING_LEVEL]]
    assert released["total"] == 30
    close = pd.DataFrame({"x": [0.1234567] * 12 + [0.1234568] * 15})  # one label each, never merged
    assert answer(ask(QueryKind.COUNT, ("x",)), close, every(close), T) == {
        "dims": ["x"],
        "levels": [["0.1234567", "0.1234568"]],
        "cells": [12, 15],
        "total": 27,
        "noise": 0,
    }


def test_infinite_values_count_as_missing_in_stats_and_as_below_or_above_in_hist() -> None:
    table = pd.DataFrame({"x": [float(i) for i in range(40)] + [np.inf] * 12 + [-np.inf] * 11 + [np.nan] * 10})
    stats = answer(ask(QueryKind.STATS, ("x",)), table, every(table), T)["columns"]["x"]
    assert stats["n"] == 40 and stats["missing"] == 33 and stats["mean"] == 19.5
    hist = answer(ask(QueryKind.HIST, ("x",), (0.0, 20.0, 39.0)), table, every(table), T)
    assert hist["cells"] == [11, 20, 20, 12, 10]
    json.dumps(stats, allow_nan=False)


Refusal = Callable[[dict[str, pd.DataFrame]], Any]


@pytest.mark.parametrize(
    ("attempt", "says"),
    [
        (
            lambda h: answer(ask(QueryKind.COUNT, ("cholesterol",)), h["va"], every(h["va"]), T),
            r"no column 'cholesterol'.*age, sex, cp",
        ),
        (
            lambda h: answer(ask(QueryKind.COUNT, ("chol",)), h["va"], every(h["va"]), T),
            r"'chol' has 99 distinct values.*hist",
        ),
        (
            lambda h: answer(ask(QueryKind.COUNT, ("sex", "cp", "fbs", "num")), h["va"], every(h["va"]), T),
            r"0 to 3 column\(s\), not 4; ask for fewer",
        ),
        (
            lambda h: answer(ask(QueryKind.HIST, ("age", "chol"), (1.0, 2.0)), h["va"], every(h["va"]), T),
            r"exactly 1 column",
        ),
        (
            lambda h: answer(ask(QueryKind.STATS), h["va"], every(h["va"]), T),
            r"1 to 20 column\(s\), not 0; name the column",
        ),
        (lambda h: answer(ask(QueryKind.STATS, ("age", "age")), h["va"], every(h["va"]), T), r"listed twice"),
        (lambda h: answer(ask(QueryKind.STATS, ("age",)), h["va"], np.ones(3, dtype=bool), T), r"200 rows"),
    ],
)
def test_invalid_queries_are_refused_with_a_sentence(
    heart: dict[str, pd.DataFrame], attempt: Refusal, says: str
) -> None:
    with pytest.raises(QueryRefused, match=says) as refused:
        attempt(heart)
    assert len(str(refused.value).split()) >= 6


def test_stats_and_hist_on_a_text_column_are_refused() -> None:
    table = pd.DataFrame({"ward": ["A", "B", "C"] * 10, "age": list(range(30))})
    with pytest.raises(QueryRefused, match=r"column 'ward' is not numeric.*count by it instead"):
        answer(ask(QueryKind.STATS, ("age", "ward")), table, every(table), T)
    with pytest.raises(QueryRefused, match=r"column 'ward' is not numeric"):
        answer(ask(QueryKind.HIST, ("ward",), (0.0, 1.0)), table, every(table), T)
    assert answer(ask(QueryKind.COUNT, ("ward",)), table, every(table), T)["cells"] == [10, 10, 10]


def test_the_mean_of_a_column_of_few_values_says_no_small_count() -> None:
    """A mean of 0/1 values is a count of ones; a mean and std of three known values give each value's count."""
    binary = pd.DataFrame({"smoker": [1] * (T - 1) + [0] * 100})
    got = answer(ask(QueryKind.STATS, ("smoker",)), binary, every(binary), T)["columns"]["smoker"]
    assert got["n"] == 100 + T - 1 and got["mean"] is got["std"] is got["quantiles"] is got["sketch"] is None
    three = pd.DataFrame({"stage": [0] * 100 + [1] * 50 + [2] * 2})
    assert answer(ask(QueryKind.STATS, ("stage",)), three, every(three), T)["columns"]["stage"]["mean"] is None
    common = pd.DataFrame({"stage": [0] * 100 + [1] * 50 + [2] * T})
    assert answer(ask(QueryKind.STATS, ("stage",)), common, every(common), T)["columns"]["stage"]["mean"] == (
        pytest.approx(common.stage.mean())
    )


def test_a_cohort_padded_with_one_known_value_gives_the_other_value_away_and_is_withheld() -> None:
    """Rows of one value (``chol == 200``) and one patient: the mean is that patient's value; so at least T values
    must differ from the most common one, where a column takes many values."""
    padded = pd.DataFrame({"chol": [200.0] * 60 + [347.0] + [float(v) for v in range(150, 170)]})
    only_one = np.arange(len(padded)) <= 60  # the 60 padding rows and the patient
    got = answer(ask(QueryKind.STATS, ("chol",)), padded, only_one, T)["columns"]["chol"]
    assert got["n"] == 61 and got["mean"] is None and got["sketch"] is None
    spread = answer(ask(QueryKind.STATS, ("chol",)), padded, every(padded), T)["columns"]["chol"]
    assert spread["mean"] == pytest.approx(padded.chol.mean())  # 21 values besides the 60: released


@pytest.mark.parametrize("known", [3, 5, 12])
def test_a_cohort_padded_with_several_known_values_and_one_patient_is_withheld(known: int) -> None:
    """Rows of several known values (each counted on its own, T rows or more each) and one patient: n times the
    mean less the known sums is the patient's value. The rows of rare values (under T rows each) must be none or at
    least T; with T - 1 other patients' rare values beside the patient, only their sum would be told."""
    values = [120.0 + 5 * k for k in range(known)]
    padded = pd.DataFrame({"trestbps": [v for v in values for _ in range(T)] + [187.0]})
    got = answer(ask(QueryKind.STATS, ("trestbps",)), padded, every(padded), T)["columns"]["trestbps"]
    assert got["n"] == known * T + 1 and got["mean"] is None and got["sketch"] is None
    crowd = pd.concat([padded, pd.DataFrame({"trestbps": [191.0 + k for k in range(T - 1)]})], ignore_index=True)
    told = answer(ask(QueryKind.STATS, ("trestbps",)), crowd, every(crowd), T)["columns"]["trestbps"]
    assert told["mean"] == pytest.approx(crowd.trestbps.mean())  # T rare values together: released


def test_a_high_quantile_of_a_small_cohort_is_withheld() -> None:
    """p95 of 40 values is the second largest: a quantile leaves only with T values on each side of it."""
    table = pd.DataFrame({"chol": np.arange(40, dtype=float) * 7.5})
    quantiles = answer(ask(QueryKind.STATS, ("chol",)), table, every(table), T)["columns"]["chol"]["quantiles"]
    assert quantiles["p95"] is None and quantiles["p5"] is None
    assert quantiles["p25"] == pytest.approx(np.quantile(table.chol, 0.25, method="inverted_cdf"))


def test_a_sum_dominated_by_its_largest_value_is_withheld_by_the_p_percent_rule() -> None:
    """Values none below zero whose sum is almost all one patient's (days in hospital, a cost): the mean times n
    would say that value to within 10%; with a real spread below it, the mean leaves."""
    dominated = pd.DataFrame({"days": [0.0] * 30 + [0.1 * i for i in range(1, 13)] + [95.0]})
    got = answer(ask(QueryKind.STATS, ("days",)), dominated, every(dominated), T)["columns"]["days"]
    rest = dominated.days.sum() - 95.0 - 1.2
    assert rest < DOMINANCE_P / 100 * 95.0 and got["mean"] is None and got["std"] is None and got["n"] == 43
    spread = pd.DataFrame({"days": [float(i % 17) for i in range(60)] + [95.0]})
    assert answer(ask(QueryKind.STATS, ("days",)), spread, every(spread), T)["columns"]["days"]["mean"] == (
        pytest.approx(spread.days.mean())
    )
    negative = pd.DataFrame({"change": [-50.0] + [0.01 * i for i in range(40)] + [95.0]})  # not a magnitude
    assert answer(ask(QueryKind.STATS, ("change",)), negative, every(negative), T)["columns"]["change"]["mean"]
