"""The output guard: what a site's task process produced, reduced to what may leave the site.

Applied by the site agent (trusted FLIP code) before anything leaves. What leaves a site is only
parameter arrays matching the declared model and finite scalar metrics with plain names. Counts
below the disclosure threshold are suppressed, and so is any metric computed on fewer rows than the
threshold. Error messages never leave: only the exception's type, the cell line and a fixed place.

A pure function: the input is never mutated, and the sentences in ``Guarded.stripped`` name what was
removed and why, never a value from the data.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from flip_core.protocol import StepResult
from flip_core.status import StepStatus
from site_agent.data.catalog import PUBLIC_DATASET_ERRORS

MAX_METRICS = 20
ANY_METRIC = "*"
METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")
COUNT_NAME = re.compile(r"(^|_)(n|num|count|counts|total|size|rows|cases|patients)(_|$)", re.I)
ERROR_TYPE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,79}$")
ERROR_PLACES = ("the cell", "build_model()", "train()", "evaluate()", "the site agent", "the task process")
BAD_PARAMETERS_WHERE = "train() (the returned parameters do not match the declared model)"
SUPPRESSED_WHERE = re.compile(r"^fewer than \d+ training rows at this site$")


@dataclass(frozen=True)
class Declared:
    """The model a task declared: parameter names with their shapes and dtypes."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    @classmethod
    def from_params(cls, params: dict[str, np.ndarray]) -> Declared:
        """The global model the hub sent in the request is the model the task declared."""
        return cls(
            shapes={k: tuple(np.shape(v)) for k, v in params.items()},
            dtypes={k: str(np.asarray(v).dtype) for k, v in params.items()},
        )


@dataclass
class Guarded:
    result: StepResult  # what may leave the site
    stripped: list[str]  # one sentence per thing removed, no data values in them


def _param_problem(params: dict[str, np.ndarray], declared: Declared) -> str | None:
    """Why ``params`` do not match the declared model, or None when they do."""
    names, wanted = set(params), set(declared.shapes)
    if names != wanted:
        missing = ", ".join(repr(n) for n in sorted(wanted - names))
        extra = len(names - wanted)  # task-chosen names are not echoed: they could carry data
        parts = ([f"missing {missing}"] if missing else []) + ([f"{extra} undeclared name(s)"] if extra else [])
        return f"names differ from the declared model ({'; '.join(parts)})"
    for name in sorted(names):
        value = params[name]
        if not isinstance(value, np.ndarray):
            return f"{name!r} is not an array"
        if value.shape != tuple(declared.shapes[name]):
            return f"{name!r} has shape {value.shape} but the model declares {tuple(declared.shapes[name])}"
        if str(value.dtype) != declared.dtypes[name]:
            return f"{name!r} has dtype {value.dtype} but the model declares {declared.dtypes[name]}"
        if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
            return f"{name!r} holds non-finite values"
    return None


def _matches(pattern: re.Pattern[str], text: object) -> bool:
    return isinstance(text, str) and pattern.fullmatch(text) is not None


def _fixed_place(where: object) -> bool:
    """Whether ``where`` is one of the runner's fixed places (or this guard's own suppression note)."""
    if _matches(SUPPRESSED_WHERE, where):
        return True
    if where in PUBLIC_DATASET_ERRORS:
        return True
    return isinstance(where, str) and any(where == p or where.startswith(p + " (") for p in ERROR_PLACES)


def _finite(value: object) -> float | None:
    """``value`` as a float when it is a finite real number (bools are not), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _metrics(
    metrics: dict[str, float],
    kind: str,
    threshold: int,
    max_metrics: int,
    stripped: list[str],
    allowed: tuple[str, ...] = (ANY_METRIC,),
    public: list[str] | None = None,
) -> dict[str, float]:
    kept: dict[str, float] = {}
    bad_names = unlisted = 0
    for name, value in metrics.items():
        if not _matches(METRIC_NAME, name):
            bad_names += 1
            continue
        if ANY_METRIC not in allowed and name not in allowed:
            unlisted += 1
            continue
        number = _finite(value)
        if number is None:
            stripped.append(f"{kind} metric {name!r} removed: not a finite number")
        elif COUNT_NAME.search(name) and number.is_integer() and 0 < number < threshold:
            stripped.append(f"{kind} metric {name!r} suppressed: a count below the threshold of {threshold}")
        else:
            kept[name] = number
    if bad_names:
        stripped.append(f"{bad_names} {kind} metric(s) with a disallowed name removed")
    if unlisted:  # the names are the task's choice (they could carry data): counted, never echoed
        sentence = f"{unlisted} {kind} metric(s) withheld: not among the project's metrics here ({', '.join(allowed)})"
        stripped.append(sentence)
        if public is not None:
            public.append(sentence)
    names = sorted(kept)
    if len(names) > max_metrics:
        stripped.append(f"{len(names) - max_metrics} {kind} metrics over the limit of {max_metrics} removed")
    return {name: kept[name] for name in names[:max_metrics]}


def _count(value: object, kind: str, stripped: list[str]) -> int:
    """A row count as a non-negative int; anything else becomes 0."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 0:
        return int(value)
    stripped.append(f"{kind} count removed: not a non-negative whole number")
    return 0


def guard(
    result: StepResult,
    declared: Declared,
    threshold: int,
    *,
    max_metrics: int = MAX_METRICS,
    metrics: tuple[str, ...] = ("*",),
) -> Guarded:
    """What of ``result`` may leave the site, and a sentence for each thing removed.

    ``metrics``: the metric names the project may send from this site (``"*"``: any plain name); the
    researcher is told how many others were withheld (``StepResult.withheld``)."""
    stripped: list[str] = []
    # the privacy figures are the site agent's to set (site_agent.disclosure.privacy), never the task process's
    out = replace(
        result, params=dict(result.params), private=False, dp_epsilon=0.0, dp_project_epsilon=0.0, withheld=""
    )
    public: list[str] = []  # sentences of fixed text that the researcher may read

    if (out.status == StepStatus.ERROR or out.error_where) and not _fixed_place(out.error_where):
        out.error_where = "the task"  # free text (an exception's message, say) must not leave
    if (out.status == StepStatus.ERROR or out.error_type) and not _matches(ERROR_TYPE, out.error_type):
        out.error_type = "Error"
    if not isinstance(out.error_line, int) or isinstance(out.error_line, bool):
        out.error_line = 0

    if out.params and (problem := _param_problem(out.params, declared)):
        out.params = {}
        out.status, out.error_type, out.error_line, out.error_where = (
            StepStatus.ERROR,
            "BadParameters",
            0,
            BAD_PARAMETERS_WHERE,
        )
        stripped.append(f"parameters removed: {problem}")

    out.train_metrics = _metrics(result.train_metrics, "train", threshold, max_metrics, stripped, metrics, public)
    out.eval_metrics = _metrics(result.eval_metrics, "eval", threshold, max_metrics, stripped, metrics, public)
    out.withheld = "; ".join(public)
    out.num_train = _count(result.num_train, "train", stripped)
    out.num_test = _count(result.num_test, "test", stripped)

    if 0 < out.num_train < threshold:
        out.train_metrics, out.params, out.num_train = {}, {}, 0
        if out.status == StepStatus.OK:
            out.status, out.error_where = StepStatus.SUPPRESSED, f"fewer than {threshold} training rows at this site"
        stripped.append(f"train metrics, parameters and counts suppressed: trained on fewer than {threshold} rows")
    if 0 < out.num_test < threshold:
        out.eval_metrics, out.num_test = {}, 0
        stripped.append(f"eval metrics and counts suppressed: evaluated on fewer than {threshold} rows")
    return Guarded(result=out, stripped=stripped)


def describe_outgoing(result: StepResult) -> dict[str, Any]:
    """What leaves, for the audit log: names, shapes and dtypes only, never values."""
    return {
        "status": result.status,
        "params": {name: {"shape": list(arr.shape), "dtype": str(arr.dtype)} for name, arr in result.params.items()},
        "param_bytes": int(sum(arr.nbytes for arr in result.params.values())),
        "train_metrics": sorted(result.train_metrics),
        "eval_metrics": sorted(result.eval_metrics),
        "num_train": result.num_train,
        "num_test": result.num_test,
    }


def announced(summary: dict[str, Any], threshold: int) -> dict[str, Any]:
    """A dataset's summary as the site announces it: row counts under the threshold withheld (None), and an
    imaging dataset's inclusion report under the same control (:func:`announced_inclusion`)."""
    out = {
        k: (None if k in ("rows", "train_rows", "test_rows") and isinstance(v, int) and 0 < v < threshold else v)
        for k, v in summary.items()
    }
    if isinstance(summary.get("inclusion"), dict):
        out["inclusion"] = announced_inclusion(summary["inclusion"], threshold)
    return out


def announced_inclusion(report: dict[str, Any], threshold: int) -> dict[str, Any]:
    """An inclusion report as it may leave the site: the included count and each exclusion reason's count are
    one table whose total (the manifest's cases) is released, so small cells are withheld with their
    complements (``site_agent.disclosure.suppression.protect``); the other counts withheld below the threshold; the
    image kinds' counts only where the included count is released, and under the same rule (their sum is it)."""
    from site_agent.disclosure.suppression import protect

    def small(v: Any) -> Any:
        return None if isinstance(v, int) and 0 < v < threshold else v

    reasons = sorted(report.get("excluded") or {})
    total = int(report.get("cases") or 0)
    cells = np.array([int(report.get("included") or 0), *(int(report["excluded"][r]) for r in reasons)])
    withheld = np.ones(cells.size, bool) if total < threshold else protect(cells, [np.arange(cells.size)], threshold)
    kinds = report.get("kinds") or {}
    names = sorted(kinds)
    kind_counts = np.array([int(kinds[k]) for k in names])
    kinds_withheld = (
        np.ones(len(names), bool)
        if withheld[0] or not names
        else protect(kind_counts, [np.arange(len(names))], threshold)
    )
    return {
        "cases": small(total) if total else total,
        "included": None if withheld[0] else int(cells[0]),
        "excluded": {r: (None if withheld[i + 1] else int(cells[i + 1])) for i, r in enumerate(reasons)},
        "patients": small(report.get("patients")),
        "patients_with_several_cases": small(report.get("patients_with_several_cases")),
        "kinds": {k: (None if kinds_withheld[i] else int(kind_counts[i])) for i, k in enumerate(names)},
        "warnings": small(report.get("warnings")),
    }
