"""The coordinator's query desk: a researcher's federated query in, the sites' released answers and
their pooled table out.

A query is checked here against what the federation announced (the dataset, its columns, which
sites hold it and are online, the filter's form), then queued for the **query line**: one
long-lived Flower run of FLIP's ServerApp (``coordinator.query_line``) that takes queries from
this desk over loopback, sends each to its sites as one Flower message of type "query", and
hands their replies back. Keeping that run alive means a query costs one message round trip,
not a ServerApp's start. The desk starts the line when the first query comes and again if it
stops answering. What each site releases is decided at the site; the pooling
(``coordinator.pooling``) only combines released values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from coordinator.flower_control import QUERY_LINE_RUN_ID
from coordinator.pooling import PoolingError, pool
from coordinator.service import Principal, RunManager, TaskRejected, dataset_format
from flip_core.api import CohortSpec, QuerySpec
from flip_core.filters import parse as parse_filter
from flip_core.query import COHORT_COLUMNS, QueryKind, QueryRequest
from flip_core.status import StepStatus

log = logging.getLogger(__name__)

ANSWER_SECONDS = 60.0  # a query that has no answer by then is refused with a sentence (a line that died)
LINE_STALE_SECONDS = 15.0  # a line that has not asked for work this long is looked at (it asks every LINE_WAIT)
WATCH_SECONDS = 1.0  # while a query waits, the line's Flower run is looked at this often (once it is overdue)


class LineRetired(TaskRejected):
    """A query line that is not the desk's current one asked for work: it should end."""


@dataclass
class _Pending:
    request: QueryRequest
    targets: list[dict[str, Any]]
    done: threading.Event = field(default_factory=threading.Event)
    replies: list[dict[str, Any]] = field(default_factory=list)


class QueryDesk:
    """Thread-safe: researchers' requests (threads of the HTTP server) wait here for the line's answers."""

    def __init__(self, manager: RunManager) -> None:
        self.manager = manager
        self._lock = threading.Condition()
        self._queue: deque[str] = deque()
        self._pending: dict[str, _Pending] = {}
        self._line: int | None = None  # the Flower run id of the current query line
        self._line_seen = 0.0  # when it last asked for work (monotonic)
        self._line_started = 0.0

    # -- researchers ------------------------------------------------------------------
    def ask(self, who: Principal, spec: QuerySpec) -> dict[str, Any]:
        """The sites' released answers to ``spec`` and their pooled table (blocking)."""
        targets, columns, offline = self.targets(who, spec)
        if spec.cohort is not None:
            targets, columns = self.within(who, spec, targets, columns)
        where = parse_filter(spec.where, columns)
        if spec.kind == QueryKind.TOP:
            online, _ = self.manager.holders(spec.dataset, project=who.project)
            omop = {s["site"] for s in online if dataset_format(s, spec.dataset) == "omop"}
            if others := [t["site"] for t in targets if t["site"] not in omop]:
                raise TaskRejected(
                    f"top counts an OMOP database's concepts; {spec.dataset!r} at {others[0]} is not one"
                )
        elif missing := sorted(set(spec.columns) - set(columns)):
            raise TaskRejected(
                f"unknown column {missing[0]!r} in dataset {spec.dataset!r}: its columns are {', '.join(columns)}", 404
            )
        edges: tuple[float, ...] = ()
        if spec.kind == QueryKind.HIST:
            if spec.range is None and spec.columns[0] in self._voxel_columns(spec):
                raise TaskRejected(
                    f"a histogram of {spec.columns[0]!r} (the images' voxels) needs --range LO HI; the pooled stats "
                    "of intensity_p1 and intensity_p99 (each image's percentiles) are a good place to start",
                    400,
                )
            edges = self._edges(who, spec, targets, where.text)
        elif spec.kind == QueryKind.STATS and spec.range is not None:
            edges = (float(spec.range[0]), float(spec.range[1]))  # the bounds a site answering under DP clamps to
        request = request_for(
            who,
            spec.dataset,
            spec.kind,
            columns=tuple(spec.columns),
            where=where.text,
            edges=edges,
            threshold=spec.threshold or 0,
            text=spec.text or describe(spec),
            cohort=spec.cohort or "",
            limit=spec.bins if spec.kind == QueryKind.TOP else 0,
        )
        replies = self.exchange(request, targets)
        return answer_view(request, replies, offline)

    def within(
        self, who: Principal, spec: QuerySpec, targets: list[dict[str, Any]], columns: list[str]
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """The sites that froze ``spec.cohort`` and the columns a query within it may name (a Circe cohort's index
        date gives each person's age, age group and year at it)."""
        cohort = self.manager.cohorts.get(who.project, str(spec.cohort))
        if cohort is None:
            known = ", ".join(self.manager.cohorts.names(who.project)) or "none yet"
            raise TaskRejected(f"no cohort {spec.cohort!r} in project {who.project!r} (its cohorts: {known})", 404)
        if cohort["dataset"] != spec.dataset:
            raise TaskRejected(f"cohort {spec.cohort!r} is of dataset {cohort['dataset']!r}, not {spec.dataset!r}")
        within = [t for t in targets if t["site"] in cohort["sites"]]
        if not within:
            raise TaskRejected(f"no site that froze cohort {spec.cohort!r} is online", 409)
        dated = str(cohort["where"]).startswith("circe:")
        return within, columns + [c for c in COHORT_COLUMNS if dated and c not in columns]

    def targets(self, who: Principal, spec: QuerySpec) -> tuple[list[dict[str, Any]], list[str], list[str]]:
        """The online sites to ask (node ids), the dataset's columns, and the holders that are offline: of the sites
        that admit ``who``'s project to the dataset (to any other, the dataset does not exist)."""
        only = None if spec.sites is None else list(spec.sites)
        online, offline = self.manager.holders(spec.dataset, only, project=who.project)
        if not online:
            raise TaskRejected(f"no site holding {spec.dataset!r} is online ({', '.join(offline)} offline)", 409)
        columns: list[str] = []
        for site in online:
            entry = next(d for d in site["datasets"] if d["name"] == spec.dataset)
            columns += [c for c in entry.get("columns", []) if c not in columns]
        targets = [{"site": s["site"], "node_id": int(s["node_id"])} for s in sorted(online, key=lambda s: s["site"])]
        return targets, columns, offline

    def _voxel_columns(self, spec: QuerySpec) -> set[str]:
        """The dataset's columns whose values are an image's voxels (announced with dtype "voxels")."""
        voxels: set[str] = set()
        for site in self.manager.sites():
            for entry in site["datasets"]:
                if entry["name"] == spec.dataset:
                    pairs = zip(entry.get("columns", []), entry.get("dtypes", []), strict=False)
                    voxels.update(c for c, dtype in pairs if dtype == "voxels")
        return voxels

    def _edges(self, who: Principal, spec: QuerySpec, targets: list[dict[str, Any]], where: str) -> tuple[float, ...]:
        """A histogram's shared bin edges: ``--range``, or the pooled p5..p95 of the column (asked first)."""
        if spec.range is not None:
            low, high = spec.range
        else:
            probe = request_for(
                who,
                spec.dataset,
                QueryKind.STATS,
                columns=tuple(spec.columns),
                where=where,
                threshold=spec.threshold or 0,
                text=f"the range for: {spec.text or describe(spec)}",
                cohort=spec.cohort or "",
            )
            low, high = _range_of(self.exchange(probe, targets), spec.columns[0])
        step = (high - low) / spec.bins
        return tuple(float(low + i * step) for i in range(spec.bins)) + (float(high),)

    def freeze(self, who: Principal, spec: CohortSpec) -> dict[str, Any]:
        """Freeze cohort ``spec.name`` at each site holding the dataset; what they released, and the book's entry."""
        as_query = QuerySpec(dataset=spec.dataset, kind=QueryKind.COHORT, where=spec.where, sites=spec.sites)
        targets, columns, offline = self.targets(who, as_query)
        where = parse_filter(spec.where, columns)
        circe = "" if spec.circe is None else json.dumps(spec.circe, sort_keys=True)
        text = f"cohort {spec.name}: {spec.dataset}" + (f" where {where.text}" if where.text else "")
        if circe:
            text += f" by the Circe definition sha256:{hashlib.sha256(circe.encode()).hexdigest()[:16]}"
        request = request_for(
            who, spec.dataset, QueryKind.COHORT, where=where.text, text=text, cohort=spec.name, circe=circe
        )
        view = answer_view(request, self.exchange(request, targets), offline)
        frozen = {
            site: {"rows": r["table"].get("total"), "hash": r["table"]["hash"]} for site, r in view["sites"].items()
        }
        if frozen:
            defined = where.text or (f"circe:{hashlib.sha256(circe.encode()).hexdigest()}" if circe else "")
            view["cohort"] = self.manager.cohorts.put(who.project, spec.name, spec.dataset, defined, frozen)
        return view

    # -- the line -----------------------------------------------------------------------
    def exchange(self, request: QueryRequest, targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Queue ``request`` for the line and wait for the sites' replies."""
        pending = _Pending(request, targets)
        with self._lock:
            self._pending[request.query_id] = pending
            self._queue.append(request.query_id)
            self._lock.notify_all()
        deadline = time.monotonic() + ANSWER_SECONDS
        restarted = False
        try:
            self._ensure_line()
            while not pending.done.wait(WATCH_SECONDS):
                failure = self._line_failure()
                if failure and not restarted:  # one new line; a second failure is the answer
                    log.warning("the query line failed (%s); starting another", failure)
                    self._start_line()
                    restarted = True
                elif failure or time.monotonic() > deadline:
                    why = failure or f"no answer within {ANSWER_SECONDS:g} s"
                    raise TaskRejected(f"the hub's query line is not answering ({why})", 503)
        finally:
            with self._lock:
                self._pending.pop(request.query_id, None)
                if request.query_id in self._queue:
                    self._queue.remove(request.query_id)
        return pending.replies

    def _line_failure(self) -> str:
        """Why the current line's Flower run ended ("" while it runs or was seen lately)."""
        with self._lock:
            line, seen = self._line, self._line_seen
        if line is None or time.monotonic() - seen < WATCH_SECONDS:
            return ""
        status = self.manager.control.status(line)
        if status is None or status.status != "finished":
            return ""
        return f"its Flower run {status.sub_status}: {str(status.details)[:300]}"

    def _ensure_line(self) -> None:
        """Start the query line when there is none, or when the current one stopped asking for work."""
        with self._lock:
            now = time.monotonic()
            if self._line is not None and now - max(self._line_seen, self._line_started) < LINE_STALE_SECONDS:
                return
            line = self._line
        if line is not None:
            status = self.manager.control.status(line)
            if status is not None and status.status != "finished" and time.monotonic() - self._line_seen < 60:
                return
            log.warning("the query line (Flower run %s) stopped answering; starting another", line)
        self._start_line()

    def _start_line(self) -> None:
        try:
            flower_run = self.manager.control.start_run(QUERY_LINE_RUN_ID)
        except Exception as exc:  # noqa: BLE001 - the SuperLink is unreachable: say so
            raise TaskRejected(f"the SuperLink refused the query line ({type(exc).__name__}: {exc})", 503) from exc
        log.info("started the query line as Flower run %s", flower_run)
        with self._lock:
            self._line, self._line_started, self._line_seen = flower_run, time.monotonic(), 0.0

    def next(self, line: int, wait: float) -> dict[str, Any] | None:
        """The line's next query (its request and the sites to ask), waiting up to ``wait`` seconds."""
        deadline = time.monotonic() + wait
        with self._lock:
            if self._line is None:
                self._line = line  # a line that outlived a coordinator restart: adopt it
            if line != self._line:
                raise LineRetired(f"query line {line} is retired (the current one is {self._line})", 410)
            while True:
                self._line_seen = time.monotonic()
                while self._queue:
                    pending = self._pending.get(self._queue.popleft())
                    if pending is not None:
                        return {"request": asdict(pending.request), "targets": pending.targets}
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._lock.wait(left)

    def answer(self, query_id: str, replies: list[dict[str, Any]]) -> None:
        with self._lock:
            pending = self._pending.get(query_id)
        if pending is not None:
            pending.replies = replies
            pending.done.set()


def request_for(who: Principal, dataset: str, kind: QueryKind, **fields: Any) -> QueryRequest:
    """A query as every site gets it, under a fresh id, in the caller's name and project."""
    return QueryRequest(secrets.token_hex(6), who.project, who.researcher, dataset, kind, **fields)


def describe(spec: QuerySpec) -> str:
    """The query in the words of ``%flip_query`` (what the sites' audit logs show when the notebook sent none)."""
    words = [spec.dataset, str(spec.kind)]
    if spec.columns:
        words += ["by" if spec.kind == QueryKind.COUNT else "", ", ".join(spec.columns)]
    text = " ".join(w for w in words if w)
    return f"{text} where {spec.where}" if spec.where.strip() else text


def _range_of(replies: list[dict[str, Any]], column: str) -> tuple[float, float]:
    """The pooled p5..p95 of ``column`` (or the widest released site p5..p95) for a histogram's edges."""
    tables = {r["site"]: r["table"] for r in replies if r.get("status") == StepStatus.OK}
    pooled = pool(QueryKind.STATS, tables)["columns"].get(column) if tables else None
    quantiles = (pooled or {}).get("quantiles")
    if quantiles:
        low, high = float(quantiles["p5"]), float(quantiles["p95"])
    else:
        released = [t["columns"][column]["quantiles"] for t in tables.values() if t["columns"][column]["quantiles"]]
        if not released:
            raise TaskRejected(
                f"no site released a range for {column!r} (too few values under this filter): give --range LOW HIGH"
            )
        low, high = min(float(q["p5"]) for q in released), max(float(q["p95"]) for q in released)
    if not low < high:
        raise TaskRejected(f"{column!r} has no spread between its 5th and 95th percentiles: give --range LOW HIGH")
    return low, high


def answer_view(request: QueryRequest, replies: list[dict[str, Any]], offline: list[str]) -> dict[str, Any]:
    """What the researcher gets: each site's released table or its refusal, and the pooled table."""
    answered = {r["site"]: r for r in replies if r.get("status") == StepStatus.OK}
    refused = {r["site"]: r.get("reason") or str(r.get("status")) for r in replies if r["site"] not in answered}
    refused.update({site: "offline" for site in offline})
    tables = {site: r["table"] for site, r in answered.items()}
    return {
        "query_id": request.query_id,
        "dataset": request.dataset,
        "kind": request.kind,
        "columns": list(request.columns),
        "where": request.where,
        "text": request.text,
        "sites": {site: {"threshold": r.get("threshold"), "table": r["table"]} for site, r in sorted(answered.items())},
        "refused": dict(sorted(refused.items())),
        "pooled": _pooled(request.kind, tables),
    }


def _pooled(kind: QueryKind, tables: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    if not tables or kind == QueryKind.MOCK:  # mocks are per site: nothing to pool
        return None
    try:
        return pool(QueryKind.COUNT if kind == QueryKind.COHORT else kind, tables)
    except PoolingError as exc:  # sites that disagree on a table's shape: say so, not a 500
        raise TaskRejected(str(exc), 502) from exc
