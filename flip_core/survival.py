"""Survival across sites (issue 29): the time bins every site counts in, and how a site coarsens them.

No exact event time leaves a site. The researcher chooses the bin edges ``e_0 < e_1 < ... < e_K`` (days, or
whatever unit the time column is in); a row's time ``t`` falls in bin ``k`` when ``e_{k-1} < t <= e_k`` (bin 0 when
``t <= e_0``), and its binned time is ``e_k``. A row still at risk after the last edge is censored there (an event
after ``e_K`` counts as a censoring at ``e_K``). Every federated survival statistic (Kaplan-Meier's counts, the
log-rank test, the binned Cox model's sums) is a function of the rows' binned times, so it equals the same statistic
of the pooled rows' binned times, exactly.

A site releases its counts per bin only where each is none or at least its threshold: a bin in which fewer than the
threshold's rows (but some) have an event, or are censored, is merged into the next one (its edge is dropped), the
last into the ones before, until every count is safe (:func:`coarsen`). The numbers at risk then follow from the
released counts and the group's rows. A zero leaves: that nobody in a group had the event between two edges is what
a survival curve is for, and is shown by any released curve at the resolution of its bins.

Pure: numpy and the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from flip_core.errors import RequestInvalid

MAX_EDGES = 200


class EdgesInvalid(RequestInvalid):
    """Bin edges that are not increasing finite numbers, or too many."""


def checked_edges(edges: Sequence[float]) -> tuple[float, ...]:
    """``edges`` as increasing finite floats (at least two, at most :data:`MAX_EDGES`); EdgesInvalid otherwise."""
    values = tuple(float(e) for e in edges)
    if not 2 <= len(values) <= MAX_EDGES:
        raise EdgesInvalid(f"survival needs from 2 to {MAX_EDGES} bin edges, not {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise EdgesInvalid("bin edges are finite numbers")
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise EdgesInvalid("bin edges increase: each one larger than the one before")
    return values


def bin_index(times: np.ndarray, events: np.ndarray, edges: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Each row's bin (0..K, ``e_{k-1} < t <= e_k``) and event flag once binned: a row after the last edge is in the
    last bin, censored."""
    bounds = np.asarray(edges, dtype=np.float64)
    k = np.searchsorted(bounds, np.asarray(times, dtype=np.float64), side="left")
    late = k >= len(bounds)
    return np.minimum(k, len(bounds) - 1), np.where(late, False, np.asarray(events, dtype=bool))


def binned_times(times: np.ndarray, events: np.ndarray, edges: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Each row's binned time (the upper edge of its bin) and event flag: what a pooled reference fit sees."""
    k, event = bin_index(times, events, edges)
    return np.asarray(edges, dtype=np.float64)[k], event


def coarsen(counts: np.ndarray, threshold: int) -> list[int]:
    """The bins kept when every count must be none or at least ``threshold``: ``counts`` is (bins, columns), each
    column a count per bin (events, censorings, of each group); a bin with a small count is merged into the next
    kept one, a small tail into the runs before it (the last first). Returns the kept bins' indices (each the last
    bin of its merged run), empty when even all the bins in one are small: the rows are too few."""
    counts = np.asarray(counts, dtype=np.int64)
    kept: list[int] = []
    run = np.zeros(counts.shape[1], dtype=np.int64)
    for k in range(counts.shape[0]):
        run = run + counts[k]
        if _safe(run, threshold):
            kept.append(k)
            run = np.zeros_like(run)
    if run.any():  # a small tail: merged into the kept runs before it, the last first, until it is safe
        while kept:
            start = kept[-2] + 1 if len(kept) > 1 else 0
            kept.pop()
            if _safe(counts[start:].sum(axis=0), threshold):
                return [*kept, counts.shape[0] - 1]
        return []
    return kept


def regroup(counts: np.ndarray, kept: Sequence[int]) -> np.ndarray:
    """``counts`` (bins, ...) summed into the runs that end at the ``kept`` bins."""
    counts = np.asarray(counts)
    starts = [0, *[k + 1 for k in kept[:-1]]]
    return np.stack([counts[s : k + 1].sum(axis=0) for s, k in zip(starts, kept, strict=True)])


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for X chi-square on ``df`` (a whole number) degrees of freedom: the regularized upper incomplete
    gamma function Q(df/2, x/2) in closed form (a finite sum, with ``erfc`` for odd ``df``)."""
    if df < 1 or int(df) != df:
        raise ValueError("chi-square degrees of freedom are a whole number, at least 1")
    if not x > 0:
        return 1.0
    if math.isinf(x):
        return 0.0
    half = x / 2.0
    if df % 2 == 0:
        total = sum(math.exp(k * math.log(half) - half - math.lgamma(k + 1)) for k in range(df // 2))
    else:
        total = math.erfc(math.sqrt(half)) + sum(
            math.exp((k - 0.5) * math.log(half) - half - math.lgamma(k + 0.5)) for k in range(1, df // 2 + 1)
        )
    return min(1.0, total)


def _safe(counts: np.ndarray, threshold: int) -> bool:
    return bool(((counts == 0) | (counts >= threshold)).all())


__all__ = [
    "MAX_EDGES",
    "EdgesInvalid",
    "bin_index",
    "binned_times",
    "checked_edges",
    "chi2_sf",
    "coarsen",
    "regroup",
]
