"""What a run record keeps beyond the task: the environments of every role, the seeds each site drew, and, when
the run ends, its metrics round by round and the privacy spent, read from the run's own events.

A record is enough to repeat a run and to say why a rerun differs (``flip_core.records`` compares two)."""

from __future__ import annotations

from typing import Any

from flip_core.cell import step_seed
from flip_core.status import EventType, MetricPhase

SEED_RULE = "sha256('SEED:ROUND:SITE')[:4] little-endian, before each step (flip_core.cell.step_seed)"


def site_environments(sites: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each taking site's recorded package versions and the hash of its installed package set, as it announced."""
    return {s["site"]: {"packages": s.get("packages", {}), "hash": s.get("environment") or ""} for s in sites}


def step_seeds(seed: int, rounds: int, sites: list[str]) -> dict[str, list[int]]:
    """The seed of every step at every site, round 0 (the initial evaluation) to the last: no two alike."""
    return {site: [step_seed(seed, r, site) for r in range(rounds + 1)] for site in sites}


def history(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every metric the run released, as rows (round, site or 'global', phase, metric, value), in event order."""
    rows = []
    for event in events:
        if event.get("type") != EventType.METRICS:
            continue
        for metric, value in event.get("metrics", {}).items():
            rows.append(
                {
                    "round": int(event["round"]),
                    "site": event["site"],
                    "phase": event["phase"],
                    "metric": metric,
                    "value": value,
                }
            )
    return rows


def epsilon_spent(events: list[dict[str, Any]]) -> dict[str, float]:
    """A differentially private run's epsilon spent at each site and for the run (its weakest site's), at the end."""
    spent: dict[str, float] = {}
    for event in events:
        if event.get("type") == EventType.METRICS and event.get("phase") == MetricPhase.PRIVACY:
            if "epsilon" in event.get("metrics", {}):
                spent[str(event["site"])] = float(event["metrics"]["epsilon"])
    return spent


def ended(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The fields a record gains when its run ends: metrics, privacy spent, when it started training."""
    started = next((e["ts"] for e in events if e.get("type") == EventType.RUN and e.get("status") == "running"), None)
    return {"history": history(events), "epsilon_spent": epsilon_spent(events), "started": started}


__all__ = ["SEED_RULE", "ended", "epsilon_spent", "history", "site_environments", "step_seeds"]
