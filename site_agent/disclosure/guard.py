"""The output guard: what a site's task process produced, rebuilt by the site agent as what may leave the site.

The task process runs the researcher's code, which can rewrite anything in it: every field of the result it sends
is a claim. :func:`guard` builds a new result field by field and copies no free-text or free-form field: a failure
is a phase, an exception type and a line in the words of ``flip_core.vocabulary`` (or one of FLIP's own failures in
its fixed sentence), never a message; the parameters are those of the declared model; metrics are finite numbers
under the names the task declared before the run and the project's policy allows here; the site's name, the device,
the dataset's fingerprint, the time and the rows are what the agent knows itself (:class:`Known`). Counts below the
disclosure threshold are suppressed, and so is any metric computed on fewer rows than the threshold.

A pure function: the input is never mutated, and the sentences in ``Guarded.stripped`` name what was
removed and why, never a value from the data.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flip_core.cell import metrics_of
from flip_core.protocol import StepRequest, StepResult
from flip_core.status import StepStatus
from flip_core.vocabulary import (
    CELL_FAILURES,
    EXCEPTION_NAMES,
    MAX_METRICS,
    is_metric_name,
    told_exception,
    told_line,
    told_phase,
    undeclared,
)
from site_agent.data.catalog import DatabaseUnanswered, ImagesChanged, ImagesUnreadable

ANY_METRIC = "*"
COUNT_NAME = re.compile(r"(^|_)(n|num|count|counts|total|size|rows|cases|patients)(_|$)", re.I)
BAD_PARAMETERS_WHERE = "train() (the returned parameters do not match the declared model)"
DATASET_UNREADABLE = "the site's dataset (it could not be read: the site's log says why)"
MIB = 1 << 20
MAX_GPU_BYTES = 1 << 50  # more than any GPU holds: a claimed peak above it is told as this


@dataclass(frozen=True)
class Declared:
    """What a task declared before it ran: its model's parameter names with their shapes and dtypes, and its
    metric names (None: any metric name, as in a test of the guard alone)."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metrics: tuple[str, ...] | None = None

    @classmethod
    def from_params(cls, params: dict[str, np.ndarray], metrics: tuple[str, ...] | None = None) -> Declared:
        """The global model the hub sent in the request is the model the task declared."""
        return cls(
            shapes={k: tuple(np.shape(v)) for k, v in params.items()},
            dtypes={k: str(np.asarray(v).dtype) for k, v in params.items()},
            metrics=metrics,
        )

    @classmethod
    def from_request(cls, request: StepRequest) -> Declared:
        """The request's model and metric names (read from its source when the hub sent none, as the hub would)."""
        given = request.metrics if isinstance(request.metrics, list) else None
        names = metrics_of(request.source) if given is None else tuple(n for n in given if is_metric_name(n))
        return cls.from_params(request.params, names[:MAX_METRICS])


@dataclass(frozen=True)
class Known:
    """What the site agent knows of a step itself, whatever its task process says."""

    site: str  # this site's name
    device: str = "cpu"  # the site's choice (``flip-site start --device``)
    fingerprint: str = ""  # the catalog's fingerprint of the step's dataset
    seconds: float = 0.0  # the step, by the agent's clock
    threads: int = 0  # torch's threads as the site set them for its task processes (0: torch's default)
    train_rows: int = 0  # the rows of the step's training split (most: a cohort's rows, when not exact)
    test_rows: int = 0  # the rows of its test split (most, when not exact)
    exact: bool = True  # the rows are the split's own (a whole dataset's), not only a bound (a cohort's)
    lines: int = 0  # the cell's lines: a failure's line is one of them or none
    time_limit: float = 0.0  # the step's time limit here (its TimeLimit sentence)
    holds_dataset: bool = True  # the site holds the step's dataset
    failures: dict[str, tuple[str, ...]] = field(default_factory=dict)  # more of the agent's own (name: sentences)


@dataclass
class Guarded:
    result: StepResult  # what may leave the site
    stripped: list[str]  # one sentence per thing removed, no data values in them


def failure_sentences(known: Known) -> dict[str, tuple[str, ...]]:
    """FLIP's own failures a result may name, each with the only sentences its "where" may be (the first when the
    claimed one is not among them), filled with what the agent knows: the cell's (``flip_core.vocabulary``), the
    site's and the agent's. A task process can claim any of them: each is one fixed sentence, never a number of the
    task's choosing."""
    return {
        **CELL_FAILURES,
        "DeviceUnavailable": (
            f"the task process (the site's device {known.device} cannot be used there: the site's log says why)",
        ),
        "DatasetChanged": (ImagesChanged.public,),
        "DatasetUnavailable": (DATASET_UNREADABLE, ImagesUnreadable.public, DatabaseUnanswered.public),
        "TimeLimit": (f"the task process (stopped at its time limit of {known.time_limit:g} s)",),
        "TaskProcessDied": ("the task process (it ended during the step: the site's log says how)",),
        "TaskIsolation": ("the task process (it could not be isolated: see the site's logs/task-processes.log)",),
        "BadRequest": ("the site agent (the run id is not one)",),
        "BadResult": ("the task process (its result could not be read)",),
        **known.failures,
    }


def _failure(claimed: StepResult, known: Known) -> tuple[str, int, str]:
    """A failed step's (type, line, where), in the vocabulary only: a fixed sentence for one of FLIP's own, else a
    standard exception type, a phase and a line of the cell."""
    fixed = failure_sentences(known)
    name = claimed.error_type
    if isinstance(name, str) and name in fixed:
        sentences = fixed[name]
        if claimed.error_where in sentences:
            return name, 0, claimed.error_where
        if name not in EXCEPTION_NAMES:  # MemoryLimit is both: the agent's sentence, or a phase and a line
            return name, 0, sentences[0]
    return told_exception(name), told_line(claimed.error_line, known.lines), told_phase(claimed.error_where)


def _param_problem(params: dict[str, np.ndarray], declared: Declared) -> str | None:
    """Why ``params`` do not match the declared model, or None when they do."""
    if not isinstance(params, dict):
        return "not a set of named arrays"
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


def _finite(value: object) -> float | None:
    """``value`` as a float when it is a finite real number (bools are not), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


@dataclass
class _Names:
    """The names a step's metrics may leave under: the project's here, and the task's declared ones."""

    allowed: tuple[str, ...]
    declared: tuple[str, ...] | None
    threshold: int
    max_metrics: int


def _metrics(metrics: object, kind: str, names: _Names, stripped: list[str], public: list[str]) -> dict[str, float]:
    if not isinstance(metrics, dict):
        metrics = {}
    kept: dict[str, float] = {}
    bad_names = unlisted = unsaid = 0
    for name, value in metrics.items():
        if not is_metric_name(name):
            bad_names += 1
        elif ANY_METRIC not in names.allowed and name not in names.allowed:
            unlisted += 1
        elif names.declared is not None and name not in names.declared:
            unsaid += 1
        elif (number := _finite(value)) is None:
            stripped.append(f"{kind} metric {name!r} removed: not a finite number")
        elif COUNT_NAME.search(name) and number.is_integer() and 0 < number < names.threshold:
            stripped.append(f"{kind} metric {name!r} suppressed: a count below the threshold of {names.threshold}")
        else:
            kept[name] = number
    if bad_names:
        stripped.append(f"{bad_names} {kind} metric(s) with a disallowed name removed")
    # the names are the task's choice (they could carry data), and so is how many: neither is said
    if unlisted:
        stripped.append(f"{unlisted} {kind} metric(s) withheld: not among the project's metrics here")
        public.append(f"{kind} metrics withheld: not among the project's metrics here ({', '.join(names.allowed)})")
    if unsaid or bad_names:
        stripped.append(f"{unsaid + bad_names} {kind} metric(s) withheld: not declared")
        public.append(undeclared(kind))
    ordered = sorted(kept)
    if len(ordered) > names.max_metrics:
        stripped.append(
            f"{len(ordered) - names.max_metrics} {kind} metrics over the limit of {names.max_metrics} removed"
        )
    return {name: kept[name] for name in ordered[: names.max_metrics]}


def _count(value: object) -> int | None:
    """A claimed row count as a non-negative int, else None."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 0:
        return int(value)
    return None


def _rows(claimed: StepResult, known: Known, trained: bool, stripped: list[str]) -> tuple[int, int]:
    """(train, test) rows: the agent's own, but the weight a training step claims for its update (``num_examples``)
    is kept when it lies between 1 and the split's rows; where the agent knows only a bound (a cohort's rows), the
    claims within it."""
    train, test = _count(claimed.num_train), _count(claimed.num_test)
    for kind, value in (("train", train), ("test", test)):
        if value is None:
            stripped.append(f"{kind} count removed: not a non-negative whole number")
    weight = train if train is not None and 1 <= train <= known.train_rows else known.train_rows
    if known.exact:
        return (weight if trained else known.train_rows), known.test_rows
    return weight, min(test or 0, known.test_rows)


def _gpu(claimed: StepResult, known: Known, private: bool) -> tuple[int, float]:
    """The GPU figures the task process measured, coarsened (none on a CPU, or in a private run): the peak memory to
    a power of two of at least 1 MiB, the GPU's seconds to whole seconds, at most the step's own."""
    if private or not known.device.startswith("cuda"):
        return 0, 0.0
    peak = _count(claimed.gpu_peak_bytes) or 0
    coarse = 0 if peak <= 0 else max(MIB, 1 << (min(peak, MAX_GPU_BYTES) - 1).bit_length())
    seconds = _finite(claimed.gpu_seconds) or 0.0
    return coarse, float(round(min(max(seconds, 0.0), known.seconds)))


def guard(
    result: StepResult,
    declared: Declared,
    threshold: int,
    known: Known,
    *,
    max_metrics: int = MAX_METRICS,
    metrics: tuple[str, ...] = ("*",),
) -> Guarded:
    """What of ``result`` (the task process's claim) may leave the site, built afresh, and a sentence for each thing
    removed.

    ``metrics``: the metric names the project may send from this site (``"*"``: any the task declared); the
    researcher is told that others were withheld (``StepResult.withheld``), never which or how many."""
    stripped: list[str] = []
    public: list[str] = []  # sentences of fixed text that the researcher may read
    out = StepResult(
        site=known.site,
        status=StepStatus.OK,
        fingerprint=known.fingerprint,
        seconds=known.seconds,
        device=known.device,
        threads=known.threads,
    )
    if result.status == StepStatus.NO_DATASET and not known.holds_dataset:
        out.status = StepStatus.NO_DATASET
        return Guarded(out, stripped)
    if result.status != StepStatus.OK:
        out.status = StepStatus.ERROR
        out.error_type, out.error_line, out.error_where = _failure(result, known)
    elif result.params and (problem := _param_problem(result.params, declared)):
        out.status, out.error_type, out.error_where = StepStatus.ERROR, "BadParameters", BAD_PARAMETERS_WHERE
        stripped.append(f"parameters removed: {problem}")
    elif result.params:
        out.params = dict(result.params)
    names = _Names(metrics, declared.metrics, threshold, max_metrics)
    if out.status == StepStatus.OK:
        out.train_metrics = _metrics(result.train_metrics, "train", names, stripped, public)
        out.eval_metrics = _metrics(result.eval_metrics, "eval", names, stripped, public)
    out.withheld = "; ".join(public)
    out.num_train, out.num_test = _rows(result, known, bool(out.params), stripped)
    out.gpu_peak_bytes, out.gpu_seconds = _gpu(result, known, private=False)
    _suppress_small(out, threshold, stripped)
    return Guarded(result=out, stripped=stripped)


def _suppress_small(out: StepResult, threshold: int, stripped: list[str]) -> None:
    if 0 < out.num_train < threshold:
        out.train_metrics, out.params, out.num_train = {}, {}, 0
        if out.status == StepStatus.OK:
            out.status, out.error_where = StepStatus.SUPPRESSED, f"fewer than {threshold} training rows at this site"
        stripped.append(f"train metrics, parameters and counts suppressed: trained on fewer than {threshold} rows")
    if 0 < out.num_test < threshold:
        out.eval_metrics, out.num_test = {}, 0
        stripped.append(f"eval metrics and counts suppressed: evaluated on fewer than {threshold} rows")


def private_result(out: StepResult) -> StepResult:
    """``out`` as a differential-privacy run may release it, before its noise: no metrics, counts or withheld
    sentence, the time in whole seconds, no GPU figures."""
    return StepResult(
        site=out.site,
        status=out.status,
        params=out.params,
        error_type=out.error_type,
        error_line=out.error_line,
        error_where=out.error_where,
        fingerprint=out.fingerprint,
        seconds=float(round(out.seconds)),
        device=out.device,
        threads=out.threads,
        private=True,
    )


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


def announced(summary: dict[str, Any], threshold: int, projects: Iterable[str] = ()) -> dict[str, Any]:
    """A dataset's summary as the site announces it: row counts under the threshold withheld (None), an imaging
    dataset's inclusion report under the same control (:func:`announced_inclusion`), and the ``projects`` the
    site's policy admits to it (the hub shows the dataset to those projects alone; to no project when none). The
    names tell the hub which projects this site approved for the dataset: the hub, which defines the projects and
    routes their tasks, learns it anyway from the tasks it sends; researchers are never shown the list."""
    out = {
        k: (None if k in ("rows", "train_rows", "test_rows") and isinstance(v, int) and 0 < v < threshold else v)
        for k, v in summary.items()
    }
    if isinstance(summary.get("inclusion"), dict):
        out["inclusion"] = announced_inclusion(summary["inclusion"], threshold)
    out["projects"] = sorted(set(projects))
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
