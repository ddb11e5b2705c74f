"""A site's answer to a federated query: one statistic over the rows that match the filter, disclosure-controlled.

:func:`answer` computes, on the cohort (the site table's rows the filter's mask selects), the
``table`` of a :class:`~flip_core.query.QueryReply` in one of the two shapes of
``flip_core.query``, and withholds (``None``) whatever would disclose a group smaller than the
threshold before anything leaves:

- a cohort smaller than the threshold withholds everything (its levels are still listed);
- a count table's cells go through :func:`site_agent.disclosure.suppression.protect` (small cells, a true zero
  included, and the cells that would give them away through a margin or the total);
- column statistics are released only over at least the threshold's number of values: no raw
  minimum or maximum ever leaves, only quantiles and means of at least ``threshold`` values.

Level labels are text, the same at every site for the same value: a whole number is written
without a decimal point (``1.0`` → ``"1"``), any other float as Python's shortest round-trip
``repr`` (``2.5`` → ``"2.5"``, ``1e-07``), so two different values never share a label; a bool as
``"True"``/``"False"``, text as it is. Histogram edges are written the same way. Infinite values
count as missing in ``stats`` (they have no mean) and as below or above the edges in ``hist``.

Pure: pandas and numpy, no I/O. The site agent imports this module when its first query arrives.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from flip_core.errors import FlipError
from flip_core.query import (
    MAX_BINS,
    MAX_COLUMNS,
    MISSING_LEVEL,
    QUANTILE_NAMES,
    QUANTILES,
    QueryKind,
    QueryRequest,
    level_key,
)
from site_agent.disclosure.suppression import line_is_safe, line_sets, protect

MAX_LEVELS = 40  # distinct values a column may have to be counted by
MAX_CENTROIDS = 100  # the most chunks a column's sketch is cut into
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


def answer(request: QueryRequest, table: pd.DataFrame, mask: np.ndarray, threshold: int) -> dict[str, Any]:
    """The released ``table`` of this site's reply to ``request``: see the module's docstring.

    ``mask`` selects the cohort's rows of ``table``; ``threshold`` is the site's own, raised (never
    lowered) by the project's ``request.threshold``. Raises :class:`QueryRefused`.
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
    columns = _check_columns(request, table)
    if request.kind in (QueryKind.COUNT, QueryKind.CROSSTAB):
        return _count_table(columns, table, rows, threshold)
    if request.kind is QueryKind.HIST:
        return _histogram(columns[0], request.edges, table, rows, threshold)
    if request.kind is QueryKind.MISSING:
        return _missing_table(columns or [str(c) for c in table.columns], table, rows, threshold)
    if request.kind is QueryKind.STATS:
        return _column_statistics(columns, table, rows, threshold)
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


def _check_columns(request: QueryRequest, table: pd.DataFrame) -> list[str]:
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


def _floats(column: pd.Series) -> np.ndarray:
    """A numeric column as float64, missing values as NaN."""
    return np.asarray(column.astype("float64").to_numpy(), dtype=np.float64)


def _levels(column: pd.Series, name: str) -> tuple[list[str], np.ndarray]:
    """The column's level labels over the whole site table, and each row's level number."""
    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    labels_of = [level_label(u) for u in uniques]
    labels = sorted(set(labels_of), key=level_key)
    if len(labels) > MAX_LEVELS:
        raise QueryRefused(
            f"column {name!r} has {len(labels)} distinct values at this site, more than the {MAX_LEVELS} a count "
            "table may have; ask for a hist of it with bin edges instead"
        )
    if (codes < 0).any():
        labels.append(MISSING_LEVEL)
    number = {label: i for i, label in enumerate(labels)}
    of_unique = np.array([number[label] for label in labels_of] + [number.get(MISSING_LEVEL, -1)], dtype=np.intp)
    return labels, of_unique[codes]  # code -1 (missing) picks the last entry


def _count_table(columns: list[str], table: pd.DataFrame, rows: np.ndarray, threshold: int) -> dict[str, Any]:
    """Count (or crosstab): the cohort counted by every combination of the columns' levels."""
    levels: list[list[str]] = []
    codes: list[np.ndarray] = []
    for name in columns:
        labels, numbers = _levels(table[name], name)
        levels.append(labels)
        codes.append(numbers[rows])
    shape = tuple(len(labels) for labels in levels)
    n = int(rows.sum())
    if columns:
        flat = np.ravel_multi_index(tuple(codes), shape) if n else np.zeros(0, dtype=np.intp)
        counts = np.bincount(flat, minlength=math.prod(shape))
    else:
        counts = np.array([n])
    return _released(columns, levels, counts, line_sets(shape), n, threshold)


def _released(
    dims: list[str], levels: list[list[str]], counts: np.ndarray, lines: list[np.ndarray], n: int, threshold: int
) -> dict[str, Any]:
    """A count table as it leaves: withheld cells as None; the total withheld with a small cohort (or where
    the whole table's line cannot be made safe)."""
    if n < threshold:
        withheld = np.ones(counts.size, dtype=bool)
    else:
        withheld = protect(counts, lines, threshold)
    whole = np.arange(counts.size, dtype=np.intp)
    total_safe = n >= threshold and line_is_safe(counts, withheld, whole, threshold)
    return {
        "dims": list(dims),
        "levels": [list(labels) for labels in levels],
        "cells": [None if hide else int(count) for count, hide in zip(counts.tolist(), withheld.tolist(), strict=True)],
        "total": n if total_safe else None,
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


def _histogram(
    name: str, edges: tuple[float, ...], table: pd.DataFrame, rows: np.ndarray, threshold: int
) -> dict[str, Any]:
    """A histogram over shared edges: below the first edge, each bin, above the last edge, missing."""
    n = int(rows.sum())
    bounds = hist_edges(edges, n, threshold, "rows")
    values = _floats(table[name])[rows]
    missing = np.isnan(values)
    present = values[~missing]
    inside = present[(present >= bounds[0]) & (present <= bounds[-1])]
    in_bins, _ = np.histogram(inside, bins=bounds)  # [e_i, e_i+1), the last bin closed
    counts = np.concatenate(
        [[(present < bounds[0]).sum()], in_bins, [(present > bounds[-1]).sum(), missing.sum()]]
    ).astype(np.int64)
    labels = [*bin_labels(bounds), MISSING_LEVEL]
    whole = np.arange(counts.size, dtype=np.intp)
    released = _released([name], [labels], counts, [whole], n, threshold)
    released["edges"] = [float(e) for e in bounds]
    return released


def _missing_table(columns: list[str], table: pd.DataFrame, rows: np.ndarray, threshold: int) -> dict[str, Any]:
    """For each column, how many cohort rows lack a value and how many have one."""
    cohort = table[rows]
    n = len(cohort)
    counts = []
    for name in columns:
        lacking = int(cohort[name].isna().sum())
        counts += [lacking, n - lacking]
    # each column's pair adds up to the (released) total; nothing else is known
    lines = [np.array([2 * i, 2 * i + 1], dtype=np.intp) for i in range(len(columns))]
    return _released(["column", "state"], [columns, ["missing", "present"]], np.array(counts), lines, n, threshold)


def _column_statistics(columns: list[str], table: pd.DataFrame, rows: np.ndarray, threshold: int) -> dict[str, Any]:
    n = int(rows.sum())
    stats = {name: _one_column(_floats(table[name])[rows], n, threshold) for name in columns}
    return {"columns": stats, "total": n if n >= threshold else None}


def _one_column(values: np.ndarray, n_rows: int, threshold: int) -> dict[str, Any]:
    """n, missing, mean, std, quantiles and sketch of one column's cohort values.

    ``n`` is released when it reaches the threshold, and ``missing`` (the total minus ``n``) with it: the
    sketch's weights add up to ``n`` and exact pooling needs it, so withholding ``missing`` would hide
    nothing. Below the threshold all of them are withheld, ``missing`` too (it would give ``n`` back).
    """
    present = np.sort(values[np.isfinite(values)])
    n = int(present.size)
    withheld: dict[str, Any] = {"mean": None, "std": None, "quantiles": None, "sketch": None}
    if n < threshold:  # (a cohort below the threshold has fewer values still)
        return {"n": None, "missing": None, **withheld}
    if n == 0:  # only with a threshold of 0: nothing to describe
        return {"n": 0, "missing": n_rows, **withheld}
    chunks = np.array_split(present, min(MAX_CENTROIDS, max(1, n // max(threshold, 1))))
    sketch = [[_number(chunk.mean()), int(chunk.size)] for chunk in chunks]
    quantiles = dict(zip(QUANTILE_NAMES, (_number(q) for q in np.quantile(present, QUANTILES)), strict=True))
    return {
        "n": n,
        "missing": n_rows - n,
        "mean": _number(present.mean()),
        "std": _number(present.std(ddof=1)) if n >= 2 else None,
        "quantiles": None if None in quantiles.values() else quantiles,
        "sketch": None if any(c[0] is None for c in sketch) else sketch,
    }


def _number(value: Any) -> float | None:
    """A plain float for JSON, None where it overflowed."""
    number = float(value)
    return number if math.isfinite(number) else None


__all__ = ["COLUMN_LIMITS", "MAX_CENTROIDS", "MAX_LEVELS", "QueryRefused", "answer", "level_key", "level_label"]
