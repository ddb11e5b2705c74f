"""Cell-key perturbation: every released count moves by at most the site's noise, the same rows always by the same
amount (in another query, project or session), other rows independently; magnitudes move with them so that they
give no exact count back; and a column's magnitudes over nearly the same rows as before are withheld.

Real ledgers in temporary site folders, the heart tables read with pandas as the truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flip_core.query import QueryKind, QueryRequest
from site_agent.queries.ledger import QueryLedger, Scope
from site_agent.queries.perturbation import cell_key, move, perturbed
from site_agent.queries.statistics import answer

from helpers import heart_tables

T, D = 10, 2
SCOPE = Scope("heart", "ana", "heart-disease")


@pytest.fixture(scope="module")
def cleveland() -> pd.DataFrame:
    return heart_tables(("cleveland",))["cleveland"]


def ask(kind: QueryKind, columns: tuple[str, ...] = (), project: str = "heart") -> QueryRequest:
    return QueryRequest("q", project, "ana", "heart-disease", kind, columns)


def asked(ledger: QueryLedger, table: pd.DataFrame, request: QueryRequest, rows: np.ndarray, noise: int = D) -> dict:
    """One query through the ledger, as the site's query service asks it; what leaves is entered."""
    scope = Scope(request.project, request.researcher, request.dataset)
    pending = ledger.pending(scope, ledger.keys(table), T, noise)
    released = answer(request, table, rows, T, pending)
    pending.commit()
    return released


def test_a_move_is_uniform_over_minus_noise_to_noise_and_nothing_at_zero() -> None:
    keys = np.random.default_rng(1).integers(0, 2**63, 20000, dtype=np.uint64).tolist()
    moves = np.array([move(2 * k + 1, D) for k in keys])
    assert set(moves.tolist()) == {-2, -1, 0, 1, 2}
    assert np.bincount(moves + D).min() > 20000 / 5 * 0.9  # each about a fifth
    assert abs(moves.mean()) < 0.05
    assert {move(k, 0) for k in keys[:100]} == {0}


@pytest.mark.parametrize("count", [10, 11, 12, 50, 1000])
def test_a_released_count_is_within_the_noise_and_never_under_the_threshold(count: int) -> None:
    for key in np.random.default_rng(count).integers(0, 2**63, 500, dtype=np.uint64).tolist():
        released = perturbed(count, 2 * key, D, T)
        assert abs(released - count) <= D and released >= T


def test_cell_keys_depend_on_the_site_key_and_on_what_is_moved() -> None:
    assert cell_key("abc", b"k" * 32) == cell_key("abc", b"k" * 32)
    assert cell_key("abc", b"k" * 32) != cell_key("abc", b"j" * 32)
    assert cell_key("abc", b"k" * 32) != cell_key("abc", b"k" * 32, "mean")


def test_counts_move_within_the_noise_the_same_rows_always_the_same(tmp_path: Path, cleveland: pd.DataFrame) -> None:
    ledger = QueryLedger(tmp_path)
    every = np.ones(len(cleveland), dtype=bool)
    first = asked(ledger, cleveland, ask(QueryKind.COUNT, ("cp",)), every)
    truth = cleveland.groupby("cp").size().tolist()
    assert first["noise"] == D
    assert all(abs(got - want) <= D for got, want in zip(first["cells"], truth, strict=True))
    assert abs(first["total"] - len(cleveland)) <= D
    # asked again, in another project, and at a site restarted (the ledger read again): the same counts
    again = asked(ledger, cleveland, ask(QueryKind.COUNT, ("cp",), project="second"), every)
    restarted = asked(QueryLedger(tmp_path), cleveland, ask(QueryKind.COUNT, ("cp",)), every)
    assert again["cells"] == first["cells"] == restarted["cells"]
    # the rows of cp=4 counted through a filter: the same rows, the same count
    cp4 = (cleveland.cp == 4).to_numpy()
    assert asked(ledger, cleveland, ask(QueryKind.COUNT), cp4)["total"] == first["cells"][3]
    # over many different sets, the moves take every value from -D to D: they are not all zero
    moves = set()
    for age in range(40, 70):
        rows = (cleveland.age >= age).to_numpy()
        (tmp_path / str(age)).mkdir()  # a site of its own each time: no set is near another one's
        moves.add(asked(QueryLedger(tmp_path / str(age)), cleveland, ask(QueryKind.COUNT), rows)["total"] - rows.sum())
    assert moves == {-2, -1, 0, 1, 2}


def test_a_site_with_no_noise_releases_exact_counts(tmp_path: Path, cleveland: pd.DataFrame) -> None:
    released = asked(QueryLedger(tmp_path), cleveland, ask(QueryKind.COUNT, ("cp",)), np.ones(303, bool), noise=0)
    assert released["cells"] == cleveland.groupby("cp").size().tolist() and released["noise"] == 0


def test_stats_move_n_a_little_of_the_magnitudes_and_give_no_exact_count_back(
    tmp_path: Path, cleveland: pd.DataFrame
) -> None:
    rows = (cleveland.age > 45).to_numpy()
    stats = asked(QueryLedger(tmp_path), cleveland, ask(QueryKind.STATS, ("age", "chol", "ca")), rows)
    for name in ("age", "chol"):
        values = cleveland.loc[rows, name].dropna()
        got = stats["columns"][name]
        n = len(values)
        assert abs(got["n"] - n) <= D
        assert abs(got["mean"] - values.mean()) <= values.std() / n
        assert abs(got["std"] - values.std()) <= values.std() / n
        assert got["mean"] != values.mean()  # moved (a jitter of exactly 0 has probability 2**-64)
        # the values are whole numbers: an exact mean times the right count would be one, and no other count near
        # the released one would; moved, no count within D of the released one makes a whole sum
        sums = [c * got["mean"] for c in range(got["n"] - D, got["n"] + D + 1)]
        assert not any(abs(s - round(s)) < 1e-6 for s in sums)
        # the sketch's centroids weigh the same, adding up to the released n (their sizes would tell n)
        weights = {w for _, w in got["sketch"]}
        assert len(weights) == 1 and sum(w for _, w in got["sketch"]) == pytest.approx(got["n"])
        # quantiles are values of the column
        assert all(q is None or q in set(values) for q in got["quantiles"].values())
    # ca lacks 4 values at Cleveland: a small count, withheld (its n moves, and the total too)
    assert stats["columns"]["ca"]["missing"] is None and stats["columns"]["ca"]["n"] is not None
    assert abs(stats["total"] - rows.sum()) <= D


def test_a_column_over_nearly_the_same_values_as_before_is_withheld(tmp_path: Path, cleveland: pd.DataFrame) -> None:
    """Two cohorts far apart whose values of chol differ by one patient: the rows between them lack chol but for
    that patient. Two means of chol would give the patient's chol; the second is withheld, other columns are not."""
    table = cleveland.copy()
    table.loc[table.index[:12], "chol"] = np.nan  # twelve patients without chol, and patient 12 with one
    ledger = QueryLedger(tmp_path)
    first = np.zeros(len(table), bool)
    first[20:200] = True
    second = first.copy()
    second[:13] = True  # 13 rows more: the cohorts are 13 apart, their values of chol 1 apart
    asked(ledger, table, ask(QueryKind.STATS, ("chol",)), first)
    later = asked(ledger, table, ask(QueryKind.STATS, ("chol", "age")), second)
    assert later["columns"]["chol"]["mean"] is None and later["columns"]["chol"]["n"] is None
    assert later["columns"]["age"]["mean"] is not None
