"""The events a run streams to the notebook, as the round loop builds them.

Each builder returns the JSON object one event is; their shapes are ``flip_core.api``'s event
models, which the coordinator checks when they arrive. Kept apart from the loop so that what a
researcher sees of a reply is in one place: a differential-privacy run's sites release no counts
(their row shows the epsilon instead), and what a site's policy withheld is said in its row.
"""

from __future__ import annotations

from typing import Any

from flip_core.aggregation import weighted_metrics
from flip_core.protocol import StepResult
from flip_core.status import EventType, MetricPhase, Phase, RunStatus, SiteState

PRIVATE_DETAIL = "differential privacy: only noised parameters leave this site"
GLOBAL = "global"

Event = dict[str, Any]


def run_event(status: RunStatus, **fields: Any) -> Event:
    return {"type": EventType.RUN, "status": status, **fields}


def site_event(site: str, status: SiteState, round_: int, **fields: Any) -> Event:
    return {"type": EventType.SITE, "site": site, "status": status, "round": round_, **fields}


def metrics_event(
    site: str, round_: int, phase: MetricPhase, metrics: dict[str, float], samples: int | None = None
) -> Event:
    event: Event = {"type": EventType.METRICS, "round": round_, "site": site, "phase": phase, "metrics": metrics}
    if samples is not None:
        event["samples"] = samples
    return event


def round_event(round_: int, sites: int, seconds: float) -> Event:
    return {"type": EventType.ROUND, "round": round_, "sites": sites, "seconds": round(seconds, 3)}


def _counts(result: StepResult, phase: Phase) -> dict[str, Any]:
    """The row counts a site's row may show (none in a private run) and what its policy withheld."""
    if result.private:
        counts: dict[str, Any] = {"detail": PRIVATE_DETAIL} if phase == Phase.PREPARE else {}
    else:
        counts = {"samples": result.num_train}
    if result.withheld:
        counts["detail"] = result.withheld
    return counts


def _device(result: StepResult) -> dict[str, Any]:
    """Where the step ran, and on a GPU its peak memory and time (nothing from a site that does not say)."""
    if not result.device:
        return {}
    if not result.device.startswith("cuda"):
        return {"device": result.device}
    return {
        "device": result.device,
        "gpu_peak_bytes": result.gpu_peak_bytes,
        "gpu_seconds": round(result.gpu_seconds, 3),
    }


def reply_events(
    site: str, round_: int, phase: Phase, result: StepResult, traffic: dict[str, int] | None = None
) -> list[Event]:
    """What one good reply tells the notebook: the site's row (with ``traffic``: the bytes it received and
    sent for this step), then its own metrics."""
    seconds = round(result.seconds, 3)
    moved: dict[str, Any] = {**(traffic or {}), **_device(result)}
    if phase == Phase.PREPARE:  # the initial model evaluated: round 0
        ready = site_event(site, SiteState.READY, round_, **_counts(result, phase), seconds=seconds, **moved)
        evaluated = [metrics_event(site, 0, MetricPhase.EVALUATE, result.eval_metrics, result.num_test)]
        return [ready, *(evaluated if result.eval_metrics else [])]
    events = [site_event(site, SiteState.DONE, round_, **_counts(result, phase), seconds=seconds, **moved)]
    if result.private and result.params:
        spent = {"epsilon": result.dp_epsilon, "project_epsilon": result.dp_project_epsilon}
        events.append(metrics_event(site, round_, MetricPhase.PRIVACY, spent))
    if result.eval_metrics:  # a fit step evaluates the model it received: the previous round's
        evaluated_round = round_ - 1 if result.params else round_
        events.append(metrics_event(site, evaluated_round, MetricPhase.EVALUATE, result.eval_metrics, result.num_test))
    if result.train_metrics:
        events.append(metrics_event(site, round_, MetricPhase.TRAIN, result.train_metrics, result.num_train))
    return events


def global_events(round_: int, phase: Phase, results: list[StepResult], eval_round: int) -> list[Event]:
    """The round's aggregated metrics: weighted by each site's rows; the run's epsilon is its weakest site's.
    Summed in the sites' order, not as their replies came, so that a rerun's metrics match to the bit."""
    results = sorted(results, key=lambda r: r.site)
    evals = [(r.eval_metrics, r.num_test) for r in results if r.eval_metrics]
    trains = [(r.train_metrics, r.num_train) for r in results if r.train_metrics]
    private = [r.dp_epsilon for r in results if r.private]  # a fit step's: its parameters are folded in by now
    events = []
    if evals:
        events.append(
            metrics_event(GLOBAL, eval_round, MetricPhase.EVALUATE, weighted_metrics(evals), sum(n for _, n in evals))
        )
    if phase == Phase.FIT and private:
        events.append(metrics_event(GLOBAL, round_, MetricPhase.PRIVACY, {"epsilon": max(private)}))
    if phase == Phase.FIT and trains:
        events.append(
            metrics_event(GLOBAL, round_, MetricPhase.TRAIN, weighted_metrics(trains), sum(n for _, n in trains))
        )
    return events
