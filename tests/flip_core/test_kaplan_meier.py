"""Kaplan-Meier curves and the log-rank test across sites (issue 29): each site's counts per bin
(``site_agent.queries.survival.km_counts``), pooled on the edges every site kept (``flip_core.kaplan_meier``), equal
lifelines' ``KaplanMeierFitter`` and ``multivariate_logrank_test`` on the pooled rows' binned times, on real trials
bundled with lifelines split into sites: ACTG 175 (HIV, 2139 patients, four arms), Rossi's recidivism study (432),
the German breast cancer study (686)."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd
import pytest
from lifelines import KaplanMeierFitter
from lifelines.datasets import load_gbsg2, load_rossi
from lifelines.statistics import multivariate_logrank_test
from scipy import stats

from flip_core.kaplan_meier import ONE_CURVE, CountsInvalid, Pooled, chi2_sf, curve, logrank, pool
from flip_core.survival import bin_index, binned_times
from site_agent.queries.survival import km_counts

pytestmark = pytest.mark.filterwarnings("ignore:Starting with pandas version 4.0")  # lifelines' own calls

YEARLY = [360, 720, 1080, 1260]  # ACTG 175's days: follow-up ends by day 1231


def actg175() -> pd.DataFrame:
    """ACTG 175 (Hammer et al. 1996): ``days`` to the event or censoring, ``cens`` 1 where the event was observed,
    ``treat`` 0 for zidovudine alone, ``arms`` the four regimens."""
    return pd.read_csv(resources.files("lifelines") / "datasets" / "ACTG175.csv")


DATA = {
    "actg175": (actg175, "days", "cens"),
    "rossi": (load_rossi, "week", "arrest"),
    "gbsg2": (load_gbsg2, "time", "cens"),
}


def sites(table: pd.DataFrame, count: int) -> list[pd.DataFrame]:
    """The table's rows in ``count`` consecutive parts: the hospitals."""
    n = len(table)
    return [table.iloc[s * n // count : (s + 1) * n // count] for s in range(count)]


def replies(name: str, count: int, group: str | None, edges: list[float], threshold: int) -> tuple[list, pd.DataFrame]:
    load, time, event = DATA[name]
    table = load()
    levels = None if group is None else sorted(table[group].astype(str).unique())
    answers = [
        km_counts(
            part[time].to_numpy(),
            part[event].to_numpy(),
            None if group is None else part[group].astype(str).to_numpy(),
            edges,
            threshold,
            levels,
        )
        for part in sites(table, count)
    ]
    return answers, table


def reference(table: pd.DataFrame, name: str, group: str | None, edges: np.ndarray) -> dict[str, KaplanMeierFitter]:
    """lifelines on the pooled rows' times binned to ``edges``, per group, reported at the edges."""
    _, time, event = DATA[name]
    t, e = binned_times(table[time].to_numpy(), table[event].to_numpy(), edges)
    labels = np.full(len(table), ONE_CURVE) if group is None else table[group].astype(str).to_numpy()
    return {
        level: KaplanMeierFitter().fit(t[labels == level], e[labels == level], timeline=edges)
        for level in np.unique(labels)
    }


def assert_curves_match(pooled: Pooled, table: pd.DataFrame, name: str, group: str | None) -> None:
    curves = curve(pooled)
    fitted = reference(table, name, group, pooled.edges)
    assert sorted(curves) == sorted(fitted)
    for level, kmf in fitted.items():
        mine = curves[level]
        np.testing.assert_allclose(mine.survival, kmf.survival_function_.to_numpy()[:, 0], rtol=0, atol=1e-9)
        band = kmf.confidence_interval_.to_numpy()
        np.testing.assert_allclose(mine.lower, band[:, 0], rtol=0, atol=1e-9)
        np.testing.assert_allclose(mine.upper, band[:, 1], rtol=0, atol=1e-9)
        np.testing.assert_allclose(mine.greenwood, kmf._cumulative_sq_.to_numpy(), rtol=1e-9, atol=1e-15)
        table_times = kmf.event_table.index.to_numpy()
        at = np.isin(pooled.edges, table_times)
        assert at.sum() >= len(pooled.edges) - 1  # every edge holds rows but perhaps one
        np.testing.assert_array_equal(mine.at_risk[at], kmf.event_table.loc[pooled.edges[at], "at_risk"].to_numpy())
        np.testing.assert_array_equal(mine.events[at], kmf.event_table.loc[pooled.edges[at], "observed"].to_numpy())
        assert (mine.survival[1:] <= mine.survival[:-1]).all()
        assert ((mine.lower <= mine.survival) & (mine.survival <= mine.upper)).all()


@pytest.mark.parametrize(
    ("name", "count", "group", "edges", "threshold"),
    [
        ("actg175", 4, None, YEARLY, 10),
        ("actg175", 2, "treat", YEARLY, 10),
        ("rossi", 2, None, [13, 26, 39, 52], 5),
    ],
)
def test_curves_from_sites_counts_are_lifelines_on_the_pooled_binned_times(
    name, count, group, edges, threshold
) -> None:
    """Sites that merged nothing: the pooled curve at the researcher's edges, its band and numbers at risk."""
    answers, table = replies(name, count, group, edges, threshold)
    assert all(a["dropped"] == [] and a["edges"] == [float(e) for e in edges] for a in answers)
    pooled = pool(answers)
    np.testing.assert_array_equal(pooled.edges, edges)
    assert pooled.sites == count and int(pooled.rows.sum()) == len(table)
    assert_curves_match(pooled, table, name, group)


def test_a_site_merging_a_single_event_pools_onto_the_edges_every_site_kept() -> None:
    """ACTG 175 at four hospitals, by zidovudine alone or not, threshold 5: the first hospital's patients on
    zidovudine alone have one event by day 60, so it merges [0, 60] into (60, 360]; two others drop day 360. The
    pooled curve is on the edges all four kept, and equals lifelines on the rows' times binned to them."""
    edges, threshold = [60, 360, 720, 1080, 1260], 5
    answers, table = replies("actg175", 4, "treat", edges, threshold)
    first = sites(table, 4)[0]
    alone = (first["treat"] == 0).to_numpy()
    k, e = bin_index(first["days"].to_numpy()[alone], first["cens"].to_numpy()[alone], edges)
    assert np.bincount(k[e], minlength=len(edges))[0] == 1  # the single event, at the site
    assert answers[0]["dropped"] == [60.0]
    assert answers[0]["notes"] == ["merged [0, 60] into (60, 360]: fewer than 5 events or censorings there"]
    for answer in answers:
        for counts in answer["groups"].values():
            released = np.asarray(counts["events"] + counts["censored"])
            assert not ((released > 0) & (released < threshold)).any()
    assert [a["edges"] for a in answers][3] == [float(e) for e in edges]  # the fourth kept every edge
    pooled = pool(answers)
    np.testing.assert_array_equal(pooled.edges, [720, 1080, 1260])
    assert_curves_match(pooled, table, "actg175", "treat")
    # and it is not the curve on the researcher's edges at day 720: the censored rows before it count as at risk
    fine = reference(table, "actg175", "treat", np.asarray(edges, dtype=np.float64))
    assert abs(curve(pooled)["0"].survival[0] - fine["0"].survival_function_.to_numpy()[2, 0]) > 1e-4


@pytest.mark.parametrize(
    ("name", "count", "group", "edges", "threshold", "merged"),
    [
        ("actg175", 2, "treat", YEARLY, 10, False),
        ("actg175", 3, "arms", YEARLY, 5, True),
        ("actg175", 4, "treat", [60, 360, 720, 1080, 1260], 5, True),
        ("rossi", 3, "fin", [13, 26, 39, 52], 5, True),
        ("gbsg2", 2, "horTh", [365 * y for y in range(1, 9)], 5, True),
        ("gbsg2", 3, "tgrade", [365 * y for y in range(1, 9)], 5, True),
    ],
)
def test_the_log_rank_test_from_sites_counts_is_lifelines_on_the_pooled_binned_times(
    name, count, group, edges, threshold, merged
) -> None:
    answers, table = replies(name, count, group, edges, threshold)
    assert any(a["dropped"] for a in answers) == merged
    pooled = pool(answers)
    result = logrank(pooled)
    _, time, event = DATA[name]
    t, e = binned_times(table[time].to_numpy(), table[event].to_numpy(), pooled.edges)
    expected = multivariate_logrank_test(t, table[group].astype(str).to_numpy(), e)
    assert result.df == expected.degrees_of_freedom == len(pooled.levels) - 1
    assert result.statistic == pytest.approx(expected.test_statistic, rel=1e-9)
    assert result.p_value == pytest.approx(expected.p_value, rel=1e-9)
    np.testing.assert_allclose(result.observed.sum(), result.expected.sum(), rtol=1e-12)
    assert result.observed.sum() == e.sum()  # the events by the last edge


def test_a_curve_down_to_zero_has_lifelines_band_there() -> None:
    """A group in which everyone has the event: S(t) reaches 0, and its band is lifelines' (0, 0) there; before
    any event both bounds are 1."""
    pooled = pool(
        [
            {
                "edges": [1.0, 2.0, 3.0, 4.0],
                "groups": {"a": {"n": 12, "events": [0, 5, 7, 0], "censored": [0, 0, 0, 0]}},
            },
            {"edges": [2.0, 4.0], "groups": {"a": {"n": 10, "events": [5, 5], "censored": [0, 0]}}},
        ]
    )
    times = np.repeat([2.0, 4.0, 4.0, 2.0], [5, 7, 5, 5])
    kmf = KaplanMeierFitter().fit(times, np.ones_like(times), timeline=pooled.edges)
    mine = curve(pooled)["a"]
    np.testing.assert_array_equal(pooled.edges, [2.0, 4.0])
    np.testing.assert_allclose(mine.survival, kmf.survival_function_.to_numpy()[:, 0], atol=1e-12)
    np.testing.assert_allclose(mine.lower, kmf.confidence_interval_.to_numpy()[:, 0], atol=1e-12)
    np.testing.assert_allclose(mine.upper, kmf.confidence_interval_.to_numpy()[:, 1], atol=1e-12)
    assert mine.survival[-1] == 0.0 and mine.lower[-1] == mine.upper[-1] == 0.0
    early = curve(pool([{"edges": [1.0, 2.0], "groups": {"a": {"n": 3, "events": [0, 3], "censored": [0, 0]}}}]))
    assert early["a"].lower[0] == early["a"].upper[0] == early["a"].survival[0] == 1.0


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 12])
def test_the_chi_square_tail_is_scipys(df: int) -> None:
    for x in [0.0, 1e-6, 0.3, 1.0, 2.5, df, 10.0, 37.2, 120.0, 700.0]:
        assert chi2_sf(x, df) == pytest.approx(stats.chi2.sf(x, df), rel=1e-12, abs=1e-300)
    with pytest.raises(ValueError, match="whole number"):
        chi2_sf(1.0, 0)


def test_counts_that_do_not_pool_are_refused_in_a_sentence() -> None:
    one = {"edges": [10.0, 20.0], "groups": {"a": {"n": 20, "events": [5, 5], "censored": [0, 10]}}}
    for others, words in [
        ([{"edges": [10.0, 20.0], "groups": {"b": one["groups"]["a"]}}], "different groups"),
        ([{"edges": [10.0, 30.0], "groups": one["groups"]}], "end at different edges"),
        ([{"edges": [10.0, 20.0], "groups": {"a": {"n": 21, "events": [5, 5], "censored": [0, 10]}}}], "add up"),
        ([{"edges": [20.0, 10.0], "groups": {"a": {"n": 20, "events": [5, 5], "censored": [0, 10]}}}], "increasing"),
        ([{"edges": [10.0, 20.0], "groups": {"a": {"n": 20, "events": [5]}}}], "malformed"),
        ([{"edges": [10.0, 20.0], "groups": {"a": {"n": 20, "events": [5], "censored": [15]}}}], "one count per"),
    ]:
        with pytest.raises(CountsInvalid, match=words):
            pool([one, *others])
    with pytest.raises(CountsInvalid, match="no site"):
        pool([])
    with pytest.raises(CountsInvalid, match="at least two groups"):
        logrank(pool([one]))
