"""The hub's survival desk (``POST /api/survival``): Kaplan-Meier curves with the log-rank test, and Cox models.

Each is a few queries of kind ``survival`` on the query line (``coordinator.models.Asking``), the sites answering
under their own rules (``site_agent.queries.survival_steps``): no exact time leaves a site.

- **Kaplan-Meier**: with a group, a levels stage (the group's levels, agreed as the union); then each site's counts
  per bin it kept; the hub pools them on the edges every site kept (``flip_core.kaplan_meier``), and gives each
  group's curve with its 95% band, the numbers at risk, and the log-rank test across the groups. Each site's merges
  come back as its sentences.
- **Cox**: with a categorical term, a levels stage; then Newton-Raphson at coefficients the hub chooses
  (``flip_core.cox``): stratified by site over exact times, or binned with one baseline hazard, where the
  proportional-hazards check comes from the same sums at the fit. Hazard ratios with their intervals.

A site that says no at any stage is left out with its sentence and the analysis starts again without it.
"""

from __future__ import annotations

import time
from functools import reduce
from typing import Any

import numpy as np

from coordinator.models import Asking, SitesLeft, agreed_levels, asking, coefficient_table, until_agreed
from coordinator.queries import QueryDesk
from coordinator.service import Principal, TaskRejected
from flip_core.cox import BinSums, CoxFit, HazardsTestUndefined, Statistics, fit, fit_binned
from flip_core.cox import proportional_hazards_test as hazards_test
from flip_core.glm import NotConverged, parameter_names
from flip_core.kaplan_meier import CountsInvalid, curve, logrank, pool
from flip_core.models import SurvivalSpec, survival_formula
from flip_core.query import QueryKind


def survival(desk: QueryDesk, who: Principal, spec: SurvivalSpec) -> dict[str, Any]:
    """``spec`` answered across the online sites holding its dataset (or ``spec.sites``), blocking."""
    started = time.monotonic()
    columns: tuple[str, ...] = (spec.time, spec.event)
    if spec.kind == "cox":
        columns = tuple(dict.fromkeys((*columns, *survival_formula(spec.time, spec.event, spec.terms).columns())))
    elif spec.group:
        columns = (*columns, spec.group)
    what = f"Cox {spec.terms}" if spec.kind == "cox" else "Kaplan-Meier" + (f" by {spec.group}" if spec.group else "")
    sites = asking(desk, who, QueryKind.SURVIVAL, spec, columns,
                   f"{what}: {spec.time} until {spec.event} over {spec.dataset}")  # fmt: skip
    model = {"kind": spec.kind, "time": spec.time, "event": spec.event, "edges": list(spec.edges), "group": spec.group,
             "terms": spec.terms, "binned": spec.binned, "covariates": spec.covariates}  # fmt: skip
    head = {"kind": spec.kind, "dataset": spec.dataset, "time": spec.time, "event": spec.event,
            "where": sites.base["where"], "cohort": spec.cohort, "text": sites.base["text"]}  # fmt: skip
    if spec.kind == "km":
        body = until_agreed(sites, lambda: _kaplan_meier(sites, model, spec))
    else:
        try:
            body = until_agreed(sites, lambda: _cox(sites, model, spec))
        except NotConverged as exc:
            raise TaskRejected(f"the model did not fit: {exc}", 422) from None
    return {**head, **body, "refused": dict(sorted(sites.refused.items())),
            "seconds": time.monotonic() - started}  # fmt: skip


def _kaplan_meier(sites: Asking, model: dict[str, Any], spec: SurvivalSpec) -> dict[str, Any]:
    levels: list[str] = []
    if spec.group:
        levels = agreed_levels(sites.tables({**model, "stage": "levels"})).get(spec.group, [])
    tables = sites.tables({**model, "stage": "counts", "levels": levels})
    try:
        pooled = pool(list(tables.values()))
    except CountsInvalid as exc:
        raise TaskRejected(f"the sites' counts do not pool: {exc}", 502) from None
    curves = {
        level: {
            "time": c.time.tolist(),
            "at_risk": c.at_risk.tolist(),
            "events": c.events.tolist(),
            "censored": c.censored.tolist(),
            "survival": c.survival.tolist(),
            "ci_low": c.lower.tolist(),
            "ci_high": c.upper.tolist(),
        }  # fmt: skip
        for level, c in curve(pooled).items()
    }
    test = None
    if len(pooled.levels) > 1:
        found = logrank(pooled)
        test = {"statistic": found.statistic, "df": found.df, "p": found.p_value,
                "observed": dict(zip(found.levels, found.observed.tolist(), strict=True)),
                "expected": dict(zip(found.levels, found.expected.tolist(), strict=True))}  # fmt: skip
    return {
        "group": spec.group,
        "edges": list(spec.edges),
        "kept_edges": pooled.edges.tolist(),
        "curves": curves,
        "logrank": test,
        "sites": {
            site: {"rows": int(t["rows"]), "notes": list(t.get("notes", []))} for site, t in sorted(tables.items())
        },
        "rows": int(pooled.rows.sum()),
    }


def _cox(sites: Asking, model: dict[str, Any], spec: SurvivalSpec) -> dict[str, Any]:
    formula = survival_formula(spec.time, spec.event, spec.terms)
    levels: dict[str, list[str]] = {}
    if formula.categorical:
        levels = agreed_levels(sites.tables({**model, "stage": "levels"}))
    names = parameter_names(formula, levels)
    rows: dict[str, int] = {}

    def tables(beta: np.ndarray) -> dict[str, dict[str, Any]]:
        found = sites.tables({**model, "stage": "step", "levels": levels, "beta": [float(b) for b in beta]})
        rows.update({site: int(t["rows"]) for site, t in found.items()})
        return found

    test: dict[str, Any] | None = None
    if spec.binned:
        result, sums = fit_binned(lambda b: _summed([BinSums.from_dict(t["sums"]) for t in tables(b).values()]), names)
        test = _hazards(sums, result)
    else:
        result = fit(lambda b: _summed([Statistics.from_dict(t["statistics"]) for t in tables(b).values()]), names)
        if spec.edges:  # the hazards check: each site's binned sums at the fit, its own stratum
            test = _stratified_hazards(sites, {**model, "binned": True, "levels": levels}, result)
    return {
        "family": "cox",
        "binned": spec.binned,
        "formula": spec.terms,
        "levels": levels,
        "coefficients": coefficient_table(result),
        "rows": result.rows,
        "events": result.events,
        "iterations": result.iterations,
        "log_likelihood": result.log_likelihood,
        "deviance": -2.0 * result.log_likelihood,
        "hazards_test": test,
        "sites": {site: {"rows": n} for site, n in sorted(rows.items())},
        **({"edges": list(spec.edges)} if spec.edges else {}),
    }


def _summed(parts: list[Any]) -> Any:
    return reduce(lambda a, b: a + b, parts)


def _stratified_hazards(sites: Asking, model: dict[str, Any], result: CoxFit) -> dict[str, Any]:
    """A stratified fit's hazards check: one more question, each site's binned sums at the fitted coefficients (a
    site that says no to it leaves the fit as it is, and the check undone, saying why)."""
    try:
        found = sites.tables({**model, "stage": "step", "beta": [float(b) for b in result.params]})
    except SitesLeft as left:
        said = "; ".join(left.refused.values())
        return {"undefined": f"the proportional-hazards check needs every site's binned sums at the fit ({said})"}
    return _hazards([BinSums.from_dict(t["sums"]) for t in found.values()], result)


def _hazards(sums: BinSums | list[BinSums], result: CoxFit) -> dict[str, Any]:
    try:
        test = hazards_test(sums, result)
    except HazardsTestUndefined as exc:
        return {"undefined": str(exc)}
    return {"names": test.names, "statistics": test.statistics.tolist(), "pvalues": test.pvalues.tolist(),
            "global_statistic": test.global_statistic, "global_df": test.global_df,
            "global_pvalue": test.global_pvalue, "transform": test.transform}  # fmt: skip


__all__ = ["survival"]
