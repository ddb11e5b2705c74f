"""What a run record keeps beyond the task: the environments of every role, the seeds each site drew, and, when
the run ends, its metrics round by round and the privacy spent, read from the run's own events.

A record is enough to repeat a run and to say why a rerun differs (``flip_core.records`` compares two)."""

from __future__ import annotations

import time
from typing import Any, TypedDict

from flip_core.api import TaskSpec
from flip_core.cell import step_seed
from flip_core.runs import MetricRow, RecordedNotebook, RunRecord, SiteEnvironment, Task, TaskSite
from flip_core.status import EventType, MetricPhase
from flip_core.versions import RECORDED_PACKAGES, environment_hash, package_versions

SEED_RULE = "sha256('SEED:ROUND:SITE')[:4] little-endian, before each step (flip_core.cell.step_seed)"


class Ended(TypedDict):
    """The fields a record gains when its run ends, however it ends (``RunRecord.updated(**ended(events))``)."""

    history: list[MetricRow]
    epsilon_spent: dict[str, float]
    started: float | None


def begun(task: Task, spec: TaskSpec, fab_sha256: str) -> RunRecord:
    """A new run's record: its task, the environments of the hub, the notebook's kernel and each taking site, the
    notebook it came from, and the seed each site will draw at every step."""
    sites = [s.site for s in task.sites]
    return RunRecord(
        run_id=task.run_id,
        name=task.name,
        project=task.project,
        researcher=task.researcher,
        dataset=task.dataset,
        rounds=task.rounds,
        strategy=task.strategy,
        strategy_options=task.strategy_options,
        min_sites=task.min_sites,
        round_timeout=task.round_timeout,
        seed=task.seed,
        config=task.config,
        source_hash=task.source_hash,
        sites=sites,
        initial_model_sha256=task.initial_model,
        fab_sha256=fab_sha256,
        created=time.time(),
        hub_packages=package_versions(*RECORDED_PACKAGES),
        hub_environment=environment_hash(),
        client_packages=dict(spec.client_packages),
        client_environment=spec.client_environment or "",
        site_packages=site_environments(task.sites),
        site_datasets={s.site: s.dataset for s in task.sites},
        cohort=task.cohort,
        covariates=task.covariates,
        notebook=RecordedNotebook.model_validate(spec.notebook.model_dump(mode="json")) if spec.notebook else None,
        seed_rule=SEED_RULE,
        step_seeds=step_seeds(task.seed, task.rounds, sites),
    )


def site_environments(sites: list[TaskSite]) -> dict[str, SiteEnvironment]:
    """Each taking site's recorded package versions and the hash of its installed package set, as it announced."""
    return {s.site: SiteEnvironment(packages=s.packages, hash=s.environment) for s in sites}


def step_seeds(seed: int, rounds: int, sites: list[str]) -> dict[str, list[int]]:
    """The seed of every step at every site, round 0 (the initial evaluation) to the last: no two alike."""
    return {site: [step_seed(seed, r, site) for r in range(rounds + 1)] for site in sites}


def history(events: list[dict[str, Any]]) -> list[MetricRow]:
    """Every metric the run released, as rows (round, site or 'global', phase, metric, value), in event order."""
    rows = []
    for event in events:
        if event.get("type") != EventType.METRICS:
            continue
        for metric, value in event.get("metrics", {}).items():
            rows.append(
                MetricRow(
                    round=int(event["round"]), site=event["site"], phase=event["phase"], metric=metric, value=value
                )
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


def ended(events: list[dict[str, Any]]) -> Ended:
    """The fields a record gains when its run ends: metrics, privacy spent, when it started training."""
    started = next((e["ts"] for e in events if e.get("type") == EventType.RUN and e.get("status") == "running"), None)
    return Ended(history=history(events), epsilon_spent=epsilon_spent(events), started=started)


__all__ = ["SEED_RULE", "Ended", "begun", "ended", "epsilon_spent", "history", "site_environments", "step_seeds"]
