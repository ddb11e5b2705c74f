"""A site's part in a GLM fitted across sites (``flip_core.glm``): its design over its own complete rows, what its
rules let it release of them, and its statistics at the coefficients of one IRLS iteration.

What leaves a site per iteration is ``X'WX`` (p x p), ``X'Wz`` (p), the deviance and the rows counted: sums over at
least the threshold's number of rows, never a row. Before any of it leaves, the site refuses (a sentence, no
number of its data in it) when:

- its complete rows are fewer than its threshold, or the model's parameters are more than its
  ``glm_parameter_fraction`` of them (DataSHIELD's ``nfilter.glm``; default 0.2): with as many parameters as rows the
  statistics solve back to the rows;
- a level of a categorical term (the levels agreed across sites) is held by fewer than the threshold's rows here,
  or none: its indicator's diagonal entry of ``X'X`` would be that small count;
- a 0/1 column or a 0/1 outcome has fewer than the threshold's rows on either side: the same for its count of ones
  (the diagonal of ``X'X``, or the outcome's sum in ``X'Wz`` at the first iteration) and of zeros (with the rows);
- two 0/1 columns (or one and a 0/1 outcome) cross in a cell of fewer than the threshold's rows but some: ``X'X``'s
  entry for the two is the count of rows where both are 1 (``X'Wz``'s, of a column and the outcome), and with the
  two columns' own counts and the rows it gives all four cells of their two-way table. Columns of one categorical
  term never cross (a row has one level): their empty cells are the design's, not the data's.

And every set of rows whose size or sums leave goes through the site's ledger first, as any query's
(``site_agent.queries.ledger``): the complete rows, each 0/1 column's ones and each cross of two (their counts), and
each numeric column's values over the complete rows and over each 0/1 column's ones (their sums and sums of squares
and products, tagged ``values of COLUMN``; the complete rows' count is then that column's n, as ``stats`` releases
it beside the column's mean: a few rows lacking a value show as a few fewer rows, as they do there). A set within
the threshold of one released before (or of a sum or difference of two) refuses the model: an earlier answer and
this one would tell the rows between them. Exact, never perturbed: a model's statistics are exact sums, so a project
whose queries this site answers under differential privacy gets no model here, and a site releases a model fitted
on its rows alone only where its policy says ``model_alone = true``.

Pure: pandas and numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from flip_core.errors import FlipError
from flip_core.glm import MAX_PARAMETERS, OPERATORS, Formula, Statistics, parameter_names
from site_agent.queries.statistics import level_label

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_PARAMETER_FRACTION = 0.2


class ModelRefused(FlipError):
    """This site will not release statistics of this model; the sentence says why (no value of its data)."""


def design(table: pd.DataFrame, formula: Formula, levels: dict[str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """The design matrix and outcome over the table's complete rows (every column of the formula present)."""
    missing = [c for c in formula.columns() if c not in table.columns]
    if missing:
        raise ModelRefused(f"this site's table has no column {missing[0]!r}")
    rows = table[list(formula.columns())].dropna()
    parts: list[np.ndarray] = [np.ones(len(rows))] if formula.intercept else []
    for term in formula.terms:
        if term.startswith("C("):
            column = term[2:-1]
            labels = rows[column].map(level_label)
            parts += [(labels == level).to_numpy(dtype=np.float64) for level in levels[column][1:]]
        else:
            parts.append(_numeric(rows[term], term))
    outcome = _numeric(rows[formula.outcome], formula.outcome)
    if formula.threshold is not None:
        op, number = formula.threshold
        outcome = OPERATORS[op](outcome, number).astype(np.float64)
    x = np.column_stack(parts) if parts else np.zeros((len(rows), 0))
    return x, outcome


def check(
    table: pd.DataFrame,
    formula: Formula,
    levels: dict[str, list[str]],
    family: str,
    threshold: int,
    fraction: float = DEFAULT_PARAMETER_FRACTION,
) -> tuple[np.ndarray, np.ndarray]:
    """Refuse (ModelRefused) a model whose statistics here would tell a small count or solve back to rows; else its
    design and outcome (:func:`design`), for the caller's statistics."""
    if any(len(levels.get(c, [])) > MAX_PARAMETERS for c in formula.categorical):
        raise ModelRefused(f"a categorical term has more levels than a model's {MAX_PARAMETERS} parameters")
    x, y = design(table, formula, levels)
    n, p = x.shape
    if p > MAX_PARAMETERS:
        raise ModelRefused(f"the model has {p} parameters, more than the {MAX_PARAMETERS} a site fits")
    if n < threshold:
        raise ModelRefused(f"fewer than {threshold} complete rows here for this model")
    if p > fraction * n:
        raise ModelRefused(f"the model has {p} parameters, more than {fraction:g} of this site's complete rows allows")
    complete = table[list(formula.columns())].dropna()
    for column in formula.categorical:
        held = complete[column].map(level_label).value_counts()
        if any(held.get(level, 0) < threshold for level in levels[column]):
            raise ModelRefused(f"a level of {column!r} is held by fewer than {threshold} rows here (or none)")
        if set(held.index) - set(levels[column]):
            raise ModelRefused(f"{column!r} has a level here that the model's levels do not name")
    binary = binary_columns(x, y, formula, levels, family)
    for name, values, _ in binary:
        if min(int(values.sum()), int(n - values.sum())) < threshold:
            raise ModelRefused(f"{name} is 0 or 1, and one of them is held by fewer than {threshold} rows here")
    for (a, first, term_a), (b, second, term_b) in _pairs(binary):
        if term_a != term_b and any(0 < cell < threshold for cell in _cells(first, second)):
            raise ModelRefused(f"{a} and {b} cross in fewer than {threshold} rows here (but some)")
    if family == "binomial" and not np.isin(y, (0.0, 1.0)).all():
        raise ModelRefused(f"a binomial model's outcome is 0 or 1; {formula.outcome!r} is not")
    if family == "poisson" and ((y < 0).any() or (y != np.round(y)).any()):
        raise ModelRefused(f"a poisson model's outcome is a count; {formula.outcome!r} is not")
    return x, y


def binary_columns(
    x: np.ndarray, y: np.ndarray, formula: Formula, levels: dict[str, list[str]], family: str
) -> list[tuple[str, np.ndarray, str]]:
    """The design's 0/1 columns and a 0/1 outcome: (parameter or outcome name, values, the term it is of)."""
    terms = [t for t in formula.terms for _ in (levels[t[2:-1]][1:] if t.startswith("C(") else [t])]
    names = [n for n in parameter_names(formula, levels) if n != "Intercept"]
    columns = x[:, 1:] if formula.intercept else x
    out = [(name, columns[:, i], terms[i]) for i, name in enumerate(names) if np.isin(columns[:, i], (0.0, 1.0)).all()]
    if (family == "binomial" or formula.threshold is not None) and np.isin(y, (0.0, 1.0)).all():
        out.append((formula.outcome, y, "~"))
    return out


def released_sets(
    x: np.ndarray, y: np.ndarray, formula: Formula, levels: dict[str, list[str]], family: str
) -> dict[str, list[tuple[np.ndarray, str]]]:
    """The sets of rows (masks over the complete rows) whose count or sums leave with this model's statistics, by
    the ledger's tag: ``""`` for a count, ``values of COLUMN`` for a numeric column's sums over the set."""
    binary = binary_columns(x, y, formula, levels, family)
    every = np.ones(len(y), dtype=bool)
    counts = [(v == 1.0, f"{name} = 1") for name, v, _ in binary]
    counts += [((p == 1.0) & (q == 1.0), f"{m} = 1 and {n} = 1") for (m, p, a), (n, q, b) in _pairs(binary) if a != b]
    out: dict[str, list[tuple[np.ndarray, str]]] = {"": counts}
    numeric = [c for c in formula.numeric if not any(name == c for name, _, _ in binary)]
    if not (family == "binomial" or formula.threshold is not None):
        numeric.append(formula.outcome)
    for column in numeric:
        subsets = [(every, f"{column} values")] + [(v == 1.0, f"{column} values where {n} = 1") for n, v, _ in binary]
        out[f"values of {column}"] = subsets
    if not numeric:  # the rows' count is a count; with a numeric column, that column's n (as in ``stats``)
        counts.insert(0, (every, "its rows"))
    return out


def _pairs(items: list[tuple[str, np.ndarray, str]]) -> list[tuple[tuple[str, np.ndarray, str], ...]]:
    return [(items[i], items[j]) for i in range(len(items)) for j in range(i + 1, len(items))]


def _cells(first: np.ndarray, second: np.ndarray) -> list[int]:
    both = int((first * second).sum())
    return [both, int(first.sum()) - both, int(second.sum()) - both, len(first) - int((first + second).sum()) + both]


def statistics(x: np.ndarray, y: np.ndarray, beta: np.ndarray, family: str) -> Statistics:
    """IRLS's weighted sums at ``beta`` (canonical links), the deviance and the Pearson chi-square."""
    eta = x @ beta
    if family == "gaussian":
        mu, weight = eta, np.ones_like(eta)
        deviance = float(((y - mu) ** 2).sum())
        pearson = deviance
    elif family == "binomial":
        mu = 1.0 / (1.0 + np.exp(-eta))
        weight = mu * (1.0 - mu)
        deviance = float(-2.0 * (y * np.log(mu) + (1.0 - y) * np.log1p(-mu)).sum())
        pearson = float(((y - mu) ** 2 / weight).sum())
    else:
        mu = np.exp(eta)
        weight = mu
        with np.errstate(divide="ignore", invalid="ignore"):
            term = np.where(y > 0, y * np.log(y / mu), 0.0)
        deviance = float(2.0 * (term - (y - mu)).sum())
        pearson = float(((y - mu) ** 2 / mu).sum())
    z = eta + (y - mu) / weight
    xw = x * weight[:, None]
    return Statistics(xw.T @ x, xw.T @ z, deviance, int(len(y)), pearson)


def _numeric(column: pd.Series, name: str) -> np.ndarray:
    import pandas as pd

    if not pd.api.types.is_numeric_dtype(column.dtype):
        raise ModelRefused(f"column {name!r} is not numeric: name it as C({name}) for a categorical term")
    return column.to_numpy(dtype=np.float64)


__all__ = [
    "DEFAULT_PARAMETER_FRACTION",
    "ModelRefused",
    "binary_columns",
    "check",
    "design",
    "released_sets",
    "statistics",
]
