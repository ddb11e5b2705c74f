"""Queries answered under differential privacy (site_agent.queries.private): OpenDP's noise on the exact figures,
unbiased, of the scale the epsilon says, fresh each time; the threshold applied to the noisy figures; stats only
over bounds the researcher gives. Checked against pandas on the Cleveland table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flip_core.query import QueryKind, QueryRequest
from site_agent.queries.private import answer_privately, noisy_counts
from site_agent.queries.statistics import QueryRefused

from helpers import heart_tables

T = 10


@pytest.fixture(scope="module")
def cleveland() -> pd.DataFrame:
    return heart_tables(("cleveland",))["cleveland"]


def ask(kind: QueryKind, columns: tuple[str, ...] = (), edges: tuple[float, ...] = ()) -> QueryRequest:
    return QueryRequest("q", "heart", "ana", "heart-disease", kind, columns, edges=edges)


def test_noise_on_counts_is_unbiased_and_of_the_scale_asked() -> None:
    draws = noisy_counts(np.full(4000, 100), scale=2.0)
    assert draws.dtype == np.int64 and abs(draws.mean() - 100) < 0.3
    assert 2.4 < draws.std() < 3.3  # a discrete Laplace of scale 2: std close to 2 * sqrt(2)
    assert (draws != 100).mean() > 0.5


def test_a_count_table_under_dp_is_noisy_fresh_each_time_and_withholds_noisy_small_cells(cleveland) -> None:
    every = np.ones(len(cleveland), bool)
    truth = cleveland.groupby("cp").size().to_numpy()
    answers = [answer_privately(ask(QueryKind.COUNT, ("cp",)), cleveland, every, T, epsilon=1.0) for _ in range(30)]
    assert answers[0]["private"] == {"epsilon": 1.0, "scale": 1.0} and answers[0]["noise"] is None
    cells = np.array([a["cells"] for a in answers], dtype=float)
    assert np.abs(cells.mean(axis=0) - truth).max() < 1.5
    assert len({tuple(a["cells"]) for a in answers}) > 1  # fresh noise: each answer spends the budget again
    old = (cleveland.age > 74).to_numpy()  # 2 patients: their noisy count is under the threshold
    assert answer_privately(ask(QueryKind.COUNT), cleveland, old, T, epsilon=1.0)["cells"] == [None]


def test_a_missing_table_scales_its_noise_by_its_columns(cleveland) -> None:
    released = answer_privately(ask(QueryKind.MISSING, ("ca", "thal", "chol")), cleveland, np.ones(303, bool), T, 2.0)
    assert released["private"]["scale"] == pytest.approx(3 / 2.0)  # a patient is in one cell of each column


def test_stats_under_dp_need_bounds_and_release_no_quantile(cleveland) -> None:
    every = np.ones(len(cleveland), bool)
    with pytest.raises(QueryRefused, match="range"):
        answer_privately(ask(QueryKind.STATS, ("age",)), cleveland, every, T, 1.0)
    released = answer_privately(ask(QueryKind.STATS, ("age", "chol"), (0.0, 600.0)), cleveland, every, T, 200.0)
    for column in ("age", "chol"):
        got = released["columns"][column]
        assert got["mean"] == pytest.approx(cleveland[column].mean(), rel=0.02)
        assert got["quantiles"] is None and got["sketch"] is None and got["missing"] is None
    assert released["private"]["bounds"] == [0.0, 600.0]
    clamped = answer_privately(ask(QueryKind.STATS, ("chol",), (0.0, 100.0)), cleveland, every, T, 200.0)
    assert clamped["columns"]["chol"]["mean"] <= 100.0  # every value clamped to the bounds given


def test_a_hist_under_dp_keeps_its_public_edges(cleveland) -> None:
    released = answer_privately(ask(QueryKind.HIST, ("age",), (30.0, 50.0, 70.0)), cleveland, np.ones(303, bool), T, 1)
    assert released["edges"] == [30.0, 50.0, 70.0] and len(released["cells"]) == 5
