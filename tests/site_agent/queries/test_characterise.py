"""The rules of a cohort's characterisation (``site_agent.queries.characterise``), pure: no ledger (``UNCHECKED``),
made-up pairs and persons."""

from __future__ import annotations

import numpy as np
import pandas as pd

from flip_core.query import OTHER_LEVEL
from site_agent.queries.characterise import top_table, within_cohort
from site_agent.queries.statistics import UNCHECKED


def pairs(held: dict[int, int]) -> pd.DataFrame:
    """Concept id → how many persons hold it: a pair per person (persons numbered from 0 for each concept)."""
    rows = [(p, c, f"name {c}") for c, n in held.items() for p in range(n)]
    return pd.DataFrame(rows, columns=["person", "concept_id", "concept_name"])


def test_top_names_the_most_held_concepts_above_the_threshold_and_counts_the_rest_as_other() -> None:
    table = pairs({1: 30, 2: 12, 3: 50, 4: 3, 5: 12})
    out = top_table(table, np.ones(len(table), bool), limit=2, threshold=10, releases=UNCHECKED, said="top")
    assert out["levels"] == [["name 3 (3)", "name 1 (1)", OTHER_LEVEL]]  # the most held first
    assert out["cells"] == [50, 30, 27] and out["total"] == 107  # other: 12 + 3 + 12


def test_top_never_names_a_concept_under_the_threshold_however_many_are_asked() -> None:
    table = pairs({1: 30, 2: 4})
    out = top_table(table, np.ones(len(table), bool), limit=100, threshold=10, releases=UNCHECKED, said="top")
    (levels,) = out["levels"]
    assert levels == ["name 1 (1)", OTHER_LEVEL] and out["cells"][1] is None  # 4 pairs: withheld, never named


def test_top_counts_only_the_selected_persons_pairs() -> None:
    table = pairs({1: 30, 2: 20})
    chosen = (table["person"] < 15).to_numpy()  # 15 persons of concept 1's, 15 of concept 2's
    out = top_table(table, chosen, limit=5, threshold=10, releases=UNCHECKED, said="top")
    assert out["levels"] == [["name 1 (1)", "name 2 (2)"]] and out["cells"] == [15, 15]


def test_within_a_dated_cohort_each_person_has_an_age_an_age_group_and_a_year_at_the_index_date() -> None:
    table = pd.DataFrame({"year_of_birth": [1950, 1960, 1970], "gender": ["F", "M", "F"]})
    keys = np.array([11, 12, 13], dtype=np.uint64)
    within, within_keys = within_cohort(table, keys, [0, 2], ["1994-06-01", "2019-12-31"])
    assert within["age"].tolist() == [44, 49] and within["age_group"].tolist() == ["40-44", "45-49"]
    assert within["index_year"].tolist() == [1994, 2019] and within_keys.tolist() == [11, 13]
    undated, _ = within_cohort(table, keys, [1], None)
    assert list(undated.columns) == ["year_of_birth", "gender"] and len(undated) == 1
