"""The bodies of the routes that fit a model across sites (issue 29): ``POST /api/glm`` and ``POST /api/survival``.

A researcher names the model (its formula, parsed by ``flip_core.glm``, never evaluated; its family) and the rows
(a dataset, a filter, a frozen cohort, the sites); the hub, not the researcher, chooses each iteration's
coefficients, so no one can ask a site for its statistics at coefficients of their own making.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from flip_core.api import MAX_SITES, MAX_THRESHOLD, Body, CohortName, Name, SiteName, _refuse
from flip_core.covariates import CovariateSpec
from flip_core.glm import Formula, FormulaInvalid, parse_formula
from flip_core.query import MAX_QUERY_CHARS
from flip_core.survival import MAX_EDGES, EdgesInvalid, checked_edges

MAX_FORMULA_CHARS = 2000


class GlmSpec(Body):
    """``POST /api/glm``: a generalised linear model fitted exactly across the sites (IRLS over their summed
    statistics): linear (``gaussian``), logistic (``binomial``) or Poisson (``poisson``)."""

    dataset: Name
    formula: Annotated[str, StringConstraints(min_length=1, max_length=MAX_FORMULA_CHARS)]
    family: Literal["gaussian", "binomial", "poisson"] = "gaussian"
    where: Annotated[str, StringConstraints(max_length=MAX_QUERY_CHARS)] = ""
    cohort: CohortName | None = None
    sites: Annotated[list[SiteName], Field(min_length=1, max_length=MAX_SITES)] | None = None
    threshold: Annotated[int, Field(ge=1, le=MAX_THRESHOLD)] | None = None  # raises each site's, never lowers it
    text: Annotated[str, StringConstraints(max_length=MAX_QUERY_CHARS)] = ""
    covariates: CovariateSpec | None = None  # within an OMOP cohort: the declared per-person columns, built there

    @field_validator("formula")
    @classmethod
    def _formula(cls, formula: str) -> str:
        try:
            parse_formula(formula)
        except FormulaInvalid as exc:
            raise _refuse(str(exc)) from None
        return formula


class SurvivalSpec(Body):
    """``POST /api/survival``: a survival analysis across the sites, from each row's time (a column, at least zero)
    and event (a 0/1 column: 1, the event; 0, censored then), no exact time leaving a site.

    ``km``: Kaplan-Meier curves (per level of ``group``, or one) at the researcher's bin ``edges`` (each site counts
    events and censorings per bin and merges its small bins), with the log-rank test across the groups. ``cox``:
    a Cox proportional-hazards model of ``terms`` (``age + sex + C(arm)``, parsed, never evaluated): stratified by
    site over exact times (``binned`` false: exact, each site its own baseline hazard), or with one baseline hazard
    over the times binned at ``edges`` (``binned`` true: the approximation is the binning), with the proportional
    hazards check over the times binned at ``edges`` (for the stratified model, when edges are given: each site's
    sums at the fit are its stratum's)."""

    dataset: Name
    kind: Literal["km", "cox"]
    time: Name
    event: Name
    edges: Annotated[list[float], Field(max_length=MAX_EDGES)] = Field(default_factory=list)
    group: Name | None = None  # km: a curve per level of this column
    terms: Annotated[str, StringConstraints(max_length=MAX_FORMULA_CHARS)] = ""  # cox: the covariates
    binned: bool = False  # cox: one baseline hazard over binned times (else stratified by site, exact)
    where: Annotated[str, StringConstraints(max_length=MAX_QUERY_CHARS)] = ""
    cohort: CohortName | None = None
    sites: Annotated[list[SiteName], Field(min_length=1, max_length=MAX_SITES)] | None = None
    threshold: Annotated[int, Field(ge=1, le=MAX_THRESHOLD)] | None = None
    text: Annotated[str, StringConstraints(max_length=MAX_QUERY_CHARS)] = ""
    covariates: CovariateSpec | None = None  # within an OMOP cohort: the declared per-person columns, built there

    @model_validator(mode="after")
    def _shape(self) -> SurvivalSpec:
        if self.time == self.event:
            raise _refuse("the time and the event are two different columns")
        if self.kind == "km" or self.binned or self.edges:  # (a stratified Cox model's: its hazards check's bins)
            try:
                checked_edges(self.edges)
            except EdgesInvalid as exc:
                raise _refuse(f"{exc} (--edges)") from None
        if self.kind == "km" and self.terms.strip():
            raise _refuse("Kaplan-Meier curves take a group, not terms")
        if self.kind == "cox":
            if self.group is not None:
                raise _refuse("a Cox model takes terms (C(column) for a categorical one), not a group")
            try:
                survival_formula(self.time, self.event, self.terms)
            except FormulaInvalid as exc:
                raise _refuse(str(exc)) from None
        return self


def survival_formula(time: str, event: str, terms: str) -> Formula:
    """A Cox model's terms as a formula of ``flip_core.glm`` (the time its outcome, no intercept: the baseline
    hazard is none of its parameters)."""
    if not terms.strip():
        raise FormulaInvalid("a Cox model needs terms: the covariates, e.g. age + sex + C(arm)")
    formula = parse_formula(f"{time} ~ {terms} + 0")
    if formula.threshold is not None:
        raise FormulaInvalid("a Cox model's time is a column")
    if event in formula.columns():
        raise FormulaInvalid(f"the event {event!r} is a term of the model too")
    return formula


__all__ = ["MAX_FORMULA_CHARS", "GlmSpec", "SurvivalSpec", "survival_formula"]
