"""A site's answer to one step of a survival analysis across sites (a query of kind ``survival``).

The hub asks; the site answers over its complete rows under the filter or cohort:

- **Kaplan-Meier** (``model.kind == "km"``): with a group, a ``levels`` stage first (the site's levels of the group
  column, each held by at least the threshold's rows, else a refusal); then ``counts``: per agreed level its rows and,
  per bin it kept, its events and censorings (``site_agent.queries.survival.km_counts``: small bins merged).
- **Cox** (``model.kind == "cox"``): with a categorical term, a ``levels`` stage (as a GLM's); then each Newton step
  at the coefficients the hub chose: stratified, the site's Efron log partial likelihood, gradient and information
  over its exact times (``site_agent.queries.cox.exact_statistics``); binned, its sums per kept bin
  (``binned_sums``). The model is checked as a GLM's design is (a categorical level, a cross of two 0/1 terms) and
  as a Cox model's (its events, each 0/1 term's rows and events on each side, the parameters against the events).

Before anything leaves, every set of rows whose count or sums it holds goes through the site's ledger
(``site_agent.queries.ledger``), as a GLM's do (``site_agent.queries.models``): each group's rows, and per kept bin
its events, censorings and rows at risk; a Cox model's events, each 0/1 term's ones (and among the events), and each
numeric term's values over the rows, the events and each bin's events and rows at risk. A set within the threshold
of one released before, or of a sum or difference of two, refuses the step. A curve or model of this site's rows
alone leaves only where the project's policy here says ``model_alone = true``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from flip_core.cox import CoxInvalid
from flip_core.glm import MAX_GROUPS, FormulaInvalid, parameter_names
from flip_core.kaplan_meier import ONE_CURVE
from flip_core.models import survival_formula
from flip_core.survival import EdgesInvalid, bin_index, checked_edges
from site_agent.queries.cox import binned_sums, check_cox, exact_statistics, kept_bins
from site_agent.queries.glm import ModelRefused, check, released_sets
from site_agent.queries.models import own_levels, through_ledger
from site_agent.queries.statistics import level_label
from site_agent.queries.survival import SurvivalRefused, km_counts

if TYPE_CHECKING:
    import pandas as pd

    from site_agent.queries.ledger import Pending

Sets = dict[str, list[tuple[np.ndarray, str]]]


def survival_columns(model: dict[str, Any]) -> tuple[str, ...]:
    """The columns a survival step names (what the project's ``query_columns`` must allow here)."""
    try:
        named = [str(model["time"]), str(model["event"])]
        if model.get("kind") == "cox":
            named += survival_formula(named[0], named[1], str(model.get("terms", ""))).columns()
        elif model.get("group"):
            named.append(str(model["group"]))
    except (KeyError, FormulaInvalid) as exc:
        raise ModelRefused(f"a survival step names its time, event and terms ({exc})") from None
    return tuple(dict.fromkeys(named))


def answer_survival(
    model: dict[str, Any], table: pd.DataFrame, rows: np.ndarray, threshold: int, pending: Pending, text: str,
    fraction: float, alone: bool,
) -> dict[str, Any]:  # fmt: skip
    """This site's released table for one stage of a survival analysis, or a refusal (a FlipError) in a sentence."""
    if not isinstance(model.get("sites"), int) or (model["sites"] < 2 and not alone):
        raise ModelRefused(
            "this site releases no survival curve or model of its rows alone (its policy for the project: "
            "model_alone = false); ask it with other sites"
        )
    chosen = table[np.asarray(rows, dtype=bool)]
    complete_columns = list(survival_columns(model))
    missing = [c for c in complete_columns if c not in chosen.columns]
    if missing:
        raise ModelRefused(f"this site's table has no column {missing[0]!r}")
    present = chosen[complete_columns].notna().all(axis=1).to_numpy()
    complete = np.flatnonzero(rows)[present]
    sub = chosen[present]
    try:
        if model.get("kind") == "km":
            return _kaplan_meier(model, sub, complete, threshold, pending, text)
        if model.get("kind") == "cox":
            return _cox(model, sub, complete, threshold, pending, text, fraction)
    except (EdgesInvalid, CoxInvalid) as exc:
        raise ModelRefused(str(exc)) from None
    raise ModelRefused("a survival step is of kind km or cox")


def _kaplan_meier(
    model: dict[str, Any], sub: pd.DataFrame, complete: np.ndarray, threshold: int, pending: Pending, text: str
) -> dict[str, Any]:
    time, event, group = str(model["time"]), str(model["event"]), model.get("group")
    if model.get("stage") == "levels":
        if not group:
            raise ModelRefused("a Kaplan-Meier curve without a group has no levels stage")
        levels = own_levels(
            sub, (str(group),), (time, event, str(group)), threshold, (MAX_GROUPS, "at most {n} curves are drawn")
        )
        held = sub[str(group)].map(level_label).to_numpy()
        through_ledger(pending, complete, {"": [(held == v, f"{group} = {v}") for v in levels[str(group)]]}, text)
        return {"rows": len(sub), "levels": levels}
    if model.get("stage") != "counts":
        raise ModelRefused("a Kaplan-Meier step is a stage of levels or counts")
    agreed = list(model.get("levels") or []) if group else None
    if agreed is not None and len(agreed) > MAX_GROUPS:
        raise ModelRefused(f"Kaplan-Meier curves are drawn for at most {MAX_GROUPS} groups")
    values = [_floats(sub, time), _floats(sub, event)]
    labels = sub[str(group)].to_numpy() if group else None
    try:
        counts = km_counts(values[0], values[1], labels, list(model.get("edges") or []), threshold, agreed)
    except SurvivalRefused as exc:
        raise ModelRefused(str(exc)) from None
    edges = checked_edges(list(model["edges"]))
    kept = [edges.index(e) for e in counts["edges"]]
    bins, happened = bin_index(values[0], values[1] == 1.0, edges)
    run = np.searchsorted(np.asarray(kept), bins, side="left")
    named = sub[str(group)].map(level_label).to_numpy() if group else np.full(len(sub), ONE_CURVE)
    sets: Sets = {"": []}
    for level in counts["groups"]:
        mine = named == level
        sets[""].append((mine, f"{level}: its rows"))
        sets[""] += _bin_sets(run, happened, mine, len(kept), f"{level}: ")
    through_ledger(pending, complete, sets, text)
    return {**counts, "rows": len(sub)}


def _cox(
    model: dict[str, Any], sub: pd.DataFrame, complete: np.ndarray, threshold: int, pending: Pending, text: str,
    fraction: float,
) -> dict[str, Any]:  # fmt: skip
    time, event = str(model["time"]), str(model["event"])
    formula = survival_formula(time, event, str(model.get("terms", "")))
    if model.get("stage") == "levels":
        levels = own_levels(sub, formula.categorical, formula.columns(), threshold)
    elif model.get("stage") == "step":
        agreed = model.get("levels") or {}
        if not isinstance(agreed, dict) or set(agreed) != set(formula.categorical):
            raise ModelRefused("the model's agreed levels do not name its categorical terms")
        levels = {str(k): [str(v) for v in values] for k, values in agreed.items()}
    else:
        raise ModelRefused("a Cox step is a stage of levels or step")
    x, times = check(sub, formula, levels, "gaussian", threshold, fraction)  # levels, crosses of 0/1 terms, p
    names = parameter_names(formula, levels)
    frame = _design_frame(x, names, times, _floats(sub, event), time, event)
    edges = list(model.get("edges") or []) if model.get("binned") else None
    times, events, x = check_cox(frame, time, event, names, threshold, fraction, edges)
    sets = released_sets(x, times, formula, levels, "gaussian")
    sets.pop(f"values of {time}", None)  # no sum of times leaves: their order does
    _add_event_sets(sets, x, events, names, formula.numeric)
    if edges is not None:
        kept = kept_bins(times, events, x, edges, threshold)
        bins, happened = bin_index(times, events, checked_edges(edges))
        run = np.searchsorted(np.asarray(kept), bins, side="left")
        sets[""] += _bin_sets(run, happened, np.ones(len(times), dtype=bool), len(kept), "")
        for j, name in enumerate(names):  # a numeric term's sums over each bin's events and rows at risk
            if not np.isin(x[:, j], (0.0, 1.0)).all():
                per_bin = _bin_sets(run, happened, np.ones(len(times), dtype=bool), len(kept), f"{name} values, ")
                sets.setdefault(f"values of {name}", []).extend(m for m in per_bin if "censored" not in m[1])
    through_ledger(pending, complete, sets, text)
    if model.get("stage") == "levels":
        return {"rows": len(times), "levels": levels}
    try:
        beta = np.asarray(model.get("beta"), dtype=np.float64)
    except (TypeError, ValueError):
        beta = np.zeros(0)
    if beta.shape != (len(names),) or not np.isfinite(beta).all():
        raise ModelRefused("the step's coefficients are not one finite number per parameter of the model")
    if edges is not None:
        return {"rows": len(times), "sums": binned_sums(times, events, x, beta, edges, threshold).to_dict()}
    return {"rows": len(times), "statistics": exact_statistics(times, events, x, beta).to_dict()}


def _bin_sets(run: np.ndarray, happened: np.ndarray, among: np.ndarray, runs: int, prefix: str) -> list[Any]:
    """Per kept run of bins: its events, its censorings and the rows at risk at its start, of the rows ``among``."""
    out: list[tuple[np.ndarray, str]] = []
    for j in range(runs):
        here = among & (run == j)
        out += [(here & happened, f"{prefix}events in kept bin {j}"), (here & ~happened, f"{prefix}censored in {j}"),
                (among & (run >= j), f"{prefix}at risk at kept bin {j}")]  # fmt: skip
    return out


def _add_event_sets(sets: Sets, x: np.ndarray, events: np.ndarray, names: list[str], numeric: tuple[str, ...]) -> None:
    """A Cox model's sets over its events: the events, each 0/1 term's ones among them, each numeric term's values."""
    sets.setdefault("", []).append((events, "its events"))
    for j, name in enumerate(names):
        if np.isin(x[:, j], (0.0, 1.0)).all():
            sets[""].append((events & (x[:, j] == 1.0), f"events where {name} = 1"))
        elif name in numeric:
            sets.setdefault(f"values of {name}", []).append((events, f"{name} values of the events"))


def _design_frame(
    x: np.ndarray, names: list[str], times: np.ndarray, events: np.ndarray, time: str, event: str
) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame(x, columns=names)
    frame[time], frame[event] = times, events
    return frame


def _floats(sub: pd.DataFrame, column: str) -> np.ndarray:
    import pandas as pd

    if not pd.api.types.is_numeric_dtype(sub[column].dtype):
        raise ModelRefused(f"column {column!r} is not numeric")
    return sub[column].to_numpy(dtype=np.float64)


__all__ = ["answer_survival", "survival_columns"]
