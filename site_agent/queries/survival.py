"""A site's part in Kaplan-Meier curves and the log-rank test across sites (``flip_core.kaplan_meier``): its counts
of events and censorings per time bin, per group, over its own complete rows.

What leaves a site is, per group (a level agreed across sites, or one curve over all rows), its rows and, per bin
it kept, the events and censorings in it; the edges it kept (the upper edge of each kept run of the researcher's
bins) and the researcher's edges it dropped, each merge in a sentence. No time leaves, only which bin it fell in
(``flip_core.survival``: ``e_{k-1} < t <= e_k``, a row after the last edge censored there). Every count that leaves
is none or at least the site's threshold: a bin in which any group's events or censorings are fewer (but some) is
merged into the next one, over all groups together so that the groups share the site's kept edges
(``flip_core.survival.coarsen``). A zero leaves (that nobody in a group had the event between two edges is what the
curve shows).

Complete rows only: a row whose time, event or group is missing (a time that is not finite counts as missing) is
left out, and not counted. Before anything leaves, the site refuses (a sentence, no number of its data in it) when:

- its complete rows are fewer than its threshold;
- a group (a level named, agreed across sites) has fewer than the threshold's complete rows here, or none; or a
  row's group is a level the request does not name;
- the time or event column is not numeric, a time is below zero, or an event is not 0 or 1;
- no coarsening is safe (``coarsen`` finds none): too few events, or censorings, of some group here.

Pure: numpy (and pandas' notion of a missing group).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from flip_core.errors import FlipError
from flip_core.kaplan_meier import ONE_CURVE
from flip_core.survival import bin_index, checked_edges, coarsen, regroup
from site_agent.queries.statistics import level_label


class SurvivalRefused(FlipError):
    """This site will not release survival counts for this request; the sentence says why (no value of its data)."""


def km_counts(
    time: np.ndarray,
    event: np.ndarray,
    group: np.ndarray | None,
    edges: Sequence[float],
    threshold: int,
    levels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """This site's reply: ``{"edges": kept edges, "dropped": the researcher's edges merged away, "notes": a sentence
    per merge, "groups": {level: {"n": rows, "events": [per kept bin], "censored": [per kept bin]}}}``; one group,
    ``ONE_CURVE``, when ``group`` is None, else one per level of ``levels`` (the levels agreed across sites; a row's
    group is its value's level label, as the query path writes it: ``1.0`` is ``"1"``).
    SurvivalRefused (see the module's docstring) when any of it would tell a small count."""
    bounds = checked_edges(edges)
    if threshold < 1:
        raise SurvivalRefused("a site's threshold is a whole number of rows, at least 1")
    times, events, labels = _complete_rows(time, event, group)
    if len(times) < threshold:
        raise SurvivalRefused(f"fewer than {threshold} complete rows here for a survival curve")
    names = _groups(labels, levels, threshold)
    k, observed = bin_index(times, events, bounds)
    counts = np.zeros((len(bounds), 2 * len(names)), dtype=np.int64)
    for j, name in enumerate(names):
        rows = np.ones(len(times), dtype=bool) if labels is None else labels == name
        counts[:, 2 * j] = np.bincount(k[rows & observed], minlength=len(bounds))
        counts[:, 2 * j + 1] = np.bincount(k[rows & ~observed], minlength=len(bounds))
    kept = coarsen(counts, threshold)
    if not kept:
        raise SurvivalRefused(
            f"too few events or censorings here to count them in bins that each hold none or at least {threshold}"
        )
    summed = regroup(counts, kept)
    groups = {
        name: {
            "n": int(counts[:, 2 * j].sum() + counts[:, 2 * j + 1].sum()),
            "events": [int(c) for c in summed[:, 2 * j]],
            "censored": [int(c) for c in summed[:, 2 * j + 1]],
        }
        for j, name in enumerate(names)
    }
    dropped = [bounds[i] for i in sorted(set(range(len(bounds))) - set(kept))]
    return {"edges": [bounds[i] for i in kept], "dropped": dropped, "notes": _notes(bounds, kept, threshold),
            "groups": groups}  # fmt: skip


def _complete_rows(
    time: np.ndarray, event: np.ndarray, group: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The rows with a finite time, an event and a group; refused when a column is not numeric, a time is below
    zero or an event is not 0 or 1."""
    time, event = np.asarray(time), np.asarray(event)
    if time.dtype.kind not in "iuf":
        raise SurvivalRefused("the time column is not numeric: a survival time is a number of days (or weeks...)")
    if event.dtype.kind not in "biuf":
        raise SurvivalRefused("the event column is not numeric: an event is 1 (it happened) or 0 (censored)")
    if time.shape != event.shape or time.ndim != 1 or (group is not None and np.shape(group) != time.shape):
        raise SurvivalRefused("the time, event and group columns are not one value per row each")
    times, events = time.astype(np.float64), event.astype(np.float64)
    complete = np.isfinite(times) & ~np.isnan(events)
    labels = None
    if group is not None:
        values = np.asarray(group, dtype=object)
        complete &= ~pd.isna(values)
        labels = np.asarray([level_label(v) for v in values[complete]], dtype=object)
    times, events = times[complete], events[complete]
    if (times < 0).any():
        raise SurvivalRefused("a survival time here is below zero: a time is a duration from the index date")
    if not np.isin(events, (0.0, 1.0)).all():
        raise SurvivalRefused("the event column holds values other than 0 and 1 here: an event is 1, a censoring 0")
    return times, events.astype(bool), labels


def _groups(labels: np.ndarray | None, levels: Sequence[str] | None, threshold: int) -> list[str]:
    """The groups counted: the levels named, each held by at least the threshold's rows here, and no other."""
    if labels is None:
        return [ONE_CURVE]
    if not levels:
        raise SurvivalRefused("a curve per group needs the groups' levels named (agreed across sites)")
    names = [str(level) for level in levels]
    if len(set(names)) != len(names):
        raise SurvivalRefused("a level is named twice among the groups")
    if set(labels) - set(names):
        raise SurvivalRefused("a row's group here is a level the request does not name")
    for name in names:
        if int((labels == name).sum()) < threshold:
            raise SurvivalRefused(f"the group {name!r} has fewer than {threshold} complete rows here (or none)")
    return names


def _notes(bounds: Sequence[float], kept: Sequence[int], threshold: int) -> list[str]:
    """A sentence per merged run of bins: ``merged (30, 60] into (60, 90]: ...``."""
    notes = []
    starts = [0, *[k + 1 for k in kept[:-1]]]
    for start, end in zip(starts, kept, strict=True):
        if end > start:
            notes.append(
                f"merged {_interval(bounds, start, end - 1)} into {_interval(bounds, end, end)}: fewer than "
                f"{threshold} events or censorings there"
            )
    return notes


def _interval(bounds: Sequence[float], first: int, last: int) -> str:
    """Bins ``first..last`` as one interval: ``(e_{first-1}, e_last]``; the first bin from zero, ``[0, e_0]``."""
    upper = level_label(bounds[last])
    if first == 0:
        return f"[0, {upper}]" if bounds[0] >= 0 else f"(-inf, {upper}]"
    return f"({level_label(bounds[first - 1])}, {upper}]"


__all__ = ["SurvivalRefused", "km_counts"]
