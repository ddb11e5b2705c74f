"""A site's answer to a federated query: one statistic over the rows that match the filter, disclosure-controlled.

:func:`answer` computes, on the cohort (the site table's rows the filter's mask selects), the
``table`` of a :class:`~flip_core.query.QueryReply` in one of the two shapes of
``flip_core.query``, and withholds (``None``) whatever would disclose a group smaller than the
threshold before anything leaves:

- a cohort smaller than the threshold withholds everything (its levels are still listed);
- a count table's cells go through :func:`site_agent.disclosure.suppression.protect` (small cells, a true zero
  included, and the cells that would give them away through a margin or the total);
- column statistics are released only over at least the threshold's number of values: no raw
  minimum or maximum ever leaves, only quantiles and means of at least ``threshold`` values; a quantile only
  where at least the threshold's number of values lie on each side of it (p95 of 100 values would be the
  site's fifth largest); a column's mean, std, quantiles and sketch only where they say no small count:
  where the column takes at most three values in the cohort, every value must be held by at least the
  threshold's number of rows (a mean of 0/1 values is a count of ones; a mean and std of three known values
  give each one's count), and the same for the sketch up to ``FEW_VALUES`` values (its chunks of sorted values
  give each value's count); otherwise at least the threshold's number of values must differ from the most
  common one (a cohort padded with rows of one known value gives the one other value away), and the rows of its
  rare values (each held by fewer than the threshold's rows) none or at least the threshold (several known values,
  each counted, and one patient); and, for a column
  of values none below zero, the p% rule of magnitude tables: no mean (nor std, quantiles, sketch) where all but
  the two largest values add up to less than ``DOMINANCE_P`` percent of the largest (the sum would say it);
- every set of rows whose count would leave (each cell, a total, a column's values) is first shown to the
  site's ledger of what it released before (``releases``, :class:`Releases`: ``site_agent.queries.ledger``
  at the site), which withholds it when it is within the threshold of a released set, or of a sum or
  difference of two; a withheld cell's lines are then made safe like a small cell's, and what leaves is
  entered in the ledger.

Level labels are text, the same at every site for the same value: a whole number is written
without a decimal point (``1.0`` → ``"1"``), any other float as Python's shortest round-trip
``repr`` (``2.5`` → ``"2.5"``, ``1e-07``), so two different values never share a label; a bool as
``"True"``/``"False"``, text as it is. Histogram edges are written the same way. Infinite values
count as missing in ``stats`` (they have no mean) and as below or above the edges in ``hist``.

Pure: pandas and numpy, no I/O. The site agent imports this module when its first query arrives.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import pandas as pd

from flip_core.errors import FlipError
from flip_core.query import (
    MAX_BINS,
    MAX_COLUMNS,
    MISSING_LEVEL,
    OTHER_LEVEL,
    QueryKind,
    QueryRequest,
    level_key,
)
from site_agent.disclosure.suppression import line_is_safe, line_sets, protect
from site_agent.queries.magnitudes import DOMINANCE_P, FEW_VALUES, MAX_CENTROIDS, column_statistics
from site_agent.queries.magnitudes import floats as _floats

MAX_LEVELS = 40  # distinct values a column may have to be counted by
# how many columns each kind takes: (fewest, most); MISSING with none means every column
COLUMN_LIMITS = {
    QueryKind.COUNT: (0, 3),
    QueryKind.CROSSTAB: (2, 2),
    QueryKind.STATS: (1, MAX_COLUMNS),
    QueryKind.HIST: (1, 1),
    QueryKind.MISSING: (0, MAX_COLUMNS),
}


class QueryRefused(FlipError):
    """The site will not answer this query as asked; the sentence says why and what to ask instead."""


class Releases(Protocol):
    """The site's ledger of released sets of rows, as :func:`answer` asks it (row positions of the site table)."""

    noise: int  # the most a released count moves from the truth (0: counts leave exact)

    def blocked(self, sets: list[tuple[np.ndarray, str]], tag: str = "") -> list[bool]:
        """For each candidate set (its rows, in words), whether it is too close to what was released before (of the
        same ``tag``: ``""``, a count; ``"values of COLUMN"``, that column's magnitudes); the candidates of one call
        may be released together."""
        ...

    def release(self, rows: np.ndarray, text: str, tag: str = "") -> int:
        """``rows``' count is leaving: enter the set; the count that leaves (moved by the set's cell key)."""
        ...

    def jitters(self, rows: np.ndarray, whats: list[str]) -> list[float]:
        """For each of ``whats``, a fraction in [-1, 1) fixed by the set and by it (0 where counts leave exact)."""
        ...


class Unchecked:
    """No ledger: nothing blocked, nothing entered, nothing moved (a mock's summaries, the unit tests of the rules
    alone)."""

    noise = 0

    def blocked(self, sets: list[tuple[np.ndarray, str]], tag: str = "") -> list[bool]:
        return [False] * len(sets)

    def release(self, rows: np.ndarray, text: str, tag: str = "") -> int:
        return int(np.asarray(rows).size)

    def jitters(self, rows: np.ndarray, whats: list[str]) -> list[float]:
        return [0.0] * len(whats)


UNCHECKED = Unchecked()


def answer(
    request: QueryRequest,
    table: pd.DataFrame,
    mask: np.ndarray,
    threshold: int,
    releases: Releases = UNCHECKED,
) -> dict[str, Any]:
    """The released ``table`` of this site's reply to ``request``: see the module's docstring.

    ``mask`` selects the cohort's rows of ``table``; ``threshold`` is the site's own, raised (never
    lowered) by the project's ``request.threshold``; ``releases`` the site's ledger. Raises :class:`QueryRefused`.
    """
    threshold = max(int(threshold), int(request.threshold))
    rows = np.asarray(mask, dtype=bool)
    if rows.shape != (len(table),):
        raise QueryRefused(
            f"the filter selected {rows.size} row flags for a table of {len(table)} rows; "
            "the site cannot answer until its filter and table agree"
        )
    if not all(isinstance(c, str) for c in table.columns):
        table = table.rename(columns=str)  # queries name columns as text
    columns = check_columns(request, table)
    said = request.text or f"{request.kind.value} where {request.where or 'every row'}"
    if request.kind in (QueryKind.COUNT, QueryKind.CROSSTAB):
        return _count_table(columns, table, rows, threshold, _Ledger(releases, said))
    if request.kind is QueryKind.HIST:
        return _histogram(columns[0], request.edges, table, rows, threshold, _Ledger(releases, said))
    if request.kind is QueryKind.MISSING:
        every = columns or [str(c) for c in table.columns]
        return _missing_table(every, table, rows, threshold, _Ledger(releases, said))
    if request.kind is QueryKind.STATS:
        return column_statistics(columns, table, rows, threshold, _Ledger(releases, said))
    raise QueryRefused(
        f"this site does not answer {request.kind!r} queries; ask count, stats, hist, crosstab or missing"
    )


def level_label(value: Any) -> str:
    """A value's level label (see the module's docstring)."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        number = float(value)
        if number.is_integer() and abs(number) < 1e16:
            return str(int(number))
        return repr(number)
    return str(value)


def check_columns(request: QueryRequest, table: pd.DataFrame) -> list[str]:
    """The columns ``request`` names, checked against the table's schema (names, how many, numeric where needed)."""
    have = [str(c) for c in table.columns]
    unknown = [c for c in request.columns if c not in have]
    if unknown:
        raise QueryRefused(
            f"this dataset has no column {', '.join(map(repr, unknown))}; its columns are {', '.join(have)}"
        )
    if len(set(request.columns)) != len(request.columns):
        raise QueryRefused("a column is listed twice in the query; list each column once")
    fewest, most = COLUMN_LIMITS[request.kind]
    if not fewest <= len(request.columns) <= most:
        wanted = f"exactly {fewest}" if fewest == most else f"{fewest} to {most}"
        advice = "ask for fewer (or run several queries)" if len(request.columns) > most else "name the column(s)"
        raise QueryRefused(
            f"a {request.kind.value} query takes {wanted} column(s), not {len(request.columns)}; {advice}"
        )
    if request.kind in (QueryKind.STATS, QueryKind.HIST):
        for name in request.columns:
            if not _is_numeric(table[name]):
                raise QueryRefused(
                    f"column {name!r} is not numeric ({table[name].dtype}), so {request.kind.value} cannot be "
                    "computed on it; count by it instead"
                )
    return list(request.columns)


def _is_numeric(column: pd.Series) -> bool:
    return bool(pd.api.types.is_numeric_dtype(column.dtype))


def _levels(column: pd.Series, name: str, threshold: int) -> tuple[list[str], np.ndarray]:
    """The column's level labels over the whole site table, and each row's level number. A value held by fewer than
    ``threshold`` rows of the whole table is not named: its rows are counted under ``OTHER_LEVEL`` (listed where the
    table has any such rows), as are missing values fewer than ``threshold`` (naming a level would say that some
    patient holds it, a count of at least one)."""
    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    labels_of = [level_label(u) for u in uniques]
    if len(set(labels_of)) > MAX_LEVELS:
        raise QueryRefused(
            f"column {name!r} has {len(set(labels_of))} distinct values at this site, more than the {MAX_LEVELS} a "
            "count table may have; ask for a hist of it with bin edges instead"
        )
    held: dict[str, int] = {}
    for label, rows in zip(labels_of, np.bincount(codes[codes >= 0], minlength=len(uniques)).tolist(), strict=True):
        held[label] = held.get(label, 0) + rows
    missing = int((codes < 0).sum())
    labels = sorted((label for label, rows in held.items() if rows >= threshold), key=level_key)
    if any(rows < threshold for rows in held.values()) or 0 < missing < threshold:
        labels.append(OTHER_LEVEL)
    if missing >= max(threshold, 1):
        labels.append(MISSING_LEVEL)
    number = {label: i for i, label in enumerate(labels)}
    other = number.get(OTHER_LEVEL, -1)
    of_unique = [number.get(label, other) for label in labels_of] + [number.get(MISSING_LEVEL, other)]
    return labels, np.array(of_unique, dtype=np.intp)[codes]  # code -1 (missing) picks the last entry


class _Ledger:
    """The ledger as one query's answer uses it: candidate sets in words, released sets entered."""

    def __init__(self, releases: Releases, said: str) -> None:
        self.releases = releases
        self.said = said[:200]
        self.noise = int(getattr(releases, "noise", 0))

    def blocked(self, sets: list[tuple[np.ndarray, str]], tag: str = "") -> list[bool]:
        return self.releases.blocked([(rows, f"{self.said}: {what}") for rows, what in sets], tag) if sets else []

    def release(self, rows: np.ndarray, what: str, tag: str = "") -> int:
        return self.releases.release(rows, f"{self.said}: {what}", tag)

    def jitters(self, rows: np.ndarray, whats: list[str]) -> list[float]:
        return self.releases.jitters(rows, whats)


def _cell_rows(cohort: np.ndarray, codes: np.ndarray, size: int) -> list[np.ndarray]:
    """The site-table rows of each of ``size`` cells: the ``cohort``'s positions grouped by their cell ``codes``."""
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(size + 1))
    return [cohort[order[bounds[c] : bounds[c + 1]]] for c in range(size)]


def _cell_names(dims: list[str], levels: list[list[str]]) -> list[str]:
    """Each flat cell in words (``sex=1, cp=2``)."""
    shape = tuple(len(labels) for labels in levels)
    if not dims:
        return ["count"]
    return [
        ", ".join(f"{d}={levels[k][i]}" for k, (d, i) in enumerate(zip(dims, index, strict=True)))
        for index in zip(*np.unravel_index(np.arange(math.prod(shape)), shape), strict=True)
    ]


def counted(
    columns: list[str], table: pd.DataFrame, rows: np.ndarray, threshold: int
) -> tuple[list[list[str]], np.ndarray]:
    """The cohort counted by every combination of the columns' levels (levels of the whole site table): the levels,
    and the counts flat in C order."""
    levels, _, counts = _counting(columns, table, np.asarray(rows, dtype=bool), threshold)
    return levels, counts


def _counting(
    columns: list[str], table: pd.DataFrame, rows: np.ndarray, threshold: int
) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
    """:func:`counted`, with each cohort row's flat cell."""
    levels: list[list[str]] = []
    codes: list[np.ndarray] = []
    for name in columns:
        labels, numbers = _levels(table[name], name, threshold)
        levels.append(labels)
        codes.append(numbers[rows])
    shape = tuple(len(labels) for labels in levels)
    n = int(rows.sum())
    if columns:
        flat = np.ravel_multi_index(tuple(codes), shape) if n else np.zeros(0, dtype=np.intp)
        counts = np.bincount(flat, minlength=math.prod(shape))
    else:
        flat = np.zeros(n, dtype=np.intp)
        counts = np.array([n])
    return levels, flat, counts


def count_levels(
    dim: str, labels: list[str], codes: np.ndarray, rows: np.ndarray, threshold: int, releases: Releases, said: str
) -> dict[str, Any]:
    """A count table by one dim whose levels the caller chose (``labels``; ``codes``: each row's level number):
    the rows ``rows`` selects counted by level, released under the same rules as :func:`answer`'s count tables."""
    rows = np.asarray(rows, dtype=bool)
    cohort, flat = np.flatnonzero(rows), np.asarray(codes, dtype=np.intp)[rows]
    counts = np.bincount(flat, minlength=len(labels))
    cells = _cell_rows(cohort, flat, len(labels))
    ledger = (cells, cohort, _Ledger(releases, said))
    return _released([dim], [labels], counts, line_sets((len(labels),)), int(cohort.size), threshold, ledger)


def _count_table(
    columns: list[str], table: pd.DataFrame, rows: np.ndarray, threshold: int, ledger: _Ledger
) -> dict[str, Any]:
    """Count (or crosstab): the cohort counted by every combination of the columns' levels."""
    levels, flat, counts = _counting(columns, table, rows, threshold)
    shape = tuple(len(labels) for labels in levels)
    n = int(rows.sum())
    cohort = np.flatnonzero(rows)
    cells = _cell_rows(cohort, flat, counts.size)
    return _released(columns, levels, counts, line_sets(shape), n, threshold, (cells, cohort, ledger))


def _released(
    dims: list[str],
    levels: list[list[str]],
    counts: np.ndarray,
    lines: list[np.ndarray],
    n: int,
    threshold: int,
    sets: tuple[list[np.ndarray], np.ndarray, _Ledger],
    names: list[str] | None = None,
) -> dict[str, Any]:
    """A count table as it leaves: withheld cells as None; the total withheld with a small cohort (or where
    the whole table's line cannot be made safe). ``sets``: each cell's rows, the cohort's and the ledger, which
    withholds a cell (or the total) whose rows are too close to rows released before, and enters what leaves."""
    cells, cohort, ledger = sets
    names = names or _cell_names(dims, levels)
    total_blocked = True
    if n < threshold:
        withheld = np.ones(counts.size, dtype=bool)
    else:  # the cells the table's own rules release, shown to the ledger together; what it blocks, withheld too
        candidates = np.flatnonzero(~protect(counts, lines, threshold))
        blocked = ledger.blocked([(cells[c], names[c]) for c in candidates.tolist()] + [(cohort, "total")])
        forced = np.zeros(counts.size, dtype=bool)
        forced[candidates] = blocked[:-1]
        total_blocked = blocked[-1]
        withheld = protect(counts, lines, threshold, forced)
    whole = np.arange(counts.size, dtype=np.intp)
    total_safe = n >= threshold and not total_blocked and line_is_safe(counts, withheld, whole, threshold)
    released: list[int | None] = [None] * counts.size
    for c in np.flatnonzero(~withheld).tolist():
        released[c] = ledger.release(cells[c], names[c])
    return {
        "dims": list(dims),
        "levels": [list(labels) for labels in levels],
        "cells": released,
        "total": ledger.release(cohort, "total") if total_safe else None,
        "noise": ledger.noise,
    }


def hist_edges(edges: tuple[float, ...], n: int, threshold: int, unit: str) -> np.ndarray:
    """A histogram's shared edges, checked: 1 to MAX_BINS bins, finite and increasing, and at most one bin for
    every ``threshold`` of the cohort's ``n`` (rows, or cases)."""
    bounds = np.asarray(edges, dtype=np.float64)
    bins = bounds.size - 1
    if bins < 1 or bins > MAX_BINS:
        raise QueryRefused(f"a hist takes 2 to {MAX_BINS + 1} bin edges (1 to {MAX_BINS} bins), not {bounds.size}")
    if not np.isfinite(bounds).all() or not (np.diff(bounds) > 0).all():
        raise QueryRefused("a hist's bin edges must be finite numbers in increasing order; fix the edges")
    allowed = max(1, n // max(threshold, 1))
    if bins > allowed:
        raise QueryRefused(
            f"{bins} bins are more than this cohort allows at this site: at most {allowed} "
            f"(one bin for every {threshold} {unit}); ask for fewer, wider bins"
        )
    return bounds


def bin_labels(bounds: np.ndarray) -> list[str]:
    """A histogram's levels over ``bounds``: below the first edge, each bin (the last one closed), above."""
    text = [level_label(float(e)) for e in bounds]
    labels = [f"below {text[0]}"]
    labels += [f"[{text[i]}, {text[i + 1]})" for i in range(len(text) - 2)] + [f"[{text[-2]}, {text[-1]}]"]
    return [*labels, f"above {text[-1]}"]


def binned(name: str, bounds: np.ndarray, table: pd.DataFrame, rows: np.ndarray) -> tuple[list[str], np.ndarray]:
    """A histogram's cells over ``bounds``: their labels (below, each bin, above, missing) and the cohort's counts."""
    labels, _, counts = _binning(name, bounds, table, np.asarray(rows, dtype=bool))
    return labels, counts


def _binning(
    name: str, bounds: np.ndarray, table: pd.DataFrame, rows: np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """:func:`binned`, with each cohort row's cell."""
    values = _floats(table[name])[rows]
    bins = bounds.size - 1
    # each cohort row's cell: 0 below, 1..bins in a bin ([e_i, e_i+1), the last one closed), bins+1 above, missing
    codes = np.searchsorted(bounds, values, side="right").astype(np.intp)
    codes[values == bounds[-1]] = bins
    codes[np.isnan(values)] = bins + 2
    counts = np.bincount(codes, minlength=bins + 3).astype(np.int64)
    return [*bin_labels(bounds), MISSING_LEVEL], codes, counts


def _histogram(
    name: str, edges: tuple[float, ...], table: pd.DataFrame, rows: np.ndarray, threshold: int, ledger: _Ledger
) -> dict[str, Any]:
    """A histogram over shared edges: below the first edge, each bin, above the last edge, missing."""
    n = int(rows.sum())
    bounds = hist_edges(edges, n, threshold, "rows")
    labels, codes, counts = _binning(name, bounds, table, rows)
    whole = np.arange(counts.size, dtype=np.intp)
    cohort = np.flatnonzero(rows)
    cells = _cell_rows(cohort, codes, counts.size)
    names = [f"{name} {label}" for label in labels]
    released = _released([name], [labels], counts, [whole], n, threshold, (cells, cohort, ledger), names)
    released["edges"] = [float(e) for e in bounds]
    return released


def lacking(name: str, table: pd.DataFrame, rows: np.ndarray) -> tuple[int, int]:
    """How many cohort rows lack a value of column ``name``, and how many have one."""
    missing = int(table[name].isna().to_numpy()[np.asarray(rows, dtype=bool)].sum())
    return missing, int(np.asarray(rows, dtype=bool).sum()) - missing


def _missing_table(
    columns: list[str], table: pd.DataFrame, rows: np.ndarray, threshold: int, ledger: _Ledger
) -> dict[str, Any]:
    """For each column, how many cohort rows lack a value and how many have one."""
    cohort = np.flatnonzero(rows)
    n = cohort.size
    counts, cells, names = [], [], []
    for name in columns:
        absent = table[name].isna().to_numpy()[cohort]
        counts += [int(absent.sum()), int(n - absent.sum())]
        cells += [cohort[absent], cohort[~absent]]
        names += [f"{name} missing", f"{name} present"]
    # each column's pair adds up to the (released) total; nothing else is known
    lines = [np.array([2 * i, 2 * i + 1], dtype=np.intp) for i in range(len(columns))]
    levels = [columns, ["missing", "present"]]
    return _released(["column", "state"], levels, np.array(counts), lines, n, threshold, (cells, cohort, ledger), names)


__all__ = [
    "COLUMN_LIMITS",
    "binned",
    "check_columns",
    "counted",
    "hist_edges",
    "lacking",
    "DOMINANCE_P",
    "FEW_VALUES",
    "MAX_CENTROIDS",
    "MAX_LEVELS",
    "UNCHECKED",
    "QueryRefused",
    "Releases",
    "answer",
    "level_key",
    "level_label",
]
