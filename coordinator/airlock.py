"""The hub's airlock desk: a researcher's request for an item a site's rules hold back, relayed to that site, and its
state and released item relayed back.

The hub decides nothing here and holds no item: it checks the request's form (``flip_core.api.ReleaseSpec``), that a
traceback's run is the caller's and a query's dataset and columns exist (as the query desk does), sends the request to
the one site as a query of kind ``release`` on the query line, and books who asked what of which site
(``airlock.json`` in its state folder: no item, no check, no state). The site holds the item for its admin
(``site_agent.governance.airlock``). A listing asks each site the state of the caller's requests there; a released
item is fetched from its site each time it is asked for and passed on as the site signed it (the notebook checks the
signature against the key the hub registered for that site).
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from coordinator.queries import QueryDesk, describe
from coordinator.registry import SiteRegistry
from coordinator.service import Principal, TaskRejected
from flip_core.airlock import ItemKind, ReleaseAsk, ReleaseState, RequestState
from flip_core.api import QuerySpec, ReleaseSpec
from flip_core.filters import parse as parse_filter
from flip_core.query import QueryKind, QueryRequest
from flip_core.status import Presence, StepStatus

BOOK_FILE = "airlock.json"
OFFLINE = "unknown (the site is offline)"
RUN_ITEMS = {
    ItemKind.TRACEBACK: "the traceback of run {run}'s failed step",
    ItemKind.EVALUATION: "the report of run {run}'s final evaluation",
}


class AirlockDesk:
    def __init__(self, desk: QueryDesk, registry: SiteRegistry, state_dir: Path) -> None:
        self.desk = desk
        self.manager = desk.manager
        self.registry = registry
        self.path = Path(state_dir) / BOOK_FILE
        self._lock = threading.Lock()

    # -- asking ---------------------------------------------------------------------------------------------------
    def ask(self, who: Principal, spec: ReleaseSpec) -> dict[str, Any]:
        """Send ``spec`` to its site; the request as booked, with the state the site gave it."""
        request_id = "rq-" + secrets.token_hex(5)
        ask = ReleaseAsk(request_id, spec.item, spec.purpose.strip(), run=spec.run)
        if spec.item != ItemKind.QUERY:
            node = self._online(who, spec.site)
            if self.manager.store.run(spec.run, project=who.project) is None:
                raise TaskRejected(f"no run {spec.run[:70]!r} in project {who.project!r}", 404)
            about = RUN_ITEMS[spec.item].format(run=spec.run)
            request = QueryRequest(
                request_id, who.project, who.researcher, "", QueryKind.RELEASE, text=about, airlock=ask.to_dict()
            )
        else:
            assert spec.query is not None
            query = spec.query.model_copy(update={"sites": [spec.site]})
            request, node = self._query_request(who, query, ask)
            about = request.text
        replies = self.desk.exchange(request, [{"site": spec.site, "node_id": node}])
        reply = next((r for r in replies if r.get("site") == spec.site), None)
        if reply is None:
            raise TaskRejected(f"{spec.site} did not answer the request (it may have gone offline): ask again", 503)
        if reply.get("status") != StepStatus.OK:
            raise TaskRejected(reply.get("reason") or f"{spec.site} refused the request ({reply.get('status')})", 403)
        table = reply.get("table") or {}
        asked_at = time.time()
        entry = {
            "request_id": request_id,
            "site": spec.site,
            "item": str(spec.item),
            "purpose": ask.purpose,
            "about": about,
            "researcher": who.researcher,
            "project": who.project,
            "asked_at": asked_at,
        }
        with self._lock:
            book = self._read()
            book[request_id] = entry
            self._write(book)
        state = RequestState(
            request_id, spec.site, spec.item, ask.purpose, ReleaseState(table.get("state", ReleaseState.PENDING)),
            reason=str(table.get("reason") or ""), asked_at=asked_at,
        )  # fmt: skip
        return {**_view(state), "about": about}

    def _online(self, who: Principal, site: str) -> int:
        for known in self.manager.sites(who.project):
            if known["site"] == site:
                if known["status"] != Presence.ONLINE or known["node_id"] is None:
                    raise TaskRejected(f"{site} is offline: ask again when it is online", 409)
                return int(known["node_id"])
        raise TaskRejected(f"unknown site {site!r}", 404)

    def _query_request(self, who: Principal, spec: QuerySpec, ask: ReleaseAsk) -> tuple[QueryRequest, int]:
        targets, columns, _ = self.desk.targets(who, spec)
        where = parse_filter(spec.where, columns)
        if missing := sorted(set(spec.columns) - set(columns)):
            raise TaskRejected(f"unknown column {missing[0]!r} in dataset {spec.dataset!r}", 404)
        edges: tuple[float, ...] = ()
        if spec.kind == QueryKind.HIST:
            if spec.range is None:
                raise TaskRejected("a histogram asked of the airlock needs its --range LO HI (its bins are exact)", 400)
            step = (spec.range[1] - spec.range[0]) / spec.bins
            edges = tuple(float(spec.range[0] + i * step) for i in range(spec.bins)) + (float(spec.range[1]),)
        asked = ReleaseAsk(ask.request_id, ask.item, ask.purpose, statistic=str(spec.kind))
        request = QueryRequest(
            ask.request_id, who.project, who.researcher, spec.dataset, QueryKind.RELEASE, tuple(spec.columns),
            where.text, edges, spec.threshold or 0, spec.text or describe(spec), airlock=asked.to_dict(),
        )  # fmt: skip
        return request, int(targets[0]["node_id"])

    # -- their states -----------------------------------------------------------------------------------------------
    def requests(self, who: Principal) -> list[dict[str, Any]]:
        """The caller's requests, newest first, each with its state as its site tells it now."""
        mine = [e for e in self._read().values() if e["researcher"] == who.researcher and e["project"] == who.project]
        by_site: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for entry in mine:
            by_site[entry["site"]].append(entry)
        out = []
        for site, entries in by_site.items():
            told = self._ask_states(who, site, [e["request_id"] for e in entries], content=False)
            for entry in entries:
                out.append(_merge(entry, told.get(entry["request_id"])))
        return sorted(out, key=lambda s: s["asked_at"], reverse=True)

    def get(self, who: Principal, request_id: str) -> dict[str, Any]:
        """One of the caller's requests; once released, with the item and its signed release as the site sent
        them, and the key fingerprint the hub registered for that site."""
        entry = self._read().get(request_id)
        if entry is None or entry["researcher"] != who.researcher or entry["project"] != who.project:
            raise TaskRejected(f"no request {request_id[:40]!r} of yours", 404)
        told = self._ask_states(who, entry["site"], [request_id], content=True)
        view = _merge(entry, told.get(request_id))
        registered = next((s.key_fingerprint for s in self.registry.sites() if s.name == entry["site"]), "")
        return {**view, "registered_key": registered}

    def _ask_states(self, who: Principal, site: str, ids: list[str], *, content: bool) -> dict[str, dict[str, Any]]:
        try:
            node = self._online(who, site)
        except TaskRejected:
            return {}
        request = QueryRequest(
            "rs-" + secrets.token_hex(5), who.project, who.researcher, "", QueryKind.RELEASES,
            text=f"the state of {len(ids)} airlock request(s)", airlock={"requests": ids, "content": content},
        )  # fmt: skip
        replies = self.desk.exchange(request, [{"site": site, "node_id": node}])
        reply = next((r for r in replies if r.get("site") == site and r.get("status") == StepStatus.OK), None)
        return {} if reply is None else dict((reply.get("table") or {}).get("requests") or {})

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            book: dict[str, dict[str, Any]] = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return book

    def _write(self, book: dict[str, dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(book, indent=1))
        os.replace(tmp, self.path)


def _merge(entry: dict[str, Any], told: dict[str, Any] | None) -> dict[str, Any]:
    told = told or {"state": OFFLINE}
    view = {k: entry[k] for k in ("request_id", "site", "item", "purpose", "about", "asked_at")}
    view.update(state=told.get("state", OFFLINE), reason=told.get("reason", ""), decided_at=told.get("decided_at", 0))
    if "content" in told:
        view.update(release=told.get("release") or {}, content=told["content"])
    return view


def _view(state: RequestState) -> dict[str, Any]:
    return {
        "request_id": state.request_id,
        "site": state.site,
        "item": str(state.item),
        "purpose": state.purpose,
        "state": str(state.state),
        "reason": state.reason,
        "asked_at": state.asked_at,
        "decided_at": state.decided_at,
    }
