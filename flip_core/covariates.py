"""A covariate specification: the per-person table a training task asks of an OMOP CDM database, declared as data.

OHDSI's FeatureExtraction idea, kept small. A task on an ``omop`` dataset may carry one (``%%flip_train
--covariates FILE.json``, ``client.train(..., covariates=...)``); each site builds the table from it with SQL of its
own making (``site_agent.data.omop_features``), one row per person of the run's cohort (or of the whole database),
and the cell's ``data.train`` and ``data.test`` are that table, split by person. No SQL and no text that reaches SQL
travels: concept ids are whole numbers, windows are whole days, names are column labels.

- ``demographics``: any of ``gender`` (the concept's name), ``age`` (in years at the index date), ``index_year``.
- ``features``: each a column ``name`` made of the rows of one ``domain`` (condition, drug, procedure,
  measurement, observation) whose concept is one of ``concepts`` (or, with ``descendants``, below one in the CDM's
  vocabulary), dated within ``window`` (days relative to the index date, both ends included): their ``presence``
  (0 or 1), their ``count``, or a measurement's ``last`` value (empty when there is none).
- ``outcome``: a concept set within a window after the index: column ``name`` (1 when it occurred, else 0) and
  ``name_days``, the days from the index to its first occurrence, or, censored, to the window's end or the end of
  the person's observation, whichever is first.

The index date is the cohort's (a Circe cohort's start date), or the start of observation without a cohort. The
specification, in its canonical JSON, is part of the code hash a site approves (``flip_core.cell.task_hash``).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_FEATURES = 200
MAX_CONCEPTS = 1000
MAX_DAYS = 36_500  # a window reaches at most a hundred years either side of the index
Demographic = Literal["gender", "age", "index_year"]
DEMOGRAPHICS: tuple[Demographic, ...] = ("gender", "age", "index_year")
DOMAINS = ("condition", "drug", "procedure", "measurement", "observation")
COLUMN = re.compile(r"^[a-z][a-z0-9_]{0,62}\Z")

Domain = Literal["condition", "drug", "procedure", "measurement", "observation"]
ConceptId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")


def _column(name: str) -> str:
    if not COLUMN.fullmatch(name):  # all of it: "$" alone would let a line's end through
        raise ValueError(f"{name[:70]!r} is not a column name (lower case letters, digits and _, a letter first)")
    return name


def _window(window: tuple[int, int], what: str) -> tuple[int, int]:
    lo, hi = window
    if not -MAX_DAYS <= lo <= hi <= MAX_DAYS:
        raise ValueError(f"{what}'s window {lo}..{hi} must run from its first day to its last, within ±{MAX_DAYS} days")
    return window


class ConceptSet(_Spec):
    name: str
    domain: Domain
    concepts: Annotated[list[ConceptId], Field(min_length=1, max_length=MAX_CONCEPTS)]
    descendants: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        return _column(name)


class Feature(ConceptSet):
    window: tuple[int, int] = (-365, 0)
    value: Literal["presence", "count", "last"] = "presence"

    @model_validator(mode="after")
    def _shape(self) -> Feature:
        _window(self.window, f"feature {self.name!r}")
        if self.value == "last" and self.domain != "measurement":
            raise ValueError(f"feature {self.name!r}: a last value is a measurement's, not a {self.domain}'s")
        return self


class Outcome(ConceptSet):
    window: tuple[int, int] = (1, 365)

    @model_validator(mode="after")
    def _shape(self) -> Outcome:
        _window(self.window, f"outcome {self.name!r}")
        if self.window[0] < 0:
            raise ValueError(f"outcome {self.name!r}: its window starts at the index date or after it")
        return self


class Covariates(_Spec):
    demographics: list[Demographic] = Field(default_factory=lambda: list(DEMOGRAPHICS))
    features: Annotated[list[Feature], Field(max_length=MAX_FEATURES)] = Field(default_factory=list)
    outcome: Outcome | None = None

    @model_validator(mode="after")
    def _unique(self) -> Covariates:
        names = [*self.demographics, *self.columns_of_features()]
        if self.outcome is not None:
            names += [self.outcome.name, f"{self.outcome.name}_days"]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"the column {twice[0]!r} is named twice in the covariate specification")
        return self

    def columns_of_features(self) -> list[str]:
        return [f.name for f in self.features]

    def columns(self) -> list[str]:
        """The table's columns, in order."""
        outcome = [] if self.outcome is None else [self.outcome.name, f"{self.outcome.name}_days"]
        return [*self.demographics, *self.columns_of_features(), *outcome]


def read_covariates(spec: Any) -> Covariates:
    """``spec`` (a dict, or its JSON text) as a checked specification; ValueError says, in a sentence, what is
    wrong and where."""
    from pydantic import ValidationError

    if isinstance(spec, (str, bytes)):
        try:
            spec = json.loads(spec)
        except ValueError as exc:
            raise ValueError(f"the covariate specification is not JSON ({exc})") from None
    if isinstance(spec, Covariates):
        return spec
    if not isinstance(spec, dict):
        raise ValueError(f"a covariate specification is a JSON object, not {type(spec).__name__}")
    try:  # as JSON, strictly: a concept id is a whole number, never the text of one
        return Covariates.model_validate_json(json.dumps(spec))
    except TypeError as exc:
        raise ValueError(f"the covariate specification is not JSON data ({exc})") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] in ("int_type", "int_parsing", "int_from_float"):
            message = f"must be a whole number, not {str(first.get('input'))[:40]!r}"
        raise ValueError(f"the covariate specification{f' at {where}' if where else ''}: {message}") from None


def _checked(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        return read_covariates(spec).model_dump(mode="json")
    except ValueError as exc:
        raise PydanticCustomError("flip", str(exc)) from None


# a request's field (flip_core.api.TaskSpec): the specification checked, in its full form
CovariateSpec = Annotated[dict[str, Any], AfterValidator(_checked)]


def canonical(spec: Covariates) -> str:
    """The specification's one text: what a site hashes with the cell's source."""
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


__all__ = [
    "DEMOGRAPHICS",
    "DOMAINS",
    "ConceptSet",
    "CovariateSpec",
    "Covariates",
    "Feature",
    "Outcome",
    "canonical",
    "read_covariates",
]
