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
from functools import reduce
from typing import Any

import numpy as np

from coordinator.queries import QueryDesk, request_for
from coordinator.service import Principal, TaskRejected
from flip_core.api import QuerySpec
from flip_core.filters import parse as parse_filter
from flip_core.glm import NotConverged, Statistics, fit, parameter_names, parse_formula
from flip_core.models import GlmSpec
from flip_core.query import QueryKind, level_key
from flip_core.status import StepStatus

log = logging.getLogger(__name__)


class _Left(Exception):
    """Sites that refused a step: the fit starts again without them."""

    def __init__(self, refused: dict[str, str]) -> None:
        super().__init__(", ".join(refused))
        self.refused = refused


def fit_glm(desk: QueryDesk, who: Principal, spec: GlmSpec) -> dict[str, Any]:
    """Fit ``spec`` across the online sites holding its dataset (or ``spec.sites``); the fit's summary (blocking)."""
    started = time.monotonic()
    formula = parse_formula(spec.formula)
    as_query = QuerySpec(dataset=spec.dataset, kind=QueryKind.COUNT, where=spec.where, sites=spec.sites,
                         cohort=spec.cohort)  # fmt: skip
    targets, columns, offline = desk.targets(who, as_query)
    if spec.cohort is not None:
        targets, columns = desk.within(who, as_query, targets, columns)
    if missing := [c for c in formula.columns() if c not in columns]:
        raise TaskRejected(
            f"unknown column {missing[0]!r} in dataset {spec.dataset!r}: its columns are {', '.join(columns)}", 404
        )
    where = parse_filter(spec.where, columns).text
    text = spec.text or f"glm {spec.formula} ({spec.family}) over {spec.dataset}" + (f" where {where}" if where else "")
    base = {"where": where, "threshold": spec.threshold or 0, "text": text, "cohort": spec.cohort or ""}
    refused = {site: "offline" for site in offline}
    asking = list(targets)
    while True:
        try:
            rows: dict[str, int] = {}
            levels: dict[str, list[str]] = {}
            if formula.categorical:  # (without one, the first step says each site's rows)
                levels, rows = _levels(desk, who, spec, base, asking, refused)
            elif not asking:
                _levels(desk, who, spec, base, asking, refused)  # says no site fits it
            names = parameter_names(formula, levels)
            steps: list[float] = []
            ask = _asker(desk, who, spec, base, asking, levels, steps, rows)
            result = fit(ask, spec.family, names)
            break
        except _Left as left:
            refused.update(left.refused)
            asking = [t for t in asking if t["site"] not in left.refused]
        except NotConverged as exc:
            raise TaskRejected(f"the model did not fit: {exc}", 422) from None
    log.info("fitted %s over %s in %d iterations", spec.formula, ", ".join(rows), result.iterations)
    return {
        "dataset": spec.dataset,
        "formula": spec.formula,
        "family": spec.family,
        "where": where,
        "cohort": spec.cohort,
        "text": text,
        "levels": levels,
        "coefficients": _table(result),
        "rows": result.rows,
        "sites": {site: {"rows": n} for site, n in sorted(rows.items())},
        "refused": dict(sorted(refused.items())),
        "iterations": result.iterations,
        "deviance": result.deviance,
        "scale": result.scale,
        "seconds": {"total": time.monotonic() - started, "steps": steps},
    }


def _levels(
    desk: QueryDesk,
    who: Principal,
    spec: GlmSpec,
    base: dict[str, Any],
    asking: list[dict[str, Any]],
    refused: dict[str, str],
) -> tuple[dict[str, list[str]], dict[str, int]]:
    """The levels stage: each answering site's complete rows, and the categorical terms' agreed levels."""
    if not asking:
        said = "; ".join(f"{site}: {why}" for site, why in sorted(refused.items()))
        raise TaskRejected(f"no site fits this model ({said})", 409)
    model = {"formula": spec.formula, "family": spec.family, "stage": "levels", "sites": len(asking)}
    replies = desk.exchange(request_for(who, spec.dataset, QueryKind.GLM, model=model, **base), asking)
    answered, left = _split(replies, asking)
    if left:
        raise _Left(left)
    levels: dict[str, list[str]] = {}
    for reply in answered.values():
        for column, held in reply["table"]["levels"].items():
            levels[column] = sorted(set(levels.get(column, [])) | set(held), key=level_key)
    return levels, {site: int(r["table"]["rows"]) for site, r in answered.items()}


def _asker(
    desk: QueryDesk,
    who: Principal,
    spec: GlmSpec,
    base: dict[str, Any],
    asking: list[dict[str, Any]],
    levels: dict[str, list[str]],
    seconds: list[float],
    rows: dict[str, int],
) -> Any:
    """``ask(beta)`` for :func:`flip_core.glm.fit`: one step at every site, their statistics summed; each site's
    rows kept in ``rows``."""

    def ask(beta: np.ndarray) -> Statistics:
        started = time.monotonic()
        model = {"formula": spec.formula, "family": spec.family, "stage": "step", "levels": levels,
                 "beta": [float(b) for b in beta], "sites": len(asking)}  # fmt: skip
        replies = desk.exchange(request_for(who, spec.dataset, QueryKind.GLM, model=model, **base), asking)
        answered, left = _split(replies, asking)
        if left:
            raise _Left(left)
        rows.update({site: int(r["table"]["rows"]) for site, r in answered.items()})
        seconds.append(time.monotonic() - started)
        return reduce(lambda a, b: a + b, (Statistics.from_dict(r["table"]["statistics"]) for r in answered.values()))

    return ask


def _split(
    replies: list[dict[str, Any]], asking: list[dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The sites that answered a step, and those that did not (with their sentence; a site with no reply too)."""
    answered = {r["site"]: r for r in replies if r.get("status") == StepStatus.OK}
    left = {r["site"]: r.get("reason") or str(r.get("status")) for r in replies if r["site"] not in answered}
    left.update({t["site"]: "no answer" for t in asking if t["site"] not in answered and t["site"] not in left})
    return answered, left


def _table(result: Any) -> list[dict[str, Any]]:
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


__all__ = ["fit_glm"]
