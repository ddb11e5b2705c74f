"""The bodies of the routes that fit a model across sites (issue 29): ``POST /api/glm``.

A researcher names the model (its formula, parsed by ``flip_core.glm``, never evaluated; its family) and the rows
(a dataset, a filter, a frozen cohort, the sites); the hub, not the researcher, chooses each iteration's
coefficients, so no one can ask a site for its statistics at coefficients of their own making.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator

from flip_core.api import MAX_SITES, MAX_THRESHOLD, Body, CohortName, Name, SiteName, _refuse
from flip_core.glm import FormulaInvalid, parse_formula
from flip_core.query import MAX_QUERY_CHARS

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

    @field_validator("formula")
    @classmethod
    def _formula(cls, formula: str) -> str:
        try:
            parse_formula(formula)
        except FormulaInvalid as exc:
            raise _refuse(str(exc)) from None
        return formula


__all__ = ["MAX_FORMULA_CHARS", "GlmSpec"]
