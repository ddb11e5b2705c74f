"""Pooling the sites' released answers (coordinator.pooling), checked against pandas on the four real UCI tables."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from coordinator.pooling import PoolingError, pool
from flip_core.query import MISSING_LEVEL, OTHER_LEVEL, QUANTILE_NAMES, QUANTILES, QueryKind, QueryRequest
from site_agent.queries.statistics import answer

from helpers import heart_tables

SITES = ("cleveland", "hungarian", "switzerland", "va")
T = 10
Cohort = Callable[[pd.DataFrame], np.ndarray]


@pytest.fixture(scope="module")
def heart() -> dict[str, pd.DataFrame]:
    return heart_tables(SITES)


def everyone(table: pd.DataFrame) -> np.ndarray:
    return np.ones(len(table), dtype=bool)


def over_50(table: pd.DataFrame) -> np.ndarray:
    return (table["age"] > 50).to_numpy()


def ask(kind: QueryKind, columns: tuple[str, ...] = (), edges: tuple[float, ...] = ()) -> QueryRequest:
    return QueryRequest("q1", "proj", "ana", "heart", kind, columns, edges=edges)


def federate(
    heart: dict[str, pd.DataFrame], request: QueryRequest, sites: tuple[str, ...] = SITES, cohort: Cohort = everyone
) -> tuple[dict[str, dict], dict]:
    """Each site's released table and the pooled one."""
    released = {site: answer(request, heart[site], cohort(heart[site]), T) for site in sites}
    return released, pool(request.kind, released)


def pooled_truth(heart: dict[str, pd.DataFrame], sites: tuple[str, ...], cohort: Cohort) -> pd.DataFrame:
    """The cohort of every site in one pandas table: what a pooled analysis in one place would see."""
    return pd.concat([heart[site][cohort(heart[site])] for site in sites], ignore_index=True)


def count_at(
    frame: pd.DataFrame, dims: list[str], combo: tuple[str, ...], listed: list[list[str]] | None = None
) -> int:
    """pandas' count of ``combo``; ``OTHER_LEVEL`` is the rows of no other level ``listed`` (a site's own levels)."""
    match = pd.Series(True, index=frame.index)
    for d, (column, label) in enumerate(zip(dims, combo, strict=True)):
        if label == OTHER_LEVEL:
            named = pd.Series(False, index=frame.index)
            for other in (listed or [])[d] if listed else []:
                if other != OTHER_LEVEL:
                    named |= frame[column].isna() if other == MISSING_LEVEL else frame[column] == float(other)
            match &= ~named
        else:
            match &= frame[column].isna() if label == MISSING_LEVEL else frame[column] == float(label)
    return int(match.sum())


def assert_pooled_counts(pooled: dict, frames: dict[str, pd.DataFrame], released: dict[str, dict]) -> int:
    """Every released pooled cell is the sum of pandas' counts at the sites (each site's other, its own); every
    withheld one was withheld by a site that lists it, or that counts values it does not name as other."""
    shown = 0
    for i, combo in enumerate(itertools.product(*pooled["levels"])):
        cell, who = pooled["cells"][i], pooled["withheld_by"][i]
        if cell is None:
            assert who, f"cell {combo} withheld by nobody"
            for site in who:
                site_index = _site_index(released[site], combo)
                unnamed = any(OTHER_LEVEL in levels for levels in released[site]["levels"])
                assert (site_index is None and unnamed) or released[site]["cells"][site_index] is None
        else:
            truth = sum(
                count_at(frames[site], pooled["dims"], combo, released[site]["levels"])
                for site in released
                if _site_index(released[site], combo) is not None
            )
            assert who == [] and cell == truth
            shown += 1
    return shown


def _site_index(table: dict, combo: tuple[str, ...]) -> int | None:
    if any(label not in levels for label, levels in zip(combo, table["levels"], strict=True)):
        return None
    shape = tuple(len(levels) for levels in table["levels"])
    where = tuple(levels.index(label) for label, levels in zip(combo, table["levels"], strict=True))
    return int(np.ravel_multi_index(where, shape)) if shape else 0


def cohorts(heart: dict[str, pd.DataFrame], sites: tuple[str, ...], cohort: Cohort) -> dict[str, pd.DataFrame]:
    return {site: heart[site][cohort(heart[site])] for site in sites}


@pytest.mark.parametrize(
    ("columns", "sites", "at_least"),
    [
        (("sex",), ("cleveland", "hungarian", "switzerland"), 2),
        (("cp",), SITES, 1),
        (("num",), SITES, 3),
        (("sex", "cp"), ("cleveland", "hungarian"), 2),
        (("slope", "num"), ("cleveland", "hungarian", "va"), 4),
        (("exang", "num"), ("cleveland", "hungarian", "va"), 3),
        (("ca",), SITES, 0),
        (("thal",), ("cleveland", "hungarian"), 1),
    ],
)
@pytest.mark.parametrize("cohort", [everyone, over_50])
def test_pooled_counts_equal_pandas_wherever_no_site_withheld_them(
    heart: dict[str, pd.DataFrame], columns: tuple[str, ...], sites: tuple[str, ...], at_least: int, cohort: Cohort
) -> None:
    released, pooled = federate(heart, ask(QueryKind.COUNT, columns), sites, cohort)
    frame = pooled_truth(heart, sites, cohort)
    shown = assert_pooled_counts(pooled, cohorts(heart, sites, cohort), released)
    if cohort is everyone:
        assert shown >= at_least  # the check is not vacuous
    assert pooled["total"] == len(frame)
    assert pooled["sites"] == list(sites)
    assert json.loads(json.dumps(pooled, allow_nan=False)) == pooled


def test_a_site_that_lacks_a_level_adds_a_true_zero_there_unless_it_names_not_all_it_holds(
    heart: dict[str, pd.DataFrame],
) -> None:
    released, pooled = federate(heart, ask(QueryKind.COUNT, ("cp",)), ("cleveland", "hungarian"))
    assert released["hungarian"]["levels"] == [["1", "2", "3", "4"]] == released["cleveland"]["levels"]
    released, pooled = federate(heart, ask(QueryKind.COUNT, ("num",)), ("cleveland", "hungarian"))
    assert released["hungarian"]["levels"] == [["0", "1"]]  # no patient there has num 2, 3 or 4
    assert pooled["cells"][2:5] == [36, 35, 13]  # Cleveland's own: Hungary adds 0, not a withheld cell
    # Hungary's ca: 3 patients have a value (0), too few to name; the rest lack one. Its other may hold any value
    # it does not list, so the pooled cells of those are withheld by it (a 0 there could be 3 patients short)
    released, pooled = federate(heart, ask(QueryKind.COUNT, ("ca",)), ("cleveland", "hungarian"))
    assert released["hungarian"]["levels"] == [[OTHER_LEVEL, MISSING_LEVEL]]
    assert pooled["levels"] == [["0", "1", "2", "3", OTHER_LEVEL, MISSING_LEVEL]]
    assert all("hungarian" in who for who in pooled["withheld_by"][:4])


def test_crosstab_pools_like_count_by_two_columns(heart: dict[str, pd.DataFrame]) -> None:
    sites = ("cleveland", "va")
    released, pooled = federate(heart, ask(QueryKind.CROSSTAB, ("exang", "num")), sites)
    assert pooled == federate(heart, ask(QueryKind.COUNT, ("exang", "num")), sites)[1]
    assert assert_pooled_counts(pooled, cohorts(heart, sites, everyone), released) == 4


def test_a_pooled_cell_is_withheld_when_one_site_withheld_its_own(heart: dict[str, pd.DataFrame]) -> None:
    released, pooled = federate(heart, ask(QueryKind.COUNT, ("cp",)))
    levels = pooled["levels"][0]
    frame = pooled_truth(heart, SITES, everyone)
    # Switzerland's cp 1 and 2 (4 + 4 patients) are too few to name: its other; its cp 3 (17) covers them
    assert released["switzerland"]["levels"] == [["3", "4", OTHER_LEVEL]]
    assert released["switzerland"]["cells"] == [None, 98, None]
    three = levels.index("3")
    assert pooled["cells"][three] is None and "switzerland" in pooled["withheld_by"][three]
    # had it been released, the pooled count less the others' cells would give Switzerland's back
    others = sum(int((heart[s].cp == 3).sum()) for s in ("cleveland", "hungarian", "va"))
    assert count_at(frame, ["cp"], ("3",)) - others == 17  # which, with its total 123 and its 98, gives its 8
    # and the pooled cells of the values it does not name are withheld by it: its other may hold them
    assert "switzerland" in pooled["withheld_by"][levels.index("1")]  # (and VA, whose 7 of cp 1 are too few)
    assert "switzerland" in pooled["withheld_by"][levels.index("2")]
    assert pooled["cells"][levels.index("4")] == count_at(frame, ["cp"], ("4",))


def test_hist_pools_over_the_shared_edges(heart: dict[str, pd.DataFrame]) -> None:
    edges = (30.0, 40.0, 50.0, 60.0, 70.0)
    for cohort in (everyone, over_50):
        released, pooled = federate(heart, ask(QueryKind.HIST, ("age",), edges), SITES, cohort)
        assert pooled["levels"] == released["cleveland"]["levels"]  # the sites' order, not sorted
        assert pooled["edges"] == list(edges)
        frame = pooled_truth(heart, SITES, cohort)["age"]
        truth = [
            int((frame < 30).sum()),
            *(int(((frame >= lo) & (frame < hi)).sum()) for lo, hi in zip(edges[:-2], edges[1:-1], strict=True)),
            int(((frame >= 60) & (frame <= 70)).sum()),
            int((frame > 70).sum()),
            int(frame.isna().sum()),
        ]
        assert [c for c in pooled["cells"] if c is not None]  # something is released
        for cell, count in zip(pooled["cells"], truth, strict=True):
            assert cell is None or cell == count
        assert pooled["total"] == len(frame)


def test_missing_tables_pool_per_column(heart: dict[str, pd.DataFrame]) -> None:
    sites = ("hungarian", "switzerland", "va")
    columns = ("slope", "thal", "age")
    released, pooled = federate(heart, ask(QueryKind.MISSING, columns), sites)
    assert pooled["levels"] == [list(columns), ["missing", "present"]]
    frame = pooled_truth(heart, sites, everyone)
    slope_missing = int(frame["slope"].isna().sum())
    assert pooled["cells"][:2] == [slope_missing, len(frame) - slope_missing]  # 190 + 17 + 102
    assert pooled["cells"][4:] == [None, None]  # nobody lacks an age: a zero, withheld at every site
    assert pooled["withheld_by"][4] == list(sites)
    for i, column in enumerate(columns):
        lacking = int(frame[column].isna().sum())
        assert pooled["cells"][2 * i] in (None, lacking)
        assert pooled["cells"][2 * i + 1] in (None, len(frame) - lacking)


@pytest.mark.parametrize("cohort", [everyone, over_50])
def test_pooled_n_mean_and_std_are_exact(heart: dict[str, pd.DataFrame], cohort: Cohort) -> None:
    columns = ("age", "chol", "trestbps")
    _, pooled = federate(heart, ask(QueryKind.STATS, columns), SITES, cohort)
    frame = pooled_truth(heart, SITES, cohort)
    assert pooled["total"] == len(frame)
    for column in columns:
        got, values = pooled["columns"][column], frame[column].dropna()
        assert got["n"] == len(values) and got["missing"] == len(frame) - len(values)
        assert got["mean"] == pytest.approx(values.mean(), rel=1e-9)
        assert got["std"] == pytest.approx(values.std(ddof=1), rel=1e-9)
        assert got["withheld_by"] == {}


def test_pooled_quantiles_come_from_the_sketches_and_are_marked_approximate(heart: dict[str, pd.DataFrame]) -> None:
    columns = ("age", "chol", "trestbps", "thalach")
    _, pooled = federate(heart, ask(QueryKind.STATS, columns))
    frame = pooled_truth(heart, SITES, everyone)
    for column in columns:
        got = pooled["columns"][column]
        assert got["approximate"] == ["quantiles"]
        assert list(got["quantiles"]) == list(QUANTILE_NAMES)
        values = frame[column].dropna().to_numpy()
        spread = np.quantile(values, 0.95) - np.quantile(values, 0.05)
        for q, name in zip(QUANTILES, QUANTILE_NAMES, strict=True):
            truth = np.quantile(values, q)
            # within 5% of the value (or of the 5-95% spread where the value is 0: the Swiss chol)
            assert abs(got["quantiles"][name] - truth) <= 0.05 * (abs(truth) or spread), (column, name)
        weights = [w for _, w in got["sketch"]]
        assert sum(weights) == len(values)
        assert [m for m, _ in got["sketch"]] == sorted(m for m, _ in got["sketch"])


def test_stats_withheld_at_one_site_are_withheld_in_the_pool(heart: dict[str, pd.DataFrame]) -> None:
    def over_65(table: pd.DataFrame) -> np.ndarray:
        return (table["age"] > 65).to_numpy()

    released, pooled = federate(heart, ask(QueryKind.STATS, ("age", "chol")), SITES, over_65)
    assert released["hungarian"]["total"] is None  # one patient over 65 there
    assert pooled["total"] is None
    for column in ("age", "chol"):
        got = pooled["columns"][column]
        assert got["n"] is None and got["mean"] is None and got["std"] is None
        assert got["quantiles"] is None and got["sketch"] is None
        assert got["withheld_by"]["n"] == ["hungarian"]
    # without Hungary the rest pools
    _, rest = federate(heart, ask(QueryKind.STATS, ("age",)), ("cleveland", "switzerland", "va"), over_65)
    frame = pooled_truth(heart, ("cleveland", "switzerland", "va"), over_65)
    assert rest["columns"]["age"]["mean"] == pytest.approx(frame["age"].mean(), rel=1e-9)
    assert rest["total"] == len(frame)


def test_chan_combination_is_exact_on_hand_made_sites() -> None:
    parts = {"a": [1.0, 2.0, 3.0, 4.0], "b": [10.0, 12.0], "c": [-5.0, 0.5, 7.25]}
    tables = {
        site: {
            "columns": {
                "x": {
                    "n": len(v),
                    "missing": 0,
                    "mean": float(np.mean(v)),
                    "std": float(np.std(v, ddof=1)),
                    "quantiles": dict.fromkeys(QUANTILE_NAMES, 0.0),
                    "sketch": [[float(np.mean(v)), len(v)]],
                }
            },
            "total": len(v),
        }
        for site, v in parts.items()
    }
    got = pool(QueryKind.STATS, tables)["columns"]["x"]
    everything = np.concatenate(list(parts.values()))
    assert got["n"] == 9 and got["missing"] == 0
    assert got["mean"] == pytest.approx(everything.mean(), rel=1e-12)
    assert got["std"] == pytest.approx(everything.std(ddof=1), rel=1e-12)
    tables["b"]["columns"]["x"]["std"] = None
    assert pool(QueryKind.STATS, tables)["columns"]["x"]["std"] is None


def test_pooled_levels_sort_numbers_numerically_then_text_then_missing() -> None:
    one = {"dims": ["x"], "levels": [["2", "10", MISSING_LEVEL]], "cells": [5, 6, 7], "total": 18}
    two = {"dims": ["x"], "levels": [["1e-07", "9", "b", "a"]], "cells": [1, 2, 3, 4], "total": 10}
    pooled = pool(QueryKind.COUNT, {"one": one, "two": two})
    assert pooled["levels"] == [["1e-07", "2", "9", "10", "a", "b", MISSING_LEVEL]]
    assert pooled["cells"] == [1, 5, 2, 6, 4, 3, 7]
    assert pooled["total"] == 28
    two["total"] = None
    assert pool(QueryKind.COUNT, {"one": one, "two": two})["total"] is None


def test_answers_that_cannot_be_pooled_are_refused_with_a_sentence() -> None:
    with pytest.raises(PoolingError, match="no site released an answer"):
        pool(QueryKind.COUNT, {})
    one = {"dims": ["sex"], "levels": [["0", "1"]], "cells": [5, 6], "total": 11}
    other = {"dims": ["cp"], "levels": [["1"]], "cells": [11], "total": 11}
    with pytest.raises(PoolingError, match="different dims"):
        pool(QueryKind.COUNT, {"a": one, "b": other})
    broken = {"dims": ["sex"], "levels": [["0", "1"]], "cells": [5], "total": 5}
    with pytest.raises(PoolingError, match="site b sent a count table whose cells do not match its levels"):
        pool(QueryKind.COUNT, {"a": one, "b": broken})
    hist = {"dims": ["age"], "levels": [["x"]], "cells": [1], "total": 1, "edges": [1.0, 2.0]}
    with pytest.raises(PoolingError, match="different edges"):
        pool(QueryKind.HIST, {"a": hist, "b": {**hist, "edges": [1.0, 3.0]}})


def test_a_pooled_count_says_the_most_it_may_be_off_the_sum_of_its_sites_noise() -> None:
    levels = [["1", "2", "3"]]
    tables = {
        "alpha": {"dims": ["cp"], "levels": levels, "cells": [40, None, 25], "total": 80, "noise": 2},
        "beta": {"dims": ["cp"], "levels": [["1", "3"]], "cells": [30, 18], "total": 48, "noise": 3},
        "gamma": {"dims": ["cp"], "levels": levels, "cells": [11, 12, 13], "total": 36},  # before noise existed
    }
    pooled = pool(QueryKind.COUNT, tables)
    assert pooled["cells"] == [81, None, 56]
    assert pooled["noise"] == [5, 0, 5]  # beta lists no cp=2: it adds an exact 0 there
    assert pooled["total"] == 164 and pooled["total_noise"] == 5


def test_pooled_moments_of_perturbed_sites_are_marked_approximate(heart: dict[str, pd.DataFrame]) -> None:
    released, pooled = federate(heart, ask(QueryKind.STATS, ("age",)))
    assert pooled["columns"]["age"]["approximate"] == ["quantiles"] and pooled["columns"]["age"]["noise"]["n"] == 0
    moved = {site: {**table, "noise": 2} for site, table in released.items()}
    column = pool(QueryKind.STATS, moved)["columns"]["age"]
    assert column["approximate"] == ["mean", "std", "quantiles"] and column["noise"] == {"n": 8, "missing": 8}
