"""The query line: one long-lived run of FLIP's ServerApp that carries federated queries to the sites.

``coordinator.queries.QueryDesk`` starts it as a Flower run whose ``flip-run-id`` is
``QUERY_LINE_RUN_ID``; ``flower_server.main`` hands such a run here. It asks the desk for work
(a long poll over loopback), sends each query to its sites as one Flower message of type "query"
(``flip_core.query``'s bytes in FLIP's one record, ``flip_core.wire``), rings their doorbells, and
collects the replies as they arrive, watching that the sites it waits for stay online. Each
site's reply goes back to the desk as it was released; nothing is pooled or looked into here.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import requests
from flwr.app import Message
from flwr.serverapp import Grid

from coordinator.hublink import HubLink
from flip_core.errors import FlipError
from flip_core.query import MESSAGE_TYPE_QUERY, QueryReply, QueryRequest, decode_query, decode_reply, encode_query
from flip_core.status import Presence, StepStatus
from flip_core.wire import blob_to_content, content_to_blob

log = logging.getLogger(__name__)

WAIT_SECONDS = 10.0  # the long poll for the next query
FIRST_POLL_SECONDS = 0.15  # no site replies sooner: its pull, three objects, a confirm, a push and three objects
POLL_MIN_SECONDS = 0.02  # every call costs the SuperLink CPU, which is what a query's round trip waits for
POLL_MAX_SECONDS = 0.1
POLL_GROWTH = 1.5
LIVENESS_SECONDS = 0.5
SITE_SECONDS = 30.0  # a site that has not answered a query by then is reported as not answering


class QueryLine:
    def __init__(self, grid: Grid, hub: HubLink, line: int) -> None:
        self.grid = grid
        self.hub = hub
        self.line = line

    def serve(self) -> None:
        """Answer queries until the desk retires this line (or the coordinator is gone for good)."""
        log.info("query line %s ready", self.line)
        while True:
            try:
                work = self.hub.next_query(self.line, WAIT_SECONDS)
            except requests.HTTPError as exc:
                if exc.response is not None and exc.response.status_code == 410:
                    log.info("query line %s retired by the coordinator", self.line)
                    return
                raise
            if work is None:
                continue
            request = decode_query(json.dumps(work["request"]).encode())
            replies = self.ask(request, work["targets"])
            try:
                self.hub.query_replies(request.query_id, replies)
            except requests.HTTPError as exc:  # the replies were refused (too large, say): tell the researcher so
                status = exc.response.status_code if exc.response is not None else "no status"
                why = f"the site's reply could not be handed to the coordinator (HTTP {status})"
                self.hub.query_replies(request.query_id, [_failed(r["site"], why) for r in replies])

    def ask(self, request: QueryRequest, targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send ``request`` to each target site and gather what each one released."""
        sites = [t["site"] for t in targets]
        content = blob_to_content(encode_query(request), lambda blob, sha: self.hub.publish(blob, sha, sites))
        messages = [Message(content, dst_node_id=int(t["node_id"]), message_type=MESSAGE_TYPE_QUERY) for t in targets]
        ids = list(self.grid.push_messages(messages))
        if len(ids) != len(sites):
            return [_failed(site, "Flower refused the query message") for site in sites]
        pending = {mid: site for mid, site in zip(ids, sites, strict=True)}
        self.hub.ring(sites)
        return self._gather(pending, {t["site"]: int(t["node_id"]) for t in targets})

    def _gather(self, pending: dict[str, str], nodes: dict[str, int]) -> list[dict[str, Any]]:
        replies: list[dict[str, Any]] = []
        deadline = time.monotonic() + SITE_SECONDS
        next_liveness = time.monotonic() + LIVENESS_SECONDS
        poll = FIRST_POLL_SECONDS
        while pending:
            time.sleep(poll)
            arrived = 0
            for msg in self.grid.pull_messages(list(pending)):
                site = pending.pop(msg.metadata.reply_to_message_id, None)
                if site is not None:
                    replies.append(_reply(site, msg, self.hub))
                    arrived += 1
            poll = POLL_MIN_SECONDS if arrived else min(poll * POLL_GROWTH, POLL_MAX_SECONDS)
            now = time.monotonic()
            if pending and now >= next_liveness:
                next_liveness = now + LIVENESS_SECONDS
                status = self.hub.sites()
                for mid, site in list(pending.items()):
                    info = status.get(site, {})
                    if info.get("status") != Presence.ONLINE or info.get("node_id") != nodes[site]:
                        pending.pop(mid)
                        replies.append(_failed(site, "the site went offline before it answered"))
            if pending and now >= deadline:
                replies += [_failed(site, f"no answer within {SITE_SECONDS:g} s") for site in pending.values()]
                pending.clear()
        return sorted(replies, key=lambda r: r["site"])


def _failed(site: str, reason: str) -> dict[str, Any]:
    return {"site": site, "status": StepStatus.ERROR, "reason": reason}


def _reply(site: str, msg: Message, hub: HubLink) -> dict[str, Any]:
    if msg.has_error():
        reason = msg.error.reason if msg.error is not None else "no reason given"
        return _failed(site, f"the site's Flower node reported an error ({(reason or '')[:200]})")
    try:
        reply: QueryReply = decode_reply(content_to_blob(msg.content, lambda sha, size: hub.take(site, sha, size)))
    except (ValueError, TypeError, KeyError, FlipError) as exc:
        return _failed(site, f"the site's reply could not be read ({type(exc).__name__})")
    if reply.site != site:
        return _failed(site, f"the reply came from node of {site!r} but names {reply.site!r}")
    return {
        "site": site,
        "status": reply.status,
        "reason": reply.reason,
        "threshold": reply.threshold,
        "table": reply.table,
        "version": reply.version,
        "seconds": reply.seconds,
    }
