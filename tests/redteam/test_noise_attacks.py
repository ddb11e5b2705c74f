"""Attacks on what cell-key perturbation hides (issue 26): in a project whose counts move (``count_noise`` 2, as by
default), a researcher tries to get an exact count back from the moved answers: by asking again and averaging, by
the whole-number sums behind an exact mean or std, by a column's missing values beside its n, by the sketch's
weights, and by averaging many differences of nearly equal sets. Each is judged against the truth read with pandas;
every one must come back with nothing exact to compute its target from.

The project's answers are asked through the public client of a researcher of its own, so that the ledger's scope
(the project, and the researcher's other projects) holds only these attacks (``test_query_attacks`` attacks the
ledger alone, where counts leave exact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from coordinator.config import add_token
from flip_magics.client import FlipClient
from site_agent.data.catalog import load_site
from site_agent.data.formats import load_table

from kit import NOISY_PROJECT, SITES, RedTeam

pytestmark = pytest.mark.integration

DATASET = "heart-disease"
T, D = 10, 2  # the red team's threshold; the noisy project's noise
SITE = SITES[0]
RESEARCHER = "mallory"  # a researcher of this module's own: the ledger keeps each researcher's answers apart


@pytest.fixture(scope="module")
def truth(redteam: RedTeam) -> pd.DataFrame:
    return load_table(load_site(Path(redteam.sites_dir) / SITE), DATASET)


@pytest.fixture(scope="module")
def noisy(redteam: RedTeam) -> FlipClient:
    """The researcher's client in the project whose counts move."""
    token = add_token(Path(redteam.connection["federation"]) / "coordinator.json", RESEARCHER, NOISY_PROJECT)
    return FlipClient(redteam.connection["coordinator_url"], token)


def ask(client: FlipClient, kind: str, columns: tuple[str, ...] = (), where: str = "", **options: Any) -> dict:
    """The attacked site's released table; a refusal as a table of nothing (no count, no cell, no column)."""
    reply = client.query(DATASET, kind, list(columns), where, **options).raw["sites"].get(SITE)
    return reply["table"] if reply else {"total": None, "cells": [None], "columns": {}}


def whole_counts(mean: float, std: float | None, n: int) -> list[int]:
    """The counts within the noise of a released ``n`` for which an exact mean (and std) of whole numbers would
    be consistent: the sum ``count * mean`` whole, and ``count (count - 1) std²`` whole. With exact magnitudes
    only the true count is; moved ones leave none."""
    found = []
    for count in range(n - D, n + D + 1):
        total = count * mean
        square = None if std is None else count * (count - 1) * std * std
        if abs(total - round(total)) < 1e-6 and (square is None or abs(square - round(square)) < 1e-4):
            found.append(count)
    return found


def test_the_same_rows_asked_again_and_again_come_back_the_same(noisy, truth) -> None:
    """Averaging repeated answers: the same count five times, through another filter of the same rows, and as the
    total of another statistic. One answer, however asked: nothing to average."""
    where = "age > 52"
    answers = [ask(noisy, "count", (), where)["total"] for _ in range(3)]
    answers.append(ask(noisy, "count", (), "not (age <= 52)")["total"])
    answers.append(ask(noisy, "stats", ("age",), where)["total"])
    answers.append(ask(noisy, "count", ("sex",), where)["total"])
    truth_count = int((truth.age > 52).sum())
    assert len(set(answers)) == 1, answers
    assert abs(answers[0] - truth_count) <= D


@pytest.mark.parametrize("column", ["age", "trestbps", "thalach"])
def test_an_exact_count_from_the_whole_sums_behind_a_mean_and_std(noisy, truth, column) -> None:
    """The column holds whole numbers: with an exact mean and std, only the true count near the released n makes
    ``count * mean`` and ``count (count - 1) std²`` whole. Then the total less it is an exact missing count."""
    got = ask(noisy, "stats", (column,), "age > 43")["columns"][column]
    values = truth.loc[truth.age > 43, column].dropna()
    assert (values == values.round()).all() and got["mean"] is not None
    assert abs(got["n"] - len(values)) <= D
    assert whole_counts(got["mean"], got["std"], got["n"]) == []
    # nor from the sketch: its centroids weigh the same share of the released n
    weights = [w for _, w in got["sketch"]]
    assert len(set(weights)) == 1 and sum(weights) == pytest.approx(got["n"])


def test_a_small_missing_count_beside_a_columns_n(noisy, truth) -> None:
    """``ca`` lacks a value for 4 of Cleveland's patients: stats of it give n and the cohort's total; where counts
    leave exact, the total less n is the 4."""
    lacking = int((truth.loc[truth.age > 40, "ca"]).isna().sum())
    assert 0 < lacking < T
    table = ask(noisy, "stats", ("ca",), "age > 40")
    got = table["columns"]["ca"]
    assert got["missing"] is None  # a small count: withheld
    exact_n = whole_counts(got["mean"], got["std"], got["n"]) if got["mean"] is not None else []
    assert exact_n == []  # no exact n to take from the total (itself moved)
    missing = ask(noisy, "missing", ("ca",), "age > 40")
    assert missing["cells"][0] is None  # and the missing table withholds it as ever


def test_averaging_the_differences_of_many_pairs_of_nearly_equal_sets(noisy, truth) -> None:
    """Each pair (a group, the group and three patients more) differs by the same three patients; moved counts of
    many pairs, averaged, would give the three. The ledger refuses the second of each pair."""
    rare = truth[(truth.age > 70)].index[:3]
    assert len(rare) == 3
    extra = " or ".join(f"(age = {truth.age[i]:g} and chol = {truth.chol[i]:g})" for i in rare)
    differences = []
    for low in (40, 44, 48, 52):
        group = f"age >= {low} and age < {low + 12}"
        first = ask(noisy, "count", (), group)["total"]
        second = ask(noisy, "count", (), f"({group}) or {extra}")["total"]
        differences.append(None if first is None or second is None else second - first)
    assert differences == [None] * 4, differences
