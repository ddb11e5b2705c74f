"""A site's answer to one step of a model fitted across sites (a query of kind ``glm``; ``flip_core.glm``).

The hub fits; the site answers. A fit of a model with a categorical term begins with the ``levels`` stage: the
site's complete rows under the filter or cohort, its own levels of each categorical term (a level held by fewer than
the threshold's rows refuses the model) and its count of complete rows, after its checks with those levels. Each
IRLS iteration is then a ``step`` at the coefficients the hub chose (the first at zero) and the levels it agreed
across the sites: the site checks the model again with those levels
(``site_agent.queries.glm.check``) and releases ``X'WX``, ``X'Wz``, the deviance and its rows.

Before either leaves, every set of rows whose count or sums it holds goes through the ledger
(``released_sets``): refused when one is within the threshold of a set released before, or of a sum or difference
of two. The same sets again (the next iteration's) are no difference. A model fitted on this site's rows alone (the
hub asked no other site) leaves only where the project's policy here says ``model_alone = true``; a project whose
queries this site answers under differential privacy gets no model (its statistics are exact).

Pure: pandas and numpy, with the ledger's pending entries passed in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from flip_core.glm import FAMILIES, MAX_PARAMETERS, FormulaInvalid, parameter_names, parse_formula
from flip_core.query import QueryRequest, level_key
from site_agent.queries.glm import ModelRefused, check, released_sets, statistics
from site_agent.queries.statistics import level_label

if TYPE_CHECKING:
    import pandas as pd

    from site_agent.queries.ledger import Pending

STAGES = ("levels", "step")


def answer_model(
    request: QueryRequest,
    table: pd.DataFrame,
    rows: np.ndarray,
    threshold: int,
    pending: Pending,
    fraction: float,
    alone: bool,
) -> dict[str, Any]:
    """This site's released table for one stage of a model (``request.model``), or ModelRefused in a sentence."""
    model = request.model
    stage, family = model.get("stage"), model.get("family")
    if stage not in STAGES or family not in FAMILIES:
        raise ModelRefused(f"a model's step is a stage of {', '.join(STAGES)} of a family of {', '.join(FAMILIES)}")
    formula = parse_formula(str(model.get("formula", "")))  # model_columns read it first
    if not isinstance(model.get("sites"), int) or (model["sites"] < 2 and not alone):
        raise ModelRefused(
            "this site releases no model fitted on its rows alone (its policy for the project: model_alone = false); "
            "fit it with other sites"
        )
    chosen = table[np.asarray(rows, dtype=bool)]
    if stage == "levels":
        levels = own_levels(chosen, formula.categorical, formula.columns(), threshold)
    else:
        agreed = model.get("levels") or {}
        if not isinstance(agreed, dict) or not all(isinstance(v, list) for v in agreed.values()):
            raise ModelRefused("the model's agreed levels are not a list of levels per categorical term")
        levels = {str(k): [str(level) for level in v] for k, v in agreed.items()}
        if set(levels) != set(formula.categorical):
            raise ModelRefused("the model's agreed levels do not name its categorical terms")
    x, y = check(chosen, formula, levels, str(family), threshold, fraction)
    complete = np.flatnonzero(rows)[chosen[list(formula.columns())].notna().all(axis=1).to_numpy()]
    through_ledger(pending, complete, released_sets(x, y, formula, levels, str(family)), request.text)
    if stage == "levels":
        return {"rows": len(y), "levels": levels}
    try:
        beta = np.asarray(model["beta"], dtype=np.float64)
    except (TypeError, ValueError):
        beta = np.zeros(0)
    if beta.shape != (len(parameter_names(formula, levels)),) or not np.isfinite(beta).all():
        raise ModelRefused("the step's coefficients are not one finite number per parameter of the model")
    return {"rows": len(y), "statistics": statistics(x, y, beta, str(family)).to_dict()}


def model_columns(request: QueryRequest) -> tuple[str, ...]:
    """The columns a model's formula names (what the project's ``query_columns`` must allow here)."""
    try:
        return parse_formula(str(request.model.get("formula", ""))).columns()
    except FormulaInvalid as exc:
        raise ModelRefused(str(exc)) from None


def own_levels(
    chosen: pd.DataFrame,
    categorical: tuple[str, ...],
    columns: tuple[str, ...],
    threshold: int,
    most: tuple[int, str] = (MAX_PARAMETERS, "a model has at most {n} parameters"),
) -> dict[str, list[str]]:
    """Each categorical term's levels among this site's complete rows, in the order every site sorts them (at most
    ``most``'s number: more refuses, saying of what)."""
    missing = [c for c in columns if c not in chosen.columns]
    if missing:
        raise ModelRefused(f"this site's table has no column {missing[0]!r}")
    complete = chosen[list(columns)].dropna()
    levels: dict[str, list[str]] = {}
    for column in categorical:
        held = complete[column].map(level_label).value_counts()
        if len(held) > most[0]:
            raise ModelRefused(f"{column!r} has more than {most[0]} levels here: " + most[1].format(n=most[0]))
        if (held < threshold).any():
            raise ModelRefused(f"a level of {column!r} is held by fewer than {threshold} rows here")
        levels[column] = sorted((str(label) for label in held.index), key=level_key)
    return levels


def through_ledger(
    pending: Pending, complete: np.ndarray, sets: dict[str, list[tuple[np.ndarray, str]]], text: str
) -> None:
    """Show each set (masks over the complete rows, whose positions in the table are ``complete``) to the ledger (as
    the positions it holds); refuse the model if any is too close to one released before; else enter them all as
    released (committed with the reply). An empty set tells nothing, and a set met twice (a run of bins without
    events has the same rows at risk at each) is shown once."""
    for tag, masks in sets.items():
        seen: set[bytes] = set()
        whole = []
        for mask, what in masks:
            if mask.any() and (shape := np.packbits(mask).tobytes()) not in seen:
                seen.add(shape)
                whole.append((complete[mask], f"{text}: {what}"))
        if any(pending.blocked(whole, tag)):
            raise ModelRefused(
                "this model's rows (or a group of them it counts) differ by fewer than the threshold from rows this "
                "site already released to the project or researcher; the two answers could reveal single patients"
            )
        for mask, what in whole:
            pending.release(mask, what, tag)


__all__ = ["STAGES", "answer_model", "model_columns", "own_levels", "through_ledger"]
