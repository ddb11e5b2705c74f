"""A site's part in a Cox model fitted across sites (``flip_core.cox``): its rows (time, event, covariates) over its
own complete rows, what its rules let it release of them, and its statistics at the coefficients the hub asks at.

What leaves a site at each ``beta`` the hub chooses (the researcher never does):

- **stratified by site**: the log partial likelihood (Efron's ties, over the site's exact times), its gradient (p),
  its information (p x p), and the complete rows and events counted. Each is a sum over all of the site's event
  times, never a time or a row: the GLM's ``X'WX`` and ``X'Wz`` in kind.
- **binned**: per kept bin (the researcher's edges, coarsened here), the events ``d_k``, ``sum x`` over them, and
  ``sum w``, ``sum w x``, ``sum w x x'`` (``w = exp(x'beta)``) over the rows at risk at the bin's edge and over its
  events. At ``beta = 0`` (the hub's first question) these are counts and plain sums, so the bins are first
  coarsened (``flip_core.survival.coarsen``) until in every bin the events and the censorings, all of them and on
  each side of every 0/1 covariate, are none or at least the threshold: a bin's events, ``sum x`` over them for a
  0/1 ``x`` (its events with ``x = 1``), the number at risk (the rows at or after the bin, a sum of safe counts)
  and the difference between two bins' risk sets (the rows leaving in between: events plus censorings of the bins
  between, each none or at least the threshold, on each side of each 0/1 covariate) are then sums over no rows or
  at least the threshold's. Not coarsened: the cross-products of two 0/1 covariates (``x x'``, the rows with both)
  per bin, as the GLM's ``X'X`` releases them over all rows.

Before any of it leaves, the site refuses (a sentence, no number of its data in it) when:

- a column is missing or not numeric, a time is negative (or not finite), or an event is not 0 or 1;
- its complete rows, or their events, are fewer than its threshold; or the model's parameters are more than its
  parameter fraction (default 0.2, as the GLM's) of its events: a Cox model's information is carried by its events;
- a 0/1 covariate has fewer than the threshold's rows, or events, on either side;
- binned: even all its bins merged into one leave a small count (``coarsen`` keeps none).

Pure: pandas and numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from flip_core.cox import BinSums, Statistics, efron_statistics
from flip_core.survival import bin_index, checked_edges, coarsen
from site_agent.queries.glm import DEFAULT_PARAMETER_FRACTION, ModelRefused

if TYPE_CHECKING:
    import pandas as pd


def cox_rows(
    table: pd.DataFrame, time: str, event: str, covariates: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The times, 0/1 events (as booleans) and covariates (n x p) over the table's complete rows."""
    columns = list(dict.fromkeys((time, event, *covariates)))
    if len(columns) != 2 + len(covariates):
        raise ModelRefused("the time, the event and each covariate are different columns")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ModelRefused(f"this site's table has no column {missing[0]!r}")
    rows = table[columns].dropna()
    values = {name: _numeric(rows[name], name) for name in columns}
    times = values[time]
    if not np.isfinite(times).all() or (times < 0).any():
        raise ModelRefused(f"a survival time is a number at least zero; {time!r} has one that is not here")
    if not np.isin(values[event], (0.0, 1.0)).all():
        raise ModelRefused(f"an event is 0 or 1; {event!r} has another value here")
    x = np.column_stack([values[c] for c in covariates]) if covariates else np.zeros((len(rows), 0))
    if not np.isfinite(x).all():
        raise ModelRefused("a covariate has a value here that is not a finite number")
    return times, values[event] == 1.0, x


def binary_columns(x: np.ndarray) -> list[int]:
    """The covariates that are 0 or 1 in every row."""
    return [j for j in range(x.shape[1]) if np.isin(x[:, j], (0.0, 1.0)).all()]


def check_cox(
    table: pd.DataFrame,
    time: str,
    event: str,
    covariates: Sequence[str],
    threshold: int,
    fraction: float = DEFAULT_PARAMETER_FRACTION,
    edges: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Refuse (ModelRefused) a Cox model whose statistics here would tell a small count or be carried by too few
    events; with ``edges``, the binned model (whose bins are coarsened here). Else its rows (:func:`cox_rows`)."""
    times, events, x = cox_rows(table, time, event, covariates)
    n, p = x.shape
    if n < threshold:
        raise ModelRefused(f"fewer than {threshold} complete rows here for this model")
    if int(events.sum()) < threshold:
        raise ModelRefused(f"fewer than {threshold} events in this site's complete rows for this model")
    if p > fraction * int(events.sum()):
        raise ModelRefused(f"the model has {p} parameters, more than {fraction:g} of this site's events allows")
    for j in binary_columns(x):
        ones = x[:, j] == 1.0
        if min(int(ones.sum()), int((~ones).sum())) < threshold:
            raise ModelRefused(
                f"{covariates[j]} is 0 or 1, and one of them is held by fewer than {threshold} rows here"
            )
        if min(int((ones & events).sum()), int((~ones & events).sum())) < threshold:
            raise ModelRefused(f"{covariates[j]} is 0 or 1, and one of them has fewer than {threshold} events here")
    if edges is not None and not kept_bins(times, events, x, edges, threshold):
        raise ModelRefused(f"even in a single bin, this site's events or censorings are fewer than {threshold}")
    return times, events, x


def exact_statistics(time: np.ndarray, event: np.ndarray, x: np.ndarray, beta: np.ndarray) -> Statistics:
    """Efron's log partial likelihood, gradient and information at ``beta`` over this site's exact times (its
    stratum). The covariates are centred at their mean here first: the partial likelihood does not change."""
    time, event = np.asarray(time, dtype=np.float64), np.asarray(event, dtype=bool)
    x = np.asarray(x, dtype=np.float64)
    moments = np.unique(time[event])  # the event times, increasing
    slot = np.searchsorted(moments, time, side="right") - 1  # the last event time each row is at risk at
    sums = _sums(slot, event, x - x.mean(axis=0), beta, len(moments), len(time))
    return efron_statistics(sums, beta)


def kept_bins(time: np.ndarray, event: np.ndarray, x: np.ndarray, edges: Sequence[float], threshold: int) -> list[int]:
    """The bins kept here: every bin's events and censorings, all and on each side of each 0/1 covariate, none or
    at least ``threshold`` (``coarsen``); empty when even one bin of all is not."""
    k, happened = bin_index(time, event, checked_edges(edges))
    n_bins = len(edges)
    groups = [np.ones(len(time), dtype=bool)]
    for j in binary_columns(x):
        groups += [x[:, j] == 1.0, x[:, j] == 0.0]
    columns = [np.bincount(k[g & flag], minlength=n_bins) for g in groups for flag in (happened, ~happened)]
    return coarsen(np.column_stack(columns), threshold)


def binned_sums(
    time: np.ndarray, event: np.ndarray, x: np.ndarray, beta: np.ndarray, edges: Sequence[float], threshold: int
) -> BinSums:
    """The binned model's sums at ``beta`` over this site's kept bins; ModelRefused where none is kept."""
    x = np.asarray(x, dtype=np.float64)
    kept = kept_bins(time, event, x, edges, threshold)
    if not kept:
        raise ModelRefused(f"even in a single bin, this site's events or censorings are fewer than {threshold}")
    k, happened = bin_index(time, event, checked_edges(edges))
    slot = np.searchsorted(np.asarray(kept), k, side="left")  # each row's kept bin (the end of its merged run)
    sums = _sums(slot, happened, x, beta, len(kept), len(time))
    return BinSums(len(edges), tuple(kept), sums.events, sums.event_x, sums.risk0, sums.risk1, sums.risk2, sums.tie0,
                   sums.tie1, sums.tie2, sums.rows)  # fmt: skip


def _sums(slot: np.ndarray, event: np.ndarray, x: np.ndarray, beta: np.ndarray, slots: int, rows: int) -> BinSums:
    """Per slot (0..slots-1), the sums Efron's terms need: a row is at risk at every slot up to its own (none where
    its slot is -1), an event at its own. ``x x'`` summed one pair of columns at a time (memory of one row's)."""
    p = x.shape[1]
    w = np.exp(x @ beta)
    at = slot >= 0
    slot, event, x, w = slot[at], event[at], x[at], w[at]

    def by_slot(values: np.ndarray, among: np.ndarray) -> np.ndarray:
        return np.bincount(slot[among], weights=values[among], minlength=slots)

    def moments(among: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        zero = by_slot(w, among)
        first = np.column_stack([by_slot(w * x[:, a], among) for a in range(p)]) if p else np.zeros((slots, 0))
        second = np.zeros((slots, p, p))
        for a in range(p):
            for b in range(a, p):
                second[:, a, b] = second[:, b, a] = by_slot(w * x[:, a] * x[:, b], among)
        return zero, first, second

    everyone = np.ones(len(slot), dtype=bool)
    leave0, leave1, leave2 = moments(everyone)  # the rows whose last slot at risk is each slot

    def at_risk(values: np.ndarray) -> np.ndarray:
        return np.asarray(np.cumsum(values[::-1], axis=0)[::-1])

    tie0, tie1, tie2 = moments(event)
    events = np.bincount(slot[event], minlength=slots).astype(np.float64)
    event_x = np.column_stack([by_slot(x[:, a], event) for a in range(p)]) if p else np.zeros((slots, 0))
    return BinSums(slots, tuple(range(slots)), events, event_x, at_risk(leave0), at_risk(leave1), at_risk(leave2),
                   tie0, tie1, tie2, rows)  # fmt: skip


def _numeric(column: pd.Series, name: str) -> np.ndarray:
    import pandas as pd

    if not pd.api.types.is_numeric_dtype(column.dtype):
        raise ModelRefused(f"column {name!r} is not numeric")
    return column.to_numpy(dtype=np.float64)


__all__ = ["binary_columns", "binned_sums", "check_cox", "cox_rows", "exact_statistics", "kept_bins"]
