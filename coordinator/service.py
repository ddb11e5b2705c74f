"""The coordinator's run logic: validate a task, submit it to Flower, follow it, record it.

Plain Python over the store and the Flower control wrapper; the HTTP layer (``app.py``)
only authenticates and translates.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from coordinator import records
from coordinator.cohorts import CohortBook
from coordinator.store import Store, StoredRun
from flip_core.aggregation import strategy_for
from flip_core.api import TaskSpec
from flip_core.cell import metrics_of, task_hash
from flip_core.errors import Rejected
from flip_core.runs import AnnouncedDataset, CohortRef, Task, TaskSite
from flip_core.status import DISPATCHED, TERMINAL, EventType, Presence, RunStatus

log = logging.getLogger(__name__)

# The server loop reports how a run ends; following Flower's run status only catches a server
# loop that died without a word, so it need not cost the SuperLink more than a call a second.
FOLLOW_SECONDS = 1.0
# After a coordinator (re)start, sites need a moment to reopen their presence streams: until
# then a site whose last word was "online" counts as online.
PRESENCE_GRACE_SECONDS = 5.0


def visible(info: dict[str, Any], project: str) -> list[dict[str, Any]]:
    """The datasets of a site's announcement that ``project`` may see: those whose site lists it (default: none)."""
    shown = [d for d in info.get("datasets", []) if project in (d.get("projects") or ())]
    return [{k: v for k, v in d.items() if k != "projects"} for d in shown]


class TaskRejected(Rejected):
    """A task or run request that cannot be done; the message says why in a sentence. ``status`` is HTTP."""


@dataclass(frozen=True)
class Principal:
    researcher: str
    project: str


class Control(Protocol):
    """What the run service asks of Flower's control API (``coordinator.flower_control.FlowerControl``)."""

    @property
    def fab_hash(self) -> str: ...

    def start_run(self, flip_run_id: str) -> int: ...
    def status(self, flower_run_id: int) -> Any: ...
    def stop_run(self, flower_run_id: int) -> bool: ...
    def logs(self, flower_run_id: int, limit: int = 4000) -> str: ...


class PresenceStreams:
    """Which site agents hold a live presence stream right now (in memory), and their doorbells.

    A doorbell is a hint, never data: when the server loop has put a message for a site on the
    SuperLink, the coordinator writes "wake" down that site's presence stream and the site pulls
    from the fleet API at once instead of waiting for its next idle poll.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self._bells: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def hold(self, site: str) -> asyncio.Event:
        """Count a presence stream; inside the stream's event loop, also give it a doorbell."""
        bell = asyncio.Event()
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # held from plain code (tests): presence without a doorbell
            loop = None
        with self._lock:
            self._held[site] = self._held.get(site, 0) + 1
            if loop is not None:
                self._bells.setdefault(site, []).append((loop, bell))
        return bell

    def release(self, site: str, bell: asyncio.Event | None = None) -> None:
        with self._lock:
            self._held[site] = max(0, self._held.get(site, 0) - 1)
            self._bells[site] = [(loop, b) for loop, b in self._bells.get(site, []) if b is not bell]

    def online(self, site: str) -> bool:
        with self._lock:
            return self._held.get(site, 0) > 0

    def ring(self, site: str) -> None:
        """Wake ``site``'s fleet client (thread-safe; nothing happens if it holds no stream)."""
        with self._lock:
            bells = list(self._bells.get(site, []))
        for loop, bell in bells:
            loop.call_soon_threadsafe(bell.set)


class RunManager:
    def __init__(
        self, store: Store, control: Control, notify: Callable[[], None], presence_grace: float = PRESENCE_GRACE_SECONDS
    ) -> None:
        self.store = store
        self.control = control
        self.notify = notify
        self.presence = PresenceStreams()
        self.cohorts = CohortBook(store.root)
        self.settle_until = time.monotonic() + presence_grace
        self._followers: dict[str, threading.Thread] = {}

    # -- sites ----------------------------------------------------------------------
    def sites(self, project: str | None = None) -> list[dict[str, Any]]:
        """Every site as it announced itself; to ``project`` (a researcher's), only the datasets whose site lists
        that project for them (``DatasetAnnouncement.projects``), without the list (None: the hub's own view)."""
        out = []
        for row in self.store.sites():
            settling = time.monotonic() < self.settle_until
            online = row["state"] == Presence.ONLINE and (self.presence.online(row["site"]) or settling)
            info = row["info"]
            out.append(
                {
                    "site": row["site"],
                    "status": Presence.ONLINE if online else Presence.OFFLINE,
                    "node_id": row["node_id"],
                    "version": info.get("version", ""),
                    "datasets": info.get("datasets", []) if project is None else visible(info, project),
                    "last_seen": row["last_seen"],
                    "warm": bool(info.get("warm", False)) and online,
                    "device": info.get("device", ""),
                    "packages": info.get("packages", {}),
                    "environment": info.get("environment") or "",
                }
            )
        return out

    def announce(self, site: str, node_id: int | None, info: dict[str, Any], state: str) -> None:
        self.store.upsert_site(site, node_id, info, state)
        log.info("site %s announced (node %s, %s)", site, node_id, state)

    # -- submission -----------------------------------------------------------------
    def create_run(self, who: Principal, spec: TaskSpec) -> dict[str, Any]:
        run_id = secrets.token_hex(5)
        task = self._validate(who, spec).model_copy(update={"run_id": run_id})
        record = records.begun(task, spec, self.control.fab_hash)
        self.store.create_run(run_id, task, record)
        self.store.add_events(run_id, [{"type": "run", "status": RunStatus.SUBMITTED, "sites": record.sites}])
        try:
            flower_run_id = self.control.start_run(run_id)
        except Exception as exc:  # noqa: BLE001 - any failure to reach Flower ends the run clearly
            self.finish(run_id, RunStatus.FAILED, f"the SuperLink refused the run: {type(exc).__name__}: {exc}")
            raise TaskRejected(f"the SuperLink refused the run ({type(exc).__name__}: {exc})", 503) from exc
        self.store.set_flower_run(run_id, flower_run_id)
        self.store.update_record(run_id, flower_run_id=flower_run_id)
        self.follow(run_id)
        self.notify()
        return self.view(run_id)

    def check(self, who: Principal, spec: TaskSpec) -> dict[str, Any]:
        """Everything ``create_run`` would refuse, before the notebook builds and uploads the model."""
        task = self._validate(who, spec, model_uploaded=False)
        return {"ok": True, "sites": [s.site for s in task.sites], "min_sites": task.min_sites}

    def holders(
        self, dataset: str, only: list[str] | None = None, project: str | None = None
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """The online sites holding ``dataset`` (all, or those of ``only``) and the offline ones: what a run and a
        query both ask. Refused when no site holds it, or when ``only`` names a site that does not."""
        known = self.sites(project)  # a project knows of no dataset it was not admitted to: not even its name
        holders = [s for s in known if any(d["name"] == dataset for d in s["datasets"])]
        if not holders:
            names = sorted({d["name"] for s in known for d in s["datasets"]})
            listing = ", ".join(names) if names else "none (no site has admitted this project to a dataset)"
            raise TaskRejected(f"unknown dataset {dataset!r}: the datasets that exist are {listing}", 404)
        if only is not None:
            if strangers := sorted(set(only) - {s["site"] for s in holders}):
                held_by = ", ".join(sorted(s["site"] for s in holders))
                raise TaskRejected(f"no site {strangers[0]!r} holds {dataset!r} (it is held by {held_by})", 404)
            holders = [s for s in holders if s["site"] in only]
        online = [s for s in holders if s["status"] == Presence.ONLINE and s["node_id"] is not None]
        return online, sorted(s["site"] for s in holders if s not in online)

    def _validate(self, who: Principal, spec: TaskSpec, model_uploaded: bool = True) -> Task:
        """What the federation says of a well-formed task (``flip_core.api.TaskSpec`` checked its form)."""
        online, offline = self.holders(spec.dataset, project=who.project)
        others = [s["site"] for s in online if dataset_format(s, spec.dataset) != "omop"]
        if spec.covariates is not None and others:
            raise TaskRejected(
                f"a covariate specification is built from an OMOP CDM database, and {spec.dataset!r} at {others[0]} "
                "is not one"
            )
        cohort = self._cohort(who, spec)
        if cohort is not None:  # only the sites that froze it take part
            offline = sorted({*offline, *(s for s in cohort.sites if s not in {o["site"] for o in online})})
            online = [s for s in online if s["site"] in cohort.sites]
        min_sites = len(online) if spec.min_sites is None else spec.min_sites
        if len(online) < max(min_sites, 1):
            gone = f" ({', '.join(offline)} offline)" if offline else ""
            raise TaskRejected(
                f"--min-sites is {min_sites} but only {len(online)} online site(s) hold {spec.dataset!r}{gone}", 409
            )
        config = {**spec.config, **spec.private_config()}
        strategy = strategy_for(spec.strategy, config)  # the strategy the round loop builds, refused here if wrong
        initial = spec.initial_model or ""
        if model_uploaded and not (initial and self.store.model_path(initial).exists()):
            raise TaskRejected("the initial model was not uploaded (POST /api/models first)")
        return Task(
            name=spec.name or "run",
            project=who.project,
            researcher=who.researcher,
            source=spec.source,
            source_hash=task_hash(spec.source, spec.covariates),
            covariates=spec.covariates,
            dataset=spec.dataset,
            rounds=spec.rounds,
            strategy=strategy.name,
            strategy_options=strategy.options,
            min_sites=min_sites,
            seed=spec.seed,
            config=config,
            initial_model=initial,
            round_timeout=spec.round_timeout,
            cohort=cohort,
            metrics=list(metrics_of(spec.source)) if spec.metrics is None else spec.metrics,
            sites=[
                TaskSite(
                    site=s["site"],
                    node_id=s["node_id"],
                    dataset=AnnouncedDataset.model_validate(
                        next(d for d in s["datasets"] if d["name"] == spec.dataset)
                    ),
                    packages=s.get("packages", {}),
                    environment=s.get("environment", ""),
                )
                for s in sorted(online, key=lambda s: s["site"])
            ],
        )

    def _cohort(self, who: Principal, spec: TaskSpec) -> CohortRef | None:
        """The cohort a task trains on, as the hub's book has it (None: the whole table)."""
        if spec.cohort is None:
            return None
        cohort = self.cohorts.get(who.project, spec.cohort)
        if cohort is None:
            known = ", ".join(self.cohorts.names(who.project)) or "none yet"
            raise TaskRejected(
                f"no cohort {spec.cohort!r} in project {who.project!r} (its cohorts: {known}); make it with "
                "%flip_cohort NAME --dataset D --where ...",
                404,
            )
        if cohort["dataset"] != spec.dataset:
            raise TaskRejected(f"cohort {spec.cohort!r} is of dataset {cohort['dataset']!r}, not {spec.dataset!r}")
        return CohortRef.model_validate({"name": cohort["name"], "where": cohort["where"], "sites": cohort["sites"]})

    # -- events and state -----------------------------------------------------------
    def ingest(self, run_id: str, events: list[dict[str, Any]]) -> None:
        if self._stored(run_id).status in TERMINAL:
            events = [e for e in events if e.get("type") != EventType.RUN]
        self.store.add_events(run_id, events)
        for event in events:
            if event.get("type") == "site" and event.get("status") in DISPATCHED:
                self.presence.ring(str(event["site"]))  # its message is on the SuperLink now
            if event.get("type") != EventType.RUN:
                continue
            status = event.get("status")
            if status == RunStatus.RUNNING:
                self.store.set_status(run_id, RunStatus.RUNNING)
            elif status == RunStatus.COMPLETED:
                self.store.update_record(
                    run_id,
                    model_sha256=event.get("model_sha256"),
                    site_info=event.get("site_info", {}),
                    failed_sites=event.get("failed_sites", {}),
                    traffic=event.get("traffic", {}),
                    aggregation_ordered=event.get("aggregation_ordered"),
                    **records.ended(self.store.events(run_id)),
                )
                self.store.set_status(run_id, RunStatus.COMPLETED)
            elif status in (RunStatus.FAILED, RunStatus.STOPPED):
                self.store.update_record(run_id, **records.ended(self.store.events(run_id)))
                self.store.set_status(run_id, str(status), str(event.get("reason", "")))
        self.notify()

    def finish(self, run_id: str, status: str, reason: str) -> None:
        """End a run from the coordinator's side (stop, Flower failure), with its event."""
        if self.store.set_status(run_id, status, reason):
            self.store.add_events(run_id, [{"type": "run", "status": status, "reason": reason}])
            self.store.update_record(run_id, **records.ended(self.store.events(run_id)))
            self.notify()

    def stop(self, run_id: str) -> dict[str, Any]:
        run = self._stored(run_id)
        if run.status not in TERMINAL and run.flower_run_id is not None:
            self.control.stop_run(run.flower_run_id)
        self.finish(run_id, RunStatus.STOPPED, "stopped by the researcher")
        return self.view(run_id)

    def _stored(self, run_id: str) -> StoredRun:
        run = self.store.run(run_id)
        if run is None:
            raise TaskRejected(f"no run {run_id!r}", 404)
        return run

    def view(self, run_id: str) -> dict[str, Any]:
        """A run as ``GET /api/runs/ID`` answers it: its row, its cell's source, and its record with its status."""
        run = self._stored(run_id)
        record = run.record.updated(status=run.status, reason=run.reason, finished=run.finished)
        return {
            "run_id": run_id,
            "name": run.name,
            "status": run.status,
            "reason": run.reason,
            "dataset": run.dataset,
            "project": run.project,
            "researcher": run.researcher,
            "rounds": run.task.rounds,
            "strategy": run.task.strategy,
            "sites": list(record.sites),
            "created": run.created,
            "finished": run.finished,
            "source": run.task.source,
            "record": record.as_dict(),
        }

    # -- following Flower -----------------------------------------------------------
    def follow(self, run_id: str) -> None:
        thread = threading.Thread(target=self._follow, args=(run_id,), name=f"follow-{run_id}", daemon=True)
        self._followers[run_id] = thread
        thread.start()

    def resume(self) -> None:
        """After a coordinator restart: follow every run that had not finished."""
        for run in self.store.unfinished_runs():
            if run.flower_run_id is None:
                self.finish(run.run_id, RunStatus.FAILED, "the coordinator stopped before the run was submitted")
            else:
                self.follow(run.run_id)

    def _follow(self, run_id: str) -> None:
        run = self.store.run(run_id)
        assert run is not None and run.flower_run_id is not None
        flower_run_id = run.flower_run_id
        while True:
            try:
                status = self.control.status(flower_run_id)
            except Exception as exc:  # noqa: BLE001 - the SuperLink may be restarting
                log.warning("cannot read the status of Flower run %s: %s", flower_run_id, exc)
                status = None
            if status is not None and status.status == "finished":
                break
            time.sleep(FOLLOW_SECONDS)
        current = self.store.run(run_id)
        if current is not None and current.status not in TERMINAL:
            kind = RunStatus.STOPPED if status.sub_status == "stopped" else RunStatus.FAILED
            self.finish(
                run_id,
                kind,
                f"the Flower run ended ({status.sub_status}) before FLIP's server loop "
                f"reported a result.{self._last_log_line(flower_run_id)}",
            )

    def _last_log_line(self, flower_run_id: int) -> str:
        try:
            lines = self.control.logs(flower_run_id, limit=600).strip().splitlines()
        except Exception:  # noqa: BLE001 - the log is a courtesy
            return ""
        return f" Last server log line: {lines[-1]}" if lines else ""


def dataset_format(site: dict[str, Any], dataset: str) -> str:
    """The format a site announced ``dataset`` in."""
    return str(next((d.get("format", "") for d in site["datasets"] if d["name"] == dataset), ""))
