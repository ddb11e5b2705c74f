"""A query answered under differential privacy, where the site asks it of a project (``query_epsilon``).

Each query spends the project's ``query_epsilon`` of its budget at this site (``max_epsilon``, shared with its
training runs: ``site_agent.disclosure.privacy``), whatever it asks, and its answer is epsilon-differentially
private with respect to the site's table (one patient's row added or removed), by OpenDP's mechanisms over the
exact figures: nothing here draws noise by hand, and nothing that leaves depends on the data but through them.

- **count tables** (count, count by, crosstab, hist, a cohort's count): each cell gets OpenDP's discrete Laplace
  noise of scale ``1 / epsilon``; a patient is in one cell, so the table costs ``epsilon`` (a missing table, where
  a patient is in one cell per column, scales its noise by the number of columns). Then, as post-processing, a
  noisy cell under the threshold is withheld, and the total is the sum of all the noisy cells (withheld ones too);
- **column statistics**: each value is clamped to the bounds the researcher gives (``range``, the same for every
  column: bounds read off the data would not be private), and OpenDP's Laplace noise is added to each column's
  count, sum and sum of squares, the query's epsilon split evenly over them and the cohort's count; n, mean and std
  come from the noisy figures (withheld where the noisy n is under the threshold); no quantile or sketch leaves.

The site's ledger is not asked (a refusal that depends on the data is a release the budget would not count), and
counts do not move by their cell key: the noise is the budget's.

Pure but for OpenDP's own randomness (a cryptographically secure source; never seeded).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

from flip_core.query import QueryKind, QueryRequest
from site_agent.queries.statistics import QueryRefused, binned, check_columns, counted, hist_edges, lacking

STAT_FIGURES = 3  # per column: count, sum, sum of squares
STATS_NEED_BOUNDS = (
    "this site answers this project's stats under differential privacy: give the bounds every value is clamped to, "
    "the same for each column asked (range=(LOW, HIGH), or --range LOW HIGH)"
)


@lru_cache(maxsize=1)
def _opendp() -> Any:
    import opendp.prelude as dp

    dp.enable_features("contrib")  # OpenDP's mechanisms that are not yet vetted by its own review: Laplace is one
    return dp


def noisy_counts(counts: np.ndarray, scale: float) -> np.ndarray:
    """``counts`` each with OpenDP's discrete Laplace noise of ``scale``."""
    dp = _opendp()
    mechanism = dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T=int)), dp.l1_distance(T=int), scale=float(scale))
    return np.asarray(mechanism([int(c) for c in np.asarray(counts).ravel()]), dtype=np.int64).reshape(counts.shape)


def noisy_number(value: float, scale: float) -> float:
    """``value`` with OpenDP's (continuous) Laplace noise of ``scale``."""
    dp = _opendp()
    mechanism = dp.m.make_laplace(dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), scale=float(scale))
    return float(mechanism(float(value)))


def check_bounds(kind: QueryKind, edges: tuple[float, ...]) -> None:
    """Refuse, before anything is spent, a ``stats`` query without the bounds its values are clamped to."""
    if kind is QueryKind.STATS and (
        len(edges) != 2 or not all(math.isfinite(e) for e in edges) or not edges[0] < edges[1]
    ):
        raise QueryRefused(STATS_NEED_BOUNDS)


def answer_privately(
    request: QueryRequest, table: pd.DataFrame, rows: np.ndarray, threshold: int, epsilon: float
) -> dict[str, Any]:
    """The released ``table`` of this site's reply to ``request``, epsilon-differentially private (see the module's
    docstring). Raises :class:`~site_agent.queries.statistics.QueryRefused` for what it cannot answer so."""
    rows = np.asarray(rows, dtype=bool)
    if not all(isinstance(c, str) for c in table.columns):
        table = table.rename(columns=str)  # queries name columns as text
    check_columns(request, table)
    private = {"epsilon": float(epsilon)}
    if request.kind in (QueryKind.COUNT, QueryKind.CROSSTAB):  # (a cohort's count is asked as a count)
        columns = list(request.columns)
        levels, counts = counted(columns, table, rows, threshold)
        return _released(columns, levels, counts, threshold, 1.0 / epsilon, private)
    if request.kind is QueryKind.HIST:
        name = request.columns[0]
        bounds = hist_edges(request.edges, len(table), threshold, "rows")  # public edges; no cohort size in the rule
        labels, counts = binned(name, bounds, table, rows)
        released = _released([name], [labels], counts, threshold, 1.0 / epsilon, private)
        released["edges"] = [float(e) for e in bounds]
        return released
    if request.kind is QueryKind.MISSING:
        columns = list(request.columns) or [str(c) for c in table.columns]
        counts = np.array([n for name in columns for n in lacking(name, table, rows)])
        levels = [columns, ["missing", "present"]]
        return _released(["column", "state"], levels, counts, threshold, len(columns) / epsilon, private)
    if request.kind is QueryKind.STATS:
        return _statistics(list(request.columns), request.edges, table, rows, threshold, epsilon, private)
    raise QueryRefused(f"this site does not answer {request.kind.value} queries under differential privacy")


def _released(
    dims: list[str],
    levels: list[list[str]],
    counts: np.ndarray,
    threshold: int,
    scale: float,
    private: dict[str, Any],
) -> dict[str, Any]:
    noisy = noisy_counts(np.asarray(counts, dtype=np.int64), scale)
    total = int(noisy.sum())
    return {
        "dims": list(dims),
        "levels": [list(labels) for labels in levels],
        "cells": [int(c) if c >= threshold else None for c in noisy.tolist()],
        "total": total if total >= threshold else None,
        "noise": None,
        "private": {**private, "scale": float(scale)},
    }


def _statistics(
    columns: list[str],
    edges: tuple[float, ...],
    table: pd.DataFrame,
    rows: np.ndarray,
    threshold: int,
    epsilon: float,
    private: dict[str, Any],
) -> dict[str, Any]:
    check_bounds(QueryKind.STATS, edges)
    low, high = float(edges[0]), float(edges[1])
    share = epsilon / (STAT_FIGURES * len(columns) + 1)  # every figure of every column, and the cohort's count
    reach = max(abs(low), abs(high))  # how far one row moves a sum of clamped values
    cohort = np.flatnonzero(rows)
    stats = {}
    for name in columns:
        values = np.asarray(table[name].astype("float64").to_numpy(), dtype=np.float64)[cohort]
        values = np.clip(values[np.isfinite(values)], low, high)
        n = noisy_number(values.size, 1.0 / share)
        total = noisy_number(float(values.sum()), reach / share)
        squares = noisy_number(float(np.square(values).sum()), reach * reach / share)
        entry: dict[str, Any] = {"n": None, "missing": None, "mean": None, "std": None, "quantiles": None}
        if n >= max(threshold, 2):
            mean = min(max(total / n, low), high)
            variance = max((squares - n * mean * mean) / (n - 1), 0.0)
            entry.update(n=int(round(n)), mean=mean, std=min(math.sqrt(variance), high - low))
        stats[name] = {**entry, "sketch": None}
    size = int(noisy_counts(np.array([cohort.size]), 1.0 / share)[0])
    return {
        "columns": stats,
        "total": size if size >= threshold else None,
        "noise": None,
        "private": {**private, "bounds": [low, high]},
    }


__all__ = ["STATS_NEED_BOUNDS", "answer_privately", "check_bounds", "noisy_counts", "noisy_number"]
