"""Kaplan-Meier curves and the log-rank test across sites (issue 29), from each site's counts per bin.

Each site answers with its rows per group and, per bin it kept, the events and censorings of each group
(``site_agent.queries.survival.km_counts``: the bins of ``flip_core.survival``, coarsened there until every count is
none or at least its threshold). :func:`pool` puts the sites' counts on the edges every site kept (each site's runs
of bins nest in them) and sums them; the numbers at risk follow, per group, from its rows and the counts before each
bin. :func:`curve` is then the Kaplan-Meier estimate at those edges with Greenwood's variance and the 95% band that
lifelines' ``KaplanMeierFitter`` reports (the exponential Greenwood, "log-log", transform), and :func:`logrank` the
(multivariate) log-rank test across the groups, as lifelines' ``multivariate_logrank_test`` computes it. Both equal
what lifelines computes on the pooled rows' binned times (their time the upper edge of their bin, the pooled kept
one), exactly: no row, and no time within a bin, is needed.

Pure: numpy and the standard library.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flip_core.errors import FlipError
from flip_core.glm import Z_975
from flip_core.survival import chi2_sf

ONE_CURVE = "all"  # the one group's name when a site is asked for one curve, not a curve per group


class CountsInvalid(FlipError):
    """Sites' survival counts that do not pool: different groups, different researcher's edges, or malformed."""


@dataclass(frozen=True)
class Pooled:
    """The sites' counts summed on the edges every site kept: per group (``levels``, in the sites' order) its rows
    and, per kept bin (ending at ``edges[k]``), its events and censorings."""

    edges: np.ndarray  # (bins,)
    levels: tuple[str, ...]
    rows: np.ndarray  # (groups,)
    events: np.ndarray  # (groups, bins)
    censored: np.ndarray  # (groups, bins)
    sites: int = 1

    def at_risk(self) -> np.ndarray:
        """(groups, bins): the rows at risk at the start of each bin (not yet an event or censored before it)."""
        removed = self.events + self.censored
        before = np.cumsum(removed, axis=1) - removed
        return np.asarray(self.rows[:, None] - before)


@dataclass(frozen=True)
class Curve:
    """One group's Kaplan-Meier estimate at the pooled edges (``time``), as lifelines reports it there."""

    time: np.ndarray
    at_risk: np.ndarray  # at the start of each bin
    events: np.ndarray
    censored: np.ndarray
    survival: np.ndarray  # S(t) at each edge
    greenwood: np.ndarray  # Greenwood's sum of d / (n (n - d)) up to each edge: the variance of log S(t)
    lower: np.ndarray  # the 95% band, exponential Greenwood (lifelines' ``confidence_interval_``)
    upper: np.ndarray

    @property
    def variance(self) -> np.ndarray:
        """Greenwood's variance of S(t)."""
        return np.asarray(self.survival**2 * self.greenwood)


@dataclass(frozen=True)
class LogRank:
    """The log-rank test across the groups: chi-square ``statistic`` on ``df`` degrees of freedom."""

    statistic: float
    df: int
    p_value: float
    levels: tuple[str, ...]
    observed: np.ndarray  # events per group
    expected: np.ndarray  # expected events per group under equal hazards


def pool(site_counts: Sequence[Mapping[str, Any]]) -> Pooled:
    """The sites' replies (``km_counts``) summed on the edges every one of them kept; CountsInvalid when they do not
    pool (another set of groups, another last edge, counts that do not add up to a group's rows)."""
    if not site_counts:
        raise CountsInvalid("no site's counts to pool")
    replies = [_parsed(reply) for reply in site_counts]
    levels = replies[0][1]
    if any(r[1] != levels for r in replies):
        raise CountsInvalid("the sites counted different groups: every site is asked for the same levels")
    if len({float(r[0][-1]) for r in replies}) != 1:
        raise CountsInvalid("the sites' counts end at different edges: every site is asked for the same edges")
    common = sorted(set.intersection(*(set(map(float, r[0])) for r in replies)))
    edges = np.asarray(common, dtype=np.float64)
    rows = np.zeros(len(levels), dtype=np.int64)
    events = np.zeros((len(levels), len(edges)), dtype=np.int64)
    censored = np.zeros_like(events)
    for site_edges, _, site_rows, site_events, site_censored in replies:
        target = np.searchsorted(edges, site_edges, side="left")  # each site bin into the common bin holding it
        rows += site_rows
        for j in range(len(levels)):
            np.add.at(events[j], target, site_events[j])
            np.add.at(censored[j], target, site_censored[j])
    return Pooled(edges, levels, rows, events, censored, len(replies))


def curve(pooled: Pooled) -> dict[str, Curve]:
    """Each group's Kaplan-Meier curve at the pooled edges, with Greenwood's variance and lifelines' 95% band."""
    at_risk = pooled.at_risk()
    curves = {}
    for j, level in enumerate(pooled.levels):
        n = at_risk[j].astype(np.float64)
        d = pooled.events[j].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.where(d > 0, np.log(n - d) - np.log(n), 0.0)
            term = np.where((d > 0) & (n > d), d / (n * (n - d)), 0.0)  # lifelines: 0 where everyone had the event
        log_s = np.cumsum(step)
        greenwood = np.cumsum(term)
        lower, upper = _band(log_s, greenwood)
        curves[level] = Curve(
            pooled.edges.copy(), at_risk[j], pooled.events[j], pooled.censored[j], np.exp(log_s), greenwood, lower,
            upper,
        )  # fmt: skip
    return curves


def logrank(pooled: Pooled) -> LogRank:
    """The log-rank test of equal hazards across the groups, as ``lifelines.statistics.multivariate_logrank_test``
    computes it on the pooled rows' binned times (the hypergeometric variance; the last group left out)."""
    groups = len(pooled.levels)
    if groups < 2:
        raise CountsInvalid("a log-rank test compares at least two groups")
    n_ij = pooled.at_risk().T.astype(np.float64)  # (bins, groups)
    o_ij = pooled.events.T.astype(np.float64)
    d = o_ij.sum(axis=1)
    n = n_ij.sum(axis=1)
    keep = d > 0  # a bin without events adds nothing
    n_ij, o_ij, d, n = n_ij[keep], o_ij[keep], d[keep], n[keep]
    expected_ij = n_ij * (d / n)[:, None]
    z = o_ij.sum(axis=0) - expected_ij.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(n > 1, (n - d) / (n - 1), 1.0)
    factor = ratio * d / n**2
    weighted = n_ij * factor[:, None]
    covariance = np.diag((weighted * n[:, None]).sum(axis=0)) - weighted.T @ n_ij
    head = z[:-1]
    statistic = float(head @ np.linalg.pinv(covariance[:-1, :-1]) @ head)
    df = groups - 1
    return LogRank(statistic, df, chi2_sf(statistic, df), pooled.levels, o_ij.sum(axis=0), expected_ij.sum(axis=0))


def _band(log_s: np.ndarray, greenwood: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """lifelines' ``KaplanMeierFitter._bounds``: exp(-exp(log(-log S) -+ z sqrt(var) / log S)), 1 where undefined
    (before the first event)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = Z_975 * np.sqrt(greenwood) / log_s
        lower = np.exp(-np.exp(np.log(-log_s) - spread))
        upper = np.exp(-np.exp(np.log(-log_s) + spread))
    return np.where(np.isnan(lower), 1.0, lower), np.where(np.isnan(upper), 1.0, upper)


def _parsed(reply: Mapping[str, Any]) -> tuple[np.ndarray, tuple[str, ...], np.ndarray, np.ndarray, np.ndarray]:
    """A site's reply as (kept edges, levels, rows, events, censored), checked."""
    try:
        edges = np.asarray(reply["edges"], dtype=np.float64)
        groups = reply["groups"]
        levels = tuple(str(level) for level in groups)
        rows = np.asarray([int(groups[level]["n"]) for level in levels], dtype=np.int64)
        events = np.asarray([groups[level]["events"] for level in levels], dtype=np.int64).reshape(len(levels), -1)
        censored = np.asarray([groups[level]["censored"] for level in levels], dtype=np.int64).reshape(events.shape)
    except (KeyError, TypeError, ValueError) as error:
        raise CountsInvalid(f"a site's survival counts are malformed ({type(error).__name__})") from error
    if not levels or edges.ndim != 1 or len(edges) == 0 or events.shape[1] != len(edges):
        raise CountsInvalid("a site's survival counts name no group, or not one count per kept edge")
    if not np.isfinite(edges).all() or (np.diff(edges) <= 0).any():
        raise CountsInvalid("a site's kept edges are not increasing finite numbers")
    if (events < 0).any() or (censored < 0).any() or ((events + censored).sum(axis=1) != rows).any():
        raise CountsInvalid("a site's events and censorings do not add up to its groups' rows")
    return edges, levels, rows, events, censored


__all__ = ["ONE_CURVE", "CountsInvalid", "Curve", "LogRank", "Pooled", "chi2_sf", "curve", "logrank", "pool"]
