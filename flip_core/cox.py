"""Cox proportional hazards fitted across sites (issue 29): the hub's Newton-Raphson over the sites' summed
statistics, the fit's summary as lifelines' ``CoxPHFitter`` reports it, and the proportional-hazards check.

Two models, each exact for what it is:

- **Stratified by site** (:func:`fit` over :class:`Statistics`). Each site is its own stratum: the partial likelihood
  is a product over sites, so its logarithm, gradient and information are sums of each site's own, computed over the
  site's exact times (``site_agent.queries.cox.exact_statistics``). Newton-Raphson over those sums converges to the
  pooled stratified estimate: lifelines' ``CoxPHFitter().fit(pooled, ..., strata=["site"])``. A site's baseline
  hazard is its own (it need not be shared); no time leaves a site, only the sums over all its event times.
- **One baseline hazard over binned times** (:func:`fit_binned` over :class:`BinSums`). The approximation: every
  row's time is its binned time (``flip_core.survival``'s edges, coarsened at its site), and ties within a bin are
  taken by Efron's method. Efron's terms at bin ``k`` need the pooled sums over the events in ``k`` and over the
  risk set (rows whose binned time is ``>= e_k``) of ``exp(x'b)``, ``x exp(x'b)`` and ``x x' exp(x'b)``; each site
  sends its own per bin, the hub adds them and computes the partial likelihood of the pooled rows' binned times:
  exactly lifelines' unstratified fit on those rows (each binned at its own site's kept edges; at the researcher's
  edges where no site merged a bin).

The hub, trusted, chooses every coefficient a site is asked at (zero first, then Newton's steps); the researcher
sees only the fit. Newton-Raphson stops when its next step is under 1e-9 of the coefficients (lifelines'
``_newton_raphson_for_efron_model`` stops sooner, at a step or Newton decrement of 1e-7 or a log-likelihood change
of 1e-9: up to a few 1e-6 short of the maximum, so the tests compare with lifelines run to its maximum); where a step
lowers the log-likelihood it is halved. The coefficients and their standard errors do not depend on centring or
scaling the covariates (lifelines normalises them first; here they are fitted as they are).

The proportional-hazards check (:func:`proportional_hazards_test`) is Grambsch and Therneau's score test of ``theta``
in ``beta(t) = beta + theta g(t)`` at ``(beta_hat, 0)``, with ``g`` the mid-rank of a bin's events among all events
in time order (the "rank" transform, lifelines' default; a bin's tied events share their ranks' mean). The score
for ``theta`` is the sum over bins of ``g`` times the bin's Schoenfeld residual sum, and the test uses the full
information matrix of ``(beta, theta)``: per covariate (its ``theta`` alone, one degree of freedom) and global.
It is the kind of test R's ``cox.zph`` computes since survival 3.0 (not checked against R here), not lifelines'
``proportional_hazard_test``, which takes every event time's information as the average one (on Rossi's data its
p-values are smaller: age 0.0006 there, 0.015 here).

Pure: numpy and the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flip_core.errors import FlipError, RequestInvalid
from flip_core.glm import NotConverged
from flip_core.survival import chi2_sf

MAX_ITERATIONS = 100  # round trips to the sites (lifelines allows 500 Newton steps; it needs about 5)
PRECISION = 1e-9  # the next step's norm, relative to the coefficients' (Newton converges quadratically: one step
# more past lifelines' 1e-7 puts the coefficients at the maximum, to 1e-6 of their size and better)
SETTLED = 1e-15  # the log-likelihood's relative change at which it cannot move further (float64's own precision)
R_PRECISION = 1e-9  # the log-likelihood's relative change (lifelines' ``r_precision``, R's) and the Newton decrement
DECREMENT = 1e-7  # (lifelines' ``precision``): under either with a coefficient still moving, it may be infinite
# (R's check); lifelines stops at either, up to a few 1e-6 short of the maximum (2e-6 on Eunomia's data)
MAX_HALVINGS = 20
TOLERANCE_INFINITE = 10**-4.5  # R's coxph: a coefficient still moving more than this (relative) may be infinite
Z_975 = 1.959963984540054


class CoxInvalid(RequestInvalid):
    """Statistics from a site that do not fit the model asked (shapes, bins)."""


class HazardsTestUndefined(FlipError):
    """The proportional-hazards test cannot be computed from these bins (events in one bin only)."""


@dataclass
class Statistics:
    """One site's (or the sites' summed) log partial likelihood at one ``beta``, its gradient and its information
    (minus the Hessian), with the complete rows and events they are over."""

    log_likelihood: float
    gradient: np.ndarray
    information: np.ndarray
    rows: int
    events: int

    def __add__(self, other: Statistics) -> Statistics:
        return Statistics(self.log_likelihood + other.log_likelihood, self.gradient + other.gradient,
                          self.information + other.information, self.rows + other.rows,
                          self.events + other.events)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"log_likelihood": self.log_likelihood, "gradient": self.gradient.tolist(),
                "information": self.information.tolist(), "rows": self.rows, "events": self.events}  # fmt: skip

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> Statistics:
        return cls(float(body["log_likelihood"]), np.asarray(body["gradient"], dtype=np.float64),
                   np.asarray(body["information"], dtype=np.float64), int(body["rows"]),
                   int(body["events"]))  # fmt: skip


@dataclass
class BinSums:
    """Sums per bin at one ``beta``, ``w = exp(x'beta)``: events ``d``, ``sum x`` over them, and ``sum w``, ``sum w
    x``, ``sum w x x'`` over the risk set (``risk*``) and over the bin's events (``tie*``). ``bins`` are the bins
    the rows are for, increasing, out of ``n_bins``: a site's kept bins (each the last of its merged run; its rows
    at risk at a merged-away edge are those at risk at the next kept one), or every bin once summed at the hub.
    (A site's stratified statistics come from the same sums over its own event times, which never leave it.)"""

    n_bins: int
    bins: tuple[int, ...]
    events: np.ndarray  # (B,)
    event_x: np.ndarray  # (B, p)
    risk0: np.ndarray  # (B,)
    risk1: np.ndarray  # (B, p)
    risk2: np.ndarray  # (B, p, p)
    tie0: np.ndarray  # (B,)
    tie1: np.ndarray  # (B, p)
    tie2: np.ndarray  # (B, p, p)
    rows: int

    def expanded(self) -> BinSums:
        """The same sums on every bin: events only where a kept bin ends, the risk set of a merged-away bin's edge
        that of the next kept bin (none after the last)."""
        if self.bins == tuple(range(self.n_bins)):
            return self
        if any(b < 0 or b >= self.n_bins for b in self.bins) or list(self.bins) != sorted(set(self.bins)):
            raise CoxInvalid("a site's bins are not increasing bins of the model's edges")
        kept = np.asarray(self.bins, dtype=np.int64)
        every = np.arange(self.n_bins)
        source = np.searchsorted(kept, every, side="left")  # the next kept bin at or after each bin
        inside = source < len(kept)
        here = np.zeros(self.n_bins, dtype=bool)
        here[kept] = True

        def risk(values: np.ndarray) -> np.ndarray:
            out = np.zeros((self.n_bins, *values.shape[1:]))
            out[inside] = values[source[inside]]
            return out

        def tie(values: np.ndarray) -> np.ndarray:
            out = np.zeros((self.n_bins, *values.shape[1:]))
            out[here] = values
            return out

        return BinSums(self.n_bins, tuple(range(self.n_bins)), tie(self.events), tie(self.event_x), risk(self.risk0),
                       risk(self.risk1), risk(self.risk2), tie(self.tie0), tie(self.tie1), tie(self.tie2),
                       self.rows)  # fmt: skip

    def __add__(self, other: BinSums) -> BinSums:
        if self.n_bins != other.n_bins or self.event_x.shape[1:] != other.event_x.shape[1:]:
            raise CoxInvalid("the sites' bin sums are for different bins or covariates")
        a, b = self.expanded(), other.expanded()
        return BinSums(a.n_bins, a.bins, a.events + b.events, a.event_x + b.event_x, a.risk0 + b.risk0,
                       a.risk1 + b.risk1, a.risk2 + b.risk2, a.tie0 + b.tie0, a.tie1 + b.tie1, a.tie2 + b.tie2,
                       a.rows + b.rows)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"n_bins": self.n_bins, "bins": list(self.bins), "rows": self.rows}
        for name in _ARRAYS:
            body[name] = getattr(self, name).tolist()
        return body

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> BinSums:
        arrays = {name: np.asarray(body[name], dtype=np.float64) for name in _ARRAYS}
        sums = cls(int(body["n_bins"]), tuple(int(b) for b in body["bins"]), rows=int(body["rows"]), **arrays)
        width = sums.event_x.shape[1] if sums.event_x.ndim == 2 else -1
        shapes = {"events": (), "event_x": (width,), "risk0": (), "risk1": (width,), "risk2": (width, width),
                  "tie0": (), "tie1": (width,), "tie2": (width, width)}  # fmt: skip
        if width < 0 or any(arrays[n].shape != (len(sums.bins), *shape) for n, shape in shapes.items()):
            raise CoxInvalid("a site's bin sums do not have the shapes of its bins and the model's covariates")
        return sums


_ARRAYS = ("events", "event_x", "risk0", "risk1", "risk2", "tie0", "tie1", "tie2")


@dataclass
class EfronTerms:
    """Efron's log partial likelihood at ``beta``, and per bin with events its Schoenfeld residual sum (the
    gradient's part) and its information."""

    log_likelihood: float
    bins: np.ndarray  # the bins with events
    residuals: np.ndarray  # (B, p)
    information: np.ndarray  # (B, p, p)


def efron(sums: BinSums, beta: np.ndarray) -> EfronTerms:
    """Efron's terms from the sums: at a bin with ``d`` events, for ``l = 0..d-1`` and ``f = l/d``, the denominator
    ``risk0 - f tie0``, the mean ``(risk1 - f tie1) / den`` and the second moment ``(risk2 - f tie2) / den``."""
    has = np.flatnonzero(np.round(sums.events) > 0)
    d = np.round(sums.events[has]).astype(np.int64)
    k = np.repeat(np.arange(len(has)), d)
    f = (np.arange(int(d.sum())) - np.repeat(np.cumsum(d) - d, d)) / d[k]
    den = sums.risk0[has][k] - f * sums.tie0[has][k]
    if not (den > 0).all():
        raise NotConverged("a risk set's sum is not positive: the coefficients are too large for the data")

    def per_bin(values: np.ndarray) -> np.ndarray:
        return np.bincount(k, weights=values, minlength=len(has))

    s_a, s_b = per_bin(1 / den), per_bin(f / den)
    s_c, s_d, s_e = per_bin(1 / den**2), per_bin(f / den**2), per_bin(f**2 / den**2)
    r1, t1 = sums.risk1[has], sums.tie1[has]
    event_x = sums.event_x[has]
    log_likelihood = float((event_x @ beta).sum() - np.log(den).sum())
    residuals = event_x - (r1 * s_a[:, None] - t1 * s_b[:, None])
    second = sums.risk2[has] * s_a[:, None, None] - sums.tie2[has] * s_b[:, None, None]
    rr = np.einsum("ka,kb->kab", r1, r1)
    rt = np.einsum("ka,kb->kab", r1, t1)
    tt = np.einsum("ka,kb->kab", t1, t1)
    means = rr * s_c[:, None, None] - (rt + rt.transpose(0, 2, 1)) * s_d[:, None, None] + tt * s_e[:, None, None]
    return EfronTerms(log_likelihood, has, residuals, second - means)


def efron_statistics(sums: BinSums, beta: np.ndarray) -> Statistics:
    """The log partial likelihood, gradient and information at ``beta`` from the sums (summed over bins)."""
    terms = efron(sums, beta)
    return Statistics(terms.log_likelihood, terms.residuals.sum(axis=0), terms.information.sum(axis=0), sums.rows,
                      int(round(float(sums.events.sum()))))  # fmt: skip


@dataclass
class CoxFit:
    """A fitted Cox model as lifelines' ``CoxPHFitter.summary`` reports it."""

    names: list[str]
    params: np.ndarray
    bse: np.ndarray
    log_likelihood: float
    null_log_likelihood: float  # at beta = 0
    rows: int
    events: int
    iterations: int  # round trips to the sites (one ``ask`` each), step-halvings included
    statistics: Statistics  # the summed statistics at ``params``

    def z(self) -> np.ndarray:
        return np.asarray(self.params / self.bse, dtype=np.float64)

    def pvalues(self) -> np.ndarray:
        return np.array([normal_sf2(z) for z in self.z()])

    def conf_int(self) -> np.ndarray:
        return np.column_stack([self.params - Z_975 * self.bse, self.params + Z_975 * self.bse])

    def hazard_ratios(self) -> np.ndarray:
        return np.asarray(np.exp(self.params), dtype=np.float64)

    def hazard_ratio_conf_int(self) -> np.ndarray:
        return np.asarray(np.exp(self.conf_int()), dtype=np.float64)


def normal_sf2(z: float) -> float:
    """The two-sided normal p-value of ``z``."""
    return math.erfc(abs(z) / math.sqrt(2))


def fit(ask: Callable[[np.ndarray], Statistics], names: Sequence[str]) -> CoxFit:
    """Newton-Raphson from zero: ``ask(beta)`` is the sum of the sites' statistics at ``beta`` (one round trip);
    a step that lowers the log-likelihood is halved (at most :data:`MAX_HALVINGS` times). Stops as lifelines does;
    the summary is of the last coefficients asked at, from the statistics there. Where the next step would still
    move a coefficient (R's check for an infinite one), one more step is taken; still moving, NotConverged."""
    beta = np.zeros(len(names))
    total = ask(beta)
    asked, null, previous, confirming = 1, total.log_likelihood, None, False
    while True:
        if not (np.isfinite(total.log_likelihood) and np.isfinite(total.information).all()):
            raise NotConverged("the log partial likelihood is not finite at the coefficients reached")
        try:
            delta = np.linalg.solve(total.information, total.gradient)
        except np.linalg.LinAlgError:
            raise NotConverged("the model's covariates are collinear over the sites' rows: drop one") from None
        change = abs(total.log_likelihood - previous) / -previous if previous else math.inf
        if float(np.linalg.norm(delta)) < PRECISION * (1.0 + float(np.linalg.norm(beta))) or change < SETTLED:
            bse = np.sqrt(np.diag(np.linalg.inv(total.information)))
            return CoxFit(list(names), beta, bse, total.log_likelihood, null, total.rows, total.events, asked, total)
        moving = np.flatnonzero(np.abs(delta) > TOLERANCE_INFINITE * (1 + np.abs(beta)))
        settled = change < R_PRECISION or float(total.gradient @ delta) / 2 < DECREMENT  # little left to gain
        if settled and len(moving):
            if confirming:
                raise NotConverged(f"the coefficient of {names[moving[0]]!r} may be infinite: the log-likelihood "
                                   "stopped changing while it still moved (does it separate the events?)")  # fmt: skip
            confirming = True  # one more step: slow to settle, or going to infinity?
        step = 1.0
        for _ in range(MAX_HALVINGS + 1):
            if asked >= MAX_ITERATIONS:
                raise NotConverged(f"the fit did not converge in {MAX_ITERATIONS} round trips (separated data?)")
            candidate = ask(beta + step * delta)
            asked += 1
            if candidate.log_likelihood >= total.log_likelihood:  # NaN compares False: halved too
                break
            step /= 2
        else:
            raise NotConverged("no step along Newton's direction raises the log partial likelihood")
        previous, beta, total = total.log_likelihood, beta + step * delta, candidate


def fit_binned(ask: Callable[[np.ndarray], BinSums], names: Sequence[str]) -> tuple[CoxFit, BinSums]:
    """:func:`fit` over binned times: ``ask(beta)`` is the sum of the sites' :class:`BinSums` at ``beta``. Returns
    the fit and the summed sums at its coefficients (what :func:`proportional_hazards_test` needs: no more asking)."""
    seen: list[tuple[np.ndarray, BinSums]] = []

    def statistics(beta: np.ndarray) -> Statistics:
        sums = ask(beta).expanded()
        seen.append((beta.copy(), sums))
        return efron_statistics(sums, beta)

    result = fit(statistics, names)
    return result, next(s for b, s in reversed(seen) if np.array_equal(b, result.params))


@dataclass
class HazardsTest:
    """Grambsch and Therneau's test of proportional hazards: a chi-square statistic and p-value per covariate
    (one degree of freedom each) and for all together."""

    names: list[str]
    statistics: np.ndarray
    pvalues: np.ndarray
    global_statistic: float
    global_df: int
    global_pvalue: float
    transform: str = "rank"


def event_ranks(events: np.ndarray) -> np.ndarray:
    """Each bin's ``g``: the mean rank of its events among all events in time order (none where it has none)."""
    d = np.asarray(events, dtype=np.float64)
    return np.cumsum(d) - d + (d + 1) / 2


def proportional_hazards_test(sums: BinSums | Sequence[BinSums], fitted: CoxFit) -> HazardsTest:
    """The score test of ``theta = 0`` in ``beta(t) = beta + theta g(t)`` at the fit, from the summed sums at its
    coefficients, or for a model stratified by site from each site's own (its stratum's: the score and information
    are sums over strata, ``g`` the ranks of the bins' events over all of them); ``g`` centred at its mean over
    events (the test does not change: the score of ``beta`` is in)."""
    strata = [s.expanded() for s in ([sums] if isinstance(sums, BinSums) else sums)]
    if len({s.n_bins for s in strata}) != 1:
        raise CoxInvalid("the strata's sums are for different bins")
    every = np.sum([np.round(s.events) for s in strata], axis=0)
    if int((every > 0).sum()) < 2:
        raise HazardsTestUndefined(
            "the proportional-hazards test needs events in more than one bin (the sites' bins merged)"
        )
    ranks = event_ranks(every)
    terms = [efron(s, fitted.params) for s in strata]
    g = np.concatenate([ranks[t.bins] for t in terms])
    d = np.concatenate([np.round(s.events[t.bins]) for s, t in zip(strata, terms, strict=True)])
    residuals = np.concatenate([t.residuals for t in terms])
    information_per_bin = np.concatenate([t.information for t in terms])
    g = g - (g * d).sum() / d.sum()
    p = len(fitted.names)
    score = np.concatenate([residuals.sum(axis=0), g @ residuals])
    v, gv, ggv = (np.einsum("k,kab->ab", g**power, information_per_bin) for power in (0, 1, 2))
    information = np.block([[v, gv], [gv, ggv]])
    statistics = np.empty(p)
    try:
        for j in range(p):
            index = [*range(p), p + j]
            statistics[j] = score[index] @ np.linalg.solve(information[np.ix_(index, index)], score[index])
        overall = float(score @ np.linalg.solve(information, score))
    except np.linalg.LinAlgError:
        raise HazardsTestUndefined(
            "the proportional-hazards test's information is singular: too few bins with events"
        ) from None
    return HazardsTest(list(fitted.names), statistics, np.array([chi2_sf(s, 1) for s in statistics]), overall, p,
                       chi2_sf(overall, p))  # fmt: skip


__all__ = [
    "BinSums",
    "CoxFit",
    "CoxInvalid",
    "EfronTerms",
    "HazardsTest",
    "MAX_ITERATIONS",
    "Statistics",
    "HazardsTestUndefined",
    "chi2_sf",
    "efron",
    "efron_statistics",
    "event_ranks",
    "fit",
    "fit_binned",
    "normal_sf2",
    "proportional_hazards_test",
]
