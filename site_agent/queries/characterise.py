"""Characterising a cohort under the query path's disclosure rules: its persons at their index date, and the most
frequent concepts they hold.

A query may be asked within a frozen cohort (``QueryRequest.cohort``): its rows are the cohort's, and where the
cohort froze index dates (an OMOP database's Circe cohort), each person's ``age`` and ``age_group`` (five years:
``40-44``) and ``index_year`` at it are columns too (``flip_core.query.COHORT_COLUMNS``), so that ``count by
gender, age_group, index_year`` is an ordinary count table: levels named only where the threshold's number of the
cohort's persons hold them, cells withheld, perturbed and checked against the ledger like any other.

``top DOMAIN`` counts persons by concept (the vocabulary's names): each (person, concept) pair of the persons asked
is a row, keyed by the person's row key and the concept, so the ledger sees the same person in every query. A site
names at most ``limit`` concepts, those most of its persons hold and only where at least the threshold's number do;
every other concept's pairs are counted under ``OTHER_LEVEL`` (a pooled cell of a concept a site does not name is
withheld by that site, as for any count table). Within a dated cohort a concept counts when it is dated within
:data:`TOP_WINDOW` of the index date (OHDSI's long-term window), else at any time.

Pure: pandas and numpy, no I/O (the pairs come from ``site_agent.data.omop_features.concept_persons``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from flip_core.query import OTHER_LEVEL
from site_agent.queries.statistics import Releases, count_levels

if TYPE_CHECKING:
    import pandas as pd

AGE_BAND = 5
TOP_WINDOW = (-365, 0)


def within_cohort(
    table: pd.DataFrame, keys: np.ndarray, rows: list[int], index: list[str] | None
) -> tuple[pd.DataFrame, np.ndarray]:
    """The cohort's rows of ``table`` (and their row keys), with its persons' age, age group and year at their
    ``index`` dates where it has them (and the table a year of birth)."""
    import pandas as pd

    positions = np.asarray(rows, dtype=np.intp)
    within = table.iloc[positions].reset_index(drop=True)
    if index is not None and "year_of_birth" in within.columns:
        years = pd.to_datetime(pd.Series(index)).dt.year.astype("int64")
        age = years - within["year_of_birth"].astype("int64")
        low = (age // AGE_BAND) * AGE_BAND
        within["age"] = age
        within["age_group"] = [f"{lo}-{lo + AGE_BAND - 1}" for lo in low]
        within["index_year"] = years
    return within, keys[positions]


def top_table(
    pairs: pd.DataFrame, rows: np.ndarray, limit: int, threshold: int, releases: Releases, said: str
) -> dict[str, Any]:
    """The count table of ``top``: the pairs ``rows`` selects counted by concept, the ``limit`` concepts most of
    them hold named (by name and id), every other concept under ``OTHER_LEVEL``."""
    rows = np.asarray(rows, dtype=bool)
    chosen = pairs[rows]
    held = {int(concept): int(n) for concept, n in chosen["concept_id"].value_counts().items()}  # type: ignore[call-overload]
    ranked = sorted((c for c, n in held.items() if n >= threshold), key=lambda c: (-held[c], c))[: max(int(limit), 1)]
    names = dict(zip(pairs["concept_id"].astype(int), pairs["concept_name"], strict=True))
    labels = [f"{names[concept] or 'concept'} ({concept})" for concept in ranked]
    number = {concept: i for i, concept in enumerate(ranked)}
    codes = pairs["concept_id"].astype("int64").map(number).fillna(len(labels)).to_numpy(dtype=np.intp)
    if (codes[rows] == len(labels)).any() or not labels:
        labels.append(OTHER_LEVEL)
    else:
        codes = np.minimum(codes, len(labels) - 1)  # unselected rows only: they are not counted
    return count_levels("concept", labels, codes, rows, threshold, releases, said)


__all__ = ["AGE_BAND", "TOP_WINDOW", "top_table", "within_cohort"]
