"""Generalised linear models fitted exactly across sites (issue 29, first part): the formula, the IRLS step from the
sites' summed statistics, and the fit's summary as statsmodels reports it.

DataSHIELD's ``ds.glm`` method. At each iteration every site computes, over its own complete rows and at the
current coefficients, ``X'WX`` and ``X'Wz`` (the working weights and response of iteratively reweighted least
squares, ``site_agent.queries.glm``), its deviance and its rows; their sums are exactly what one IRLS step over the
pooled rows needs, so the fit converges to the pooled maximum-likelihood estimate. Canonical links only: gaussian
(identity), binomial (logit), poisson (log).

A formula is parsed here, never evaluated: ``OUTCOME ~ TERM + TERM ...`` where the outcome is a column or
``I(column OP number)`` (OP one of ``> >= < <= == !=``, a 0/1 outcome), and a term is a column (numeric), ``C(column)``
(categorical: one indicator per level but the first, the levels agreed across sites beforehand), ``1`` or ``0``
(with or without the intercept, which is in by default).

Pure: numpy and the standard library.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flip_core.errors import FlipError, RequestInvalid

FAMILIES = ("gaussian", "binomial", "poisson")
MAX_TERMS = 50
MAX_PARAMETERS = 50  # a categorical term's levels included: what a site computes per step stays bounded
MAX_GROUPS = 20  # a Kaplan-Meier analysis's groups (each one's counts per bin leave, and pass the ledger)
MAX_ITERATIONS = 50
TOLERANCE = 1e-10  # on the deviance's relative change (statsmodels' GLM.fit stops at 1e-8)
Z_975 = 1.959963984540054
_COLUMN = r"[A-Za-z_][A-Za-z0-9_.]{0,99}"
_OUTCOME = re.compile(rf"^(?:(?P<col>{_COLUMN})|I\(\s*(?P<icol>{_COLUMN})\s*(?P<op>>=|<=|==|!=|>|<)\s*"
                      rf"(?P<num>-?\d+(?:\.\d+)?)\s*\))\Z")  # fmt: skip
_TERM = re.compile(rf"^(?:(?P<col>{_COLUMN})|C\(\s*(?P<cat>{_COLUMN})\s*\)|(?P<one>[01]))\Z")
OPERATORS = {">": np.greater, ">=": np.greater_equal, "<": np.less, "<=": np.less_equal, "==": np.equal,
             "!=": np.not_equal}  # fmt: skip


class FormulaInvalid(RequestInvalid):
    """A model formula that is not one FLIP fits; the sentence names the part."""


@dataclass(frozen=True)
class Formula:
    outcome: str  # the column
    numeric: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    intercept: bool = True
    threshold: tuple[str, float] | None = None  # the outcome as ``column OP number`` (0/1)
    terms: tuple[str, ...] = ()  # the right-hand side in the order written (columns, "C(col)")
    text: str = ""

    def columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.outcome, *self.numeric, *self.categorical)))


def parse_formula(text: str) -> Formula:
    """``text`` as a :class:`Formula`; FormulaInvalid in a sentence naming the part otherwise."""
    if not isinstance(text, str) or text.count("~") != 1:
        raise FormulaInvalid("a model formula is OUTCOME ~ TERM + TERM ..., with one '~'")
    left, right = (part.strip() for part in text.split("~"))
    outcome = _OUTCOME.match(left)
    if outcome is None:
        raise FormulaInvalid(f"the outcome {left[:60]!r} is not a column, nor I(column > number) and the like")
    terms = [t.strip() for t in right.split("+")]
    if len(terms) > MAX_TERMS:
        raise FormulaInvalid(f"a model of at most {MAX_TERMS} terms, please")
    numeric: list[str] = []
    categorical: list[str] = []
    written: list[str] = []
    intercept = True
    for term in terms:
        found = _TERM.match(term)
        if found is None:
            raise FormulaInvalid(f"the term {term[:60]!r} is not a column, C(column), 1 or 0")
        if found["one"] is not None:
            intercept = found["one"] == "1"
            continue
        name = found["col"] or found["cat"]
        if name in numeric or name in categorical:
            raise FormulaInvalid(f"the column {name!r} is in the formula twice")
        (categorical if found["cat"] else numeric).append(name)
        written.append(f"C({name})" if found["cat"] else name)
    column = outcome["col"] or outcome["icol"]
    if column in numeric or column in categorical:
        raise FormulaInvalid(f"the outcome {column!r} is a term of the model too")
    if not written and not intercept:
        raise FormulaInvalid("the model has no terms")
    threshold = (outcome["op"], float(outcome["num"])) if outcome["icol"] else None
    return Formula(column, tuple(numeric), tuple(categorical), intercept, threshold, tuple(written), text.strip())


def parameter_names(formula: Formula, levels: dict[str, list[str]]) -> list[str]:
    """The model's parameters, as statsmodels' formula API names them (``C(cp)[T.2]``)."""
    names = ["Intercept"] if formula.intercept else []
    for term in formula.terms:
        if term.startswith("C("):
            column = term[2:-1]
            names += [f"{term}[T.{level}]" for level in levels[column][1:]]
        else:
            names.append(term)
    return names


@dataclass
class Statistics:
    """One site's (or the sum of the sites') statistics at one iteration."""

    xtwx: np.ndarray
    xtwz: np.ndarray
    deviance: float
    rows: int
    pearson: float = 0.0  # sum of squared Pearson residuals (the gaussian scale)

    def __add__(self, other: Statistics) -> Statistics:
        return Statistics(
            self.xtwx + other.xtwx,
            self.xtwz + other.xtwz,
            self.deviance + other.deviance,
            self.rows + other.rows,
            self.pearson + other.pearson,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"xtwx": self.xtwx.tolist(), "xtwz": self.xtwz.tolist(), "deviance": self.deviance,
                "rows": self.rows, "pearson": self.pearson}  # fmt: skip

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> Statistics:
        return cls(np.asarray(body["xtwx"], dtype=np.float64), np.asarray(body["xtwz"], dtype=np.float64),
                   float(body["deviance"]), int(body["rows"]), float(body.get("pearson", 0.0)))  # fmt: skip


def step(total: Statistics) -> np.ndarray:
    """The next coefficients: the weighted least-squares solution of the summed statistics."""
    return np.linalg.solve(total.xtwx, total.xtwz)


def converged(previous: float | None, deviance: float) -> bool:
    return previous is not None and abs(deviance - previous) / (abs(deviance) + 0.1) < TOLERANCE


@dataclass
class Fit:
    """A fitted model as statsmodels' GLM summary reports it."""

    family: str
    names: list[str]
    params: np.ndarray
    bse: np.ndarray
    deviance: float
    rows: int
    iterations: int
    scale: float
    site_rows: dict[str, int] = field(default_factory=dict)

    def z(self) -> np.ndarray:
        return np.asarray(self.params / self.bse, dtype=np.float64)

    def pvalues(self) -> np.ndarray:
        return np.array([math.erfc(abs(z) / math.sqrt(2)) for z in self.z()])

    def conf_int(self) -> np.ndarray:
        return np.column_stack([self.params - Z_975 * self.bse, self.params + Z_975 * self.bse])


def summary(family: str, names: list[str], params: np.ndarray, at_params: Statistics, iterations: int) -> Fit:
    """The fit at converged ``params`` from the statistics summed there (``at_params``): its covariance is the
    inverse of X'WX times the scale (1, or for gaussian the Pearson chi-square over the residual degrees of
    freedom), as statsmodels computes it."""
    scale = 1.0 if family != "gaussian" else at_params.pearson / (at_params.rows - len(params))
    covariance = np.linalg.inv(at_params.xtwx) * scale
    return Fit(family, names, params, np.sqrt(np.diag(covariance)), at_params.deviance, at_params.rows, iterations,
               scale)  # fmt: skip


class NotConverged(FlipError):
    """The fit did not converge (a separated outcome, a model the data cannot determine)."""


def fit(ask: Callable[[np.ndarray], Statistics], family: str, names: list[str]) -> Fit:
    """IRLS from the start at zero: ``ask(beta)`` is the sum of the sites' statistics at ``beta`` (one round trip
    each); converged when the deviance's relative change is under :data:`TOLERANCE`, the summary taken from the
    statistics at the converged coefficients."""
    if family not in FAMILIES:
        raise FormulaInvalid(f"the family is one of {', '.join(FAMILIES)}, not {family!r}")
    beta, previous = np.zeros(len(names)), None
    for iteration in range(1, MAX_ITERATIONS + 1):
        total = ask(beta)
        if not np.isfinite(total.deviance):
            break
        if converged(previous, total.deviance) or (family == "gaussian" and iteration == 2):  # (least squares: one
            return summary(family, names, beta, total, iteration)  # step is the fit, the second ask its summary)
        previous = total.deviance
        try:
            beta = step(total)
        except np.linalg.LinAlgError:
            raise NotConverged("the model's terms are collinear over the sites' rows: drop one") from None
    raise NotConverged(f"the fit did not converge in {MAX_ITERATIONS} iterations (is the outcome separated?)")


__all__ = [
    "FAMILIES",
    "MAX_GROUPS",
    "MAX_PARAMETERS",
    "NotConverged",
    "fit",
    "Fit",
    "Formula",
    "FormulaInvalid",
    "Statistics",
    "converged",
    "parameter_names",
    "parse_formula",
    "step",
    "summary",
]
