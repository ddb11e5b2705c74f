"""The hub's model desk: a generalised linear model fitted exactly across sites (``POST /api/glm``).

The hub drives iteratively reweighted least squares (``flip_core.glm.fit``) over the query line: each step is a
query of kind ``glm`` to every site taking part, at coefficients the hub computed from the sites' summed statistics
of the step before. The researcher names the model and the rows, never the coefficients: a site's statistics at
coefficients of a researcher's choosing could be probed for its rows.

First, for a model with a categorical term, the ``levels`` stage: each site checks the model on its complete rows
and names its levels of each categorical term; the hub agrees the levels (their union, sorted as every site sorts
them: the first is the reference). A site that refuses then, or at any step (a level it lacks, a small cross of two
terms, its ledger), is left out with its sentence, and the fit starts again without it, so that every coefficient is
of the sites that answered every step. What the researcher gets: the coefficients with statsmodels' standard errors,
z, p-values and 95% intervals, each site's complete rows, the iterations and the sites that said no.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from typing import Any, TypeVar

import numpy as np

from coordinator.queries import QueryDesk, request_for
from coordinator.service import Principal, TaskRejected
from flip_core.api import QuerySpec
from flip_core.covariates import read_covariates
from flip_core.errors import FlipError
from flip_core.filters import parse as parse_filter
from flip_core.glm import MAX_PARAMETERS, Fit, Formula, NotConverged, Statistics, fit, parameter_names, parse_formula
from flip_core.models import GlmSpec
from flip_core.query import QueryKind, level_key
from flip_core.status import StepStatus

log = logging.getLogger(__name__)
T = TypeVar("T")


class SitesLeft(FlipError):
    """Sites that refused a step: the fit starts again without them."""

    def __init__(self, refused: dict[str, str]) -> None:
        super().__init__(", ".join(refused))
        self.refused = refused


@dataclass
class Asking:
    """One analysis's exchanges with its sites: who asks, of which dataset, under which filter and text, and the
    sites still asked (each step's replies in a sentence-keyed refusal when one says no)."""

    desk: QueryDesk
    who: Principal
    dataset: str
    kind: QueryKind
    base: dict[str, Any]
    sites: list[dict[str, Any]]
    refused: dict[str, str]

    def tables(self, model: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Each site's released table for ``model`` (its stage, with how many sites are asked); SitesLeft when any
        site said no, TaskRejected when no site is left to ask."""
        if not self.sites:
            said = "; ".join(
                why if why.startswith(f"{site}:") else f"{site}: {why}" for site, why in sorted(self.refused.items())
            )
            raise TaskRejected(f"no site fits this model ({said})", 409)
        request = request_for(self.who, self.dataset, self.kind, model={**model, "sites": len(self.sites)}, **self.base)
        replies = self.desk.exchange(request, self.sites)
        answered = {r["site"]: r["table"] for r in replies if r.get("status") == StepStatus.OK}
        left = {r["site"]: r.get("reason") or str(r.get("status")) for r in replies if r["site"] not in answered}
        left.update({t["site"]: "no answer" for t in self.sites if t["site"] not in answered and t["site"] not in left})
        if left:
            raise SitesLeft(left)
        return answered

    def leave_out(self, left: SitesLeft) -> None:
        self.refused.update(left.refused)
        self.sites = [t for t in self.sites if t["site"] not in left.refused]


def asking(
    desk: QueryDesk, who: Principal, kind: QueryKind, spec: Any, columns_named: tuple[str, ...], text: str
) -> Asking:
    """The sites to ask for ``spec`` (its dataset, filter, cohort, sites and threshold), its columns checked against
    what the sites announced; ``text`` the analysis in words (``{where}``: its filter's, as the sites read it)."""
    as_query = QuerySpec(dataset=spec.dataset, kind=QueryKind.COUNT, where=spec.where, sites=spec.sites,
                         cohort=spec.cohort)  # fmt: skip
    targets, columns, offline = desk.targets(who, as_query)
    if spec.cohort is not None:
        targets, columns = desk.within(who, as_query, targets, columns)
    if spec.covariates is not None:
        columns = columns + [c for c in declared(spec) if c not in columns]
    if missing := [c for c in columns_named if c not in columns]:
        raise TaskRejected(
            f"unknown column {missing[0]!r} in dataset {spec.dataset!r}: its columns are {', '.join(columns)}", 404
        )
    where = parse_filter(spec.where, columns).text
    words = spec.text or text + (f" where {where}" if where else "")
    base = {"where": where, "threshold": spec.threshold or 0, "text": words, "cohort": spec.cohort or ""}
    return Asking(desk, who, spec.dataset, kind, base, list(targets), {site: "offline" for site in offline})


def declared(spec: Any) -> list[str]:
    """The columns a covariate specification declares (built at each site for a dated cohort's persons)."""
    if spec.cohort is None:
        raise TaskRejected("covariates are built at a cohort's index dates: name a Circe cohort (--cohort)", 400)
    return read_covariates(spec.covariates).columns()


def agreed_levels(tables: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """The levels every site will use: the union of theirs, sorted as every site sorts them."""
    levels: dict[str, list[str]] = {}
    for table in tables.values():
        for column, held in table["levels"].items():
            levels[column] = sorted(set(levels.get(column, [])) | set(held), key=level_key)
    return levels


def until_agreed(sites: Asking, attempt: Callable[[], T]) -> T:
    """``attempt()`` again without the sites that said no, until every site left answers every step."""
    while True:
        try:
            return attempt()
        except SitesLeft as left:
            sites.leave_out(left)


def _glm_once(
    sites: Asking, spec: GlmSpec, formula: Formula
) -> tuple[Fit, dict[str, list[str]], dict[str, int], list[float]]:
    """One fit over the sites asked: its levels stage (a categorical term's), then IRLS, a step per round trip."""
    model = {"formula": spec.formula, "family": spec.family, "covariates": spec.covariates}
    rows: dict[str, int] = {}
    steps: list[float] = []
    levels: dict[str, list[str]] = {}
    if formula.categorical or not sites.sites:  # (without one, the first step says each site's rows)
        levels = agreed_levels(sites.tables({**model, "stage": "levels"}))

    def ask(beta: np.ndarray) -> Statistics:
        stepped = time.monotonic()
        tables = sites.tables({**model, "stage": "step", "levels": levels, "beta": [float(b) for b in beta]})
        rows.update({site: int(t["rows"]) for site, t in tables.items()})
        steps.append(time.monotonic() - stepped)
        return reduce(lambda a, b: a + b, (Statistics.from_dict(t["statistics"]) for t in tables.values()))

    names = parameter_names(formula, levels)
    if len(names) > MAX_PARAMETERS:
        raise TaskRejected(f"the model has {len(names)} parameters, more than the {MAX_PARAMETERS} a site fits", 400)
    return fit(ask, spec.family, names), levels, rows, steps


def fit_glm(desk: QueryDesk, who: Principal, spec: GlmSpec) -> dict[str, Any]:
    """Fit ``spec`` across the online sites holding its dataset (or ``spec.sites``); the fit's summary (blocking)."""
    started = time.monotonic()
    formula = parse_formula(spec.formula)
    sites = asking(desk, who, QueryKind.GLM, spec, formula.columns(),
                   f"glm {spec.formula} ({spec.family}) over {spec.dataset}")  # fmt: skip
    try:
        result, levels, rows, steps = until_agreed(sites, lambda: _glm_once(sites, spec, formula))
    except NotConverged as exc:
        raise TaskRejected(f"the model did not fit: {exc}", 422) from None
    log.info("fitted %s over %s in %d iterations", spec.formula, ", ".join(rows), result.iterations)
    return {
        "dataset": spec.dataset,
        "formula": spec.formula,
        "family": spec.family,
        "where": sites.base["where"],
        "cohort": spec.cohort,
        "text": sites.base["text"],
        "levels": levels,
        "coefficients": coefficient_table(result),
        "rows": result.rows,
        "sites": {site: {"rows": n} for site, n in sorted(rows.items())},
        "refused": dict(sorted(sites.refused.items())),
        "iterations": result.iterations,
        "deviance": result.deviance,
        "scale": result.scale,
        "seconds": {"total": time.monotonic() - started, "steps": steps},
    }


def coefficient_table(result: Any) -> list[dict[str, Any]]:
    intervals, z, p = result.conf_int(), result.z(), result.pvalues()
    return [
        {
            "name": name,
            "estimate": float(result.params[i]),
            "se": float(result.bse[i]),
            "z": float(z[i]),
            "p": float(p[i]),
            "ci_low": float(intervals[i, 0]),
            "ci_high": float(intervals[i, 1]),
        }  # fmt: skip
        for i, name in enumerate(result.names)
    ]


__all__ = ["Asking", "SitesLeft", "agreed_levels", "asking", "coefficient_table", "fit_glm", "until_agreed"]
