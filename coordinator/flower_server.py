"""FLIP's ServerApp: the round loop that drives sites through Flower's deployment engine.

Each round sends one fused message per active site (evaluate the incoming global model,
then train on it), collects replies as they arrive, streams per-site and aggregated metrics
to the coordinator, and aggregates with the run's strategy. A site whose step fails, whose
SuperNode replies with an error, or whose agent stops sending heartbeats is marked failed;
the run goes on while at least ``min_sites`` remain and otherwise ends with a sentence that
says why.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from coordinator.flower_control import QUERY_LINE_RUN_ID
from coordinator.flower_tuning import tuned_grid_pulls
from coordinator.hublink import HubLink
from coordinator.query_line import QueryLine
from coordinator.round_events import global_events, reply_events, round_event, run_event, site_event
from flip_core.aggregation import RunningMean, make_strategy
from flip_core.cell import failed_step
from flip_core.errors import FlipError
from flip_core.protocol import StepRequest, StepResult
from flip_core.runs import Task
from flip_core.status import Phase, Presence, RunStatus, SiteState, StepStatus
from flip_core.trace import stage
from flip_core.util import wait_until
from flip_core.wire import (
    MESSAGE_TYPE_EVALUATE,
    MESSAGE_TYPE_TRAIN,
    content_to_result,
    payload_size,
    request_to_content,
)

log = logging.getLogger(__name__)

# Replies are polled from the SuperLink (every call costs it CPU): quickly right after sending and
# after each reply, backing off while sites compute.
POLL_MIN_SECONDS = 0.01
POLL_MAX_SECONDS = 0.25
POLL_GROWTH = 1.5
FIRST_POLL_FRACTION = 0.8  # of the time the quickest site took last round
LIVENESS_SECONDS = 0.5
# a site waiting for its admin's approval is asked again after 0.5 s, then less often, at least every 2 s
APPROVAL_POLL_MIN_SECONDS = 0.5
APPROVAL_POLL_MAX_SECONDS = 2.0
OFFLINE_GRACE_SECONDS = 2.0
OFFLINE = "the site went offline (its agent stopped answering)"
RESTARTED = "the site's Flower node restarted during the round"
# Sites that failed for one of these reasons rejoin at the next round once they are back online.
REJOINABLE = (OFFLINE, RESTARTED)

app = ServerApp()


class RunAborted(FlipError):
    """The run cannot go on; the message is the sentence the researcher reads."""


@dataclass
class Reply:
    site: str
    result: StepResult | None
    failure: str = ""
    late: bool = False  # missed the round timeout: sits this round out, stays in the run
    pending: bool = False  # the site's admin has not yet approved the task's code: asked again later
    sent_bytes: int = 0  # the reply's payload, as the site sent it


def describe_failure(result: StepResult) -> str:
    """What the researcher is told of a site's step that did not succeed (a failed cell: :func:`failed_step`)."""
    if result.status == StepStatus.NO_DATASET:
        return "the site does not hold this dataset"
    if result.status == StepStatus.REFUSED:
        return f"refused by the site: {result.error_where}"
    if result.status == StepStatus.SUPPRESSED:
        return f"withheld by the site's disclosure control ({result.error_where})"
    return failed_step(result.error_type, result.error_line, result.error_where)


class RoundLoop:
    """One run's rounds. Talks to Flower through ``grid`` and to the hub through ``hub``."""

    def __init__(self, grid: Grid, hub: HubLink, task: Task) -> None:
        self.grid = grid
        self.hub = hub
        self.task = task
        self.run_id = task.run_id
        self.active: dict[str, int] = {s.site: s.node_id for s in task.sites}
        self.failed: dict[str, str] = {}
        self.strategy = make_strategy(task.strategy, dict(task.strategy_options))
        self.config = {**task.config, **self.strategy.client_config()}
        self.site_info: dict[str, dict[str, Any]] = {}
        self.waiting_for: set[str] = set()
        self.round_timeout = task.round_timeout
        self.stale: set[str] = set()  # ids of messages whose replies came too late: drained, ignored
        self.dataset = task.dataset
        self.first_reply_seconds: float | None = None
        self.awaiting: set[str] = set()  # sites whose admin has yet to approve the task's code
        self.published: set[str] = set()  # the payload of the step now out (flip_core.bulk), dropped when replaced
        self.step_bytes = 0  # the payload of the step now out, as each site receives it
        self.running = RunningMean()  # this round's updates, folded in as each reply arrives (then let go)
        self.traffic: dict[str, list[dict[str, Any]]] = {}  # each site's bytes, step by step, for the run record
        self.ordered = True  # every round's updates were folded in the sites' order (RunningMean.ordered)

    def a_waited_site_is_gone(self) -> bool:
        """Asked while Flower pulls a reply: stop waiting if a site we wait for went offline."""
        return any(not self._online(site) for site in list(self.waiting_for))

    def emit(self, *events: dict[str, Any]) -> None:
        self.hub.events(self.run_id, list(events))

    def request(self, round_: int, phase: Phase, params: dict[str, np.ndarray]) -> StepRequest:
        t = self.task
        return StepRequest(
            run_id=self.run_id,
            source=t.source,
            source_hash=t.source_hash,
            dataset=t.dataset,
            project=t.project,
            researcher=t.researcher,
            seed=t.seed,
            round=round_,
            phase=phase,
            config=self.config,
            params=params,
            cohort=t.cohort.name if t.cohort else "",
            metrics=None if t.metrics is None else list(t.metrics),
            covariates=t.covariates,
        )

    # -- one exchange --------------------------------------------------------------
    def exchange(
        self, round_: int, phase: Phase, params: dict[str, np.ndarray], only: list[str] | None = None
    ) -> list[Reply]:
        """Send this step to every active site (or ``only`` these) and gather the replies."""
        started = time.monotonic()
        # starting the task processes (torch, the cell, the data) is not a round: no deadline for it
        timed = self.round_timeout is not None and phase != Phase.PREPARE
        deadline = started + float(self.round_timeout or 0) if timed else None
        pending, refused = self._dispatch(round_, phase, params, only)
        for reply in refused:
            self.absorb(round_, reply, phase)
        replies = refused + self._gather(round_, phase, pending, started, deadline)
        return sorted((r for r in replies if not r.failure), key=lambda r: r.site)

    def _dispatch(
        self, round_: int, phase: Phase, params: dict[str, np.ndarray], only: list[str] | None
    ) -> tuple[dict[str, str], list[Reply]]:
        """Push one message per site; the sites' message ids (pending) and the sites Flower refused."""
        message_type = MESSAGE_TYPE_TRAIN if phase == Phase.FIT else MESSAGE_TYPE_EVALUATE
        sites = sorted(self.active if only is None else set(only) & set(self.active))
        with stage("hub encode+sha+publish"):
            content = request_to_content(self.request(round_, phase, params), self._publisher(sites))
        self.step_bytes = payload_size(content)
        messages = [
            Message(content, dst_node_id=self.active[s], message_type=message_type, group_id=str(round_)) for s in sites
        ]
        ids: list[str | None] = list(self.grid.push_messages(messages))
        if len(ids) != len(sites):  # Flower refused the whole batch (it logs why, e.g. payload too large)
            ids = [None] * len(sites)
        pending = {mid: site for mid, site in zip(ids, sites, strict=True) if mid}
        status = {Phase.PREPARE: SiteState.PREPARING, Phase.FIT: SiteState.TRAINING}.get(phase, SiteState.EVALUATING)
        if asked_again := sorted(s for s in pending.values() if s in self.awaiting):  # still "waiting for approval"
            self.hub.ring(asked_again)
        self.emit(*(site_event(s, status, round_) for s in pending.values() if s not in self.awaiting))
        refused = [
            Reply(site, None, "Flower refused the message") for mid, site in zip(ids, sites, strict=True) if not mid
        ]
        return pending, refused

    def _publisher(self, sites: list[str]) -> Callable[[bytes | bytearray, str], None]:
        """Publish a large step once for all its sites; the previous step's payload is dropped then."""

        def publish(blob: bytes | bytearray, sha: str) -> None:
            self.hub.publish(blob, sha, sites)
            for old in self.published - {sha}:
                self.hub.unpublish(old)
            self.published = {sha}

        return publish

    def unpublish(self) -> None:
        """Drop the payload still published (the run is over: no site needs it)."""
        for old in self.published:
            try:
                self.hub.unpublish(old)
            except FlipError as exc:
                log.warning("could not drop payload %s from the hub: %s", old[:12], exc)
        self.published = set()

    def _gather(
        self, round_: int, phase: Phase, pending: dict[str, str], started: float, deadline: float | None
    ) -> list[Reply]:
        """Collect replies as they arrive (each absorbed at once), until every site replied, went away or is late."""
        replies: list[Reply] = []
        next_liveness = time.monotonic() + LIVENESS_SECONDS
        poll = POLL_MIN_SECONDS
        if phase == Phase.FIT and self.first_reply_seconds:
            # no reply is likely before the quickest site's last step time: don't poll for nothing
            time.sleep(min(FIRST_POLL_FRACTION * self.first_reply_seconds, LIVENESS_SECONDS))
        while pending:
            self.waiting_for = set(pending.values())
            arrived = self._pull(pending)
            if pending and time.monotonic() >= next_liveness:
                next_liveness = time.monotonic() + LIVENESS_SECONDS
                arrived.extend(self._offline(pending))
            if pending and deadline is not None and time.monotonic() >= deadline:
                arrived.extend(self._late(pending))
            for reply in arrived:
                self.absorb(round_, reply, phase)
            if phase == Phase.FIT and any(r.result for r in arrived) and not replies:
                self.first_reply_seconds = time.monotonic() - started
            replies.extend(arrived)
            poll = POLL_MIN_SECONDS if arrived else min(poll * POLL_GROWTH, POLL_MAX_SECONDS)
            if pending:
                time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
        self.waiting_for = set()
        return replies

    def _pull(self, pending: dict[str, str]) -> list[Reply]:
        """The replies on the SuperLink now (those to late messages are drained and dropped)."""
        arrived = []
        for msg in self.grid.pull_messages(list(pending) + sorted(self.stale)):
            reply_to = msg.metadata.reply_to_message_id
            self.stale.discard(reply_to)
            site = pending.pop(reply_to, None)
            if site is not None:
                arrived.append(self._reply(site, msg))
        return arrived

    def _late(self, pending: dict[str, str]) -> list[Reply]:
        """The round timeout has passed: the sites still computing sit this round out."""
        late = []
        for mid, site in list(pending.items()):
            pending.pop(mid)
            self.stale.add(mid)
            late.append(
                Reply(
                    site, None, f"no reply within the round timeout ({float(self.round_timeout or 0):g} s)", late=True
                )
            )
        return late

    def _reply(self, site: str, msg: Message) -> Reply:
        if msg.has_error():
            # A site that dies mid-upload surfaces as a Flower error first; say what happened.
            if wait_until(lambda: not self._online(site), OFFLINE_GRACE_SECONDS, 0.1):
                return Reply(site, None, OFFLINE)
            reason = msg.error.reason if msg.error is not None else "no reason given"
            return Reply(site, None, f"the site's Flower node reported an error ({(reason or '')[:200]})")
        try:
            with stage("hub take+verify+decode"):
                result = content_to_result(msg.content, lambda sha, size: self.hub.take(site, sha, size))
        except FlipError as exc:  # its payload could not be fetched, or is not the one its message names
            return Reply(site, None, f"the site's reply could not be read: {exc}")
        if result.status == StepStatus.PENDING:
            return Reply(site, result, pending=True)
        if result.status != StepStatus.OK:
            return Reply(site, result, describe_failure(result))
        return Reply(site, result, sent_bytes=payload_size(msg.content))

    def _gone(self, site: str, status: dict[str, dict[str, Any]]) -> str:
        """Why ``site`` can no longer answer this round ("" while it can)."""
        info = status.get(site)
        if info is None or info.get("status") != Presence.ONLINE:
            return OFFLINE
        if info.get("node_id") != self.active.get(site):
            return RESTARTED
        return ""

    def _online(self, site: str) -> bool:
        return not self._gone(site, self.hub.sites())

    def _offline(self, pending: dict[str, str]) -> list[Reply]:
        status = self.hub.sites()
        gone = []
        for mid, site in list(pending.items()):
            if reason := self._gone(site, status):
                pending.pop(mid)
                gone.append(Reply(site, None, reason))
        return gone

    # -- bookkeeping -----------------------------------------------------------------
    def absorb(self, round_: int, reply: Reply, phase: Phase = Phase.FIT) -> None:
        """Stream one reply's events to the hub as soon as it arrives; drop a failed site."""
        if reply.late:
            self.emit(site_event(reply.site, SiteState.LATE, round_, detail=reply.failure))
            return
        if reply.failure:
            self.failed[reply.site] = reply.failure
            self.active.pop(reply.site, None)
            self.emit(site_event(reply.site, SiteState.FAILED, round_, detail=reply.failure))
            return
        result = reply.result
        assert result is not None
        if reply.pending:
            if reply.site not in self.awaiting:
                self.awaiting.add(reply.site)
                self.emit(site_event(reply.site, SiteState.WAITING_APPROVAL, round_, detail=result.error_where))
            return
        self.awaiting.discard(reply.site)
        self.site_info[reply.site] = {
            "version": result.version,
            "fingerprint": result.fingerprint,
            "train_rows": result.num_train,
            "test_rows": result.num_test,
            "device": result.device,
            "threads": result.threads,
        }
        traffic = {"received_bytes": self.step_bytes, "sent_bytes": reply.sent_bytes}
        self.traffic.setdefault(reply.site, []).append({"round": round_, "phase": phase, **traffic})
        self.emit(*reply_events(reply.site, round_, phase, result, traffic))
        if phase == Phase.FIT:
            self.running.add(result.params, result.num_train, reply.site)
            result.params = {}  # folded in: the hub keeps one running sum, not each site's model

    def readmit(self, round_: int) -> None:
        """Sites that went offline and are back (a new Flower node, still holding the dataset) rejoin."""
        waiting = [site for site, why in self.failed.items() if why in REJOINABLE]
        if not waiting:
            return
        status = self.hub.sites()
        for site in waiting:
            info = status.get(site, {})
            holds = any(d.get("name") == self.dataset for d in info.get("datasets", []))
            if info.get("status") == Presence.ONLINE and info.get("node_id") is not None and holds:
                self.active[site] = int(info["node_id"])
                del self.failed[site]
                self.emit(
                    site_event(
                        site, SiteState.REJOINED, round_, detail="back online: it takes part again from this round"
                    )
                )

    def check_quorum(self, round_: int, good: list[Reply] | None = None) -> None:
        """Stop the run with a sentence if too few sites remain, or (``good``) too few replied in time."""
        need = self.task.min_sites
        if good is not None and len(good) < need and len(self.active) >= need:
            late = sorted(set(self.active) - {r.site for r in good})
            raise RunAborted(
                f"Run stopped in round {round_}: only {len(good)} site(s) replied within the round timeout "
                f"({float(self.round_timeout or 0):g} s) but --min-sites is {need}. Late: {', '.join(late)}."
            )
        if len(self.active) >= need:
            return
        why = "; ".join(f"{site}: {reason}" for site, reason in sorted(self.failed.items()))
        left = ", ".join(sorted(self.active)) or "none"
        raise RunAborted(
            f"Run stopped in round {round_}: {len(self.active)} site(s) remain ({left}) but "
            f"--min-sites is {need}. Failed: {why}."
        )

    def global_metrics(self, round_: int, phase: Phase, good: list[Reply], eval_round: int) -> None:
        if events := global_events(round_, phase, [r.result for r in good if r.result], eval_round):
            self.emit(*events)

    def prepare(self, params: dict[str, np.ndarray]) -> list[Reply]:
        """Start the sites' task processes and evaluate the initial model (round 0 metrics).

        A site whose admin has not yet approved the task's code answers "pending": it is shown
        waiting for approval and asked again, at growing intervals, until it approves (and joins)
        or refuses, or the run stops; the others wait with their task processes started."""
        ready = self.exchange(0, Phase.PREPARE, params)
        interval = APPROVAL_POLL_MIN_SECONDS
        while waiting := [r.site for r in ready if r.pending and r.site in self.active]:
            self.check_quorum(0)
            time.sleep(interval)
            interval = min(interval * POLL_GROWTH, APPROVAL_POLL_MAX_SECONDS)
            ready = [r for r in ready if not r.pending] + self.exchange(0, Phase.PREPARE, params, only=waiting)
        return sorted(ready, key=lambda r: r.site)

    # -- the run ---------------------------------------------------------------------
    def run(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rounds = self.task.rounds
        self.emit(
            run_event(RunStatus.RUNNING, sites=sorted(self.active)),
            *(site_event(s, SiteState.WAITING, 0) for s in sorted(self.active)),
        )
        self.check_quorum(0)
        ready = self.prepare(params)
        self.check_quorum(0, ready)
        self.global_metrics(0, Phase.PREPARE, ready, eval_round=0)
        for round_ in range(1, rounds + 1):
            started = time.monotonic()
            self.readmit(round_)
            self.running = RunningMean()
            good = self.exchange(round_, Phase.FIT, params)
            self.check_quorum(round_, good)
            self.global_metrics(round_, Phase.FIT, good, eval_round=round_ - 1)
            with stage("hub aggregate"):
                params = self.strategy.step(params, self.running.mean())
            self.ordered = self.ordered and self.running.ordered
            self.emit(round_event(round_, len(good), time.monotonic() - started))
        self.readmit(rounds)
        good = self.exchange(rounds, Phase.EVALUATE, params)
        self.check_quorum(rounds, good)
        self.global_metrics(rounds, Phase.EVALUATE, good, eval_round=rounds)
        return params


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_id = str(context.run_config["flip-run-id"])
    hub = HubLink.from_env()
    if run_id == QUERY_LINE_RUN_ID:  # not a training run: the line that carries federated queries
        with tuned_grid_pulls(lambda: False):
            QueryLine(grid, hub, int(context.run_id)).serve()
        return
    try:
        task = hub.task(run_id)
        loop = RoundLoop(grid, hub, task)
        with tuned_grid_pulls(loop.a_waited_site_is_gone):
            try:
                params = loop.run(hub.model(task.initial_model))
            finally:
                loop.unpublish()
        sha = hub.put_model(run_id, params)
        ended = run_event(
            RunStatus.COMPLETED,
            model_sha256=sha,
            site_info=loop.site_info,
            failed_sites=loop.failed,
            traffic=loop.traffic,
            aggregation_ordered=loop.ordered,
        )
        hub.events(run_id, [ended])
    except RunAborted as aborted:
        hub.events(run_id, [run_event(RunStatus.FAILED, reason=str(aborted))])
    except Exception as exc:  # noqa: BLE001 - report, then let Flower mark the run failed too
        reason = f"internal error in the FLIP server loop: {type(exc).__name__}: {exc}"
        hub.events(run_id, [run_event(RunStatus.FAILED, reason=reason)])
        traceback.print_exc()
        raise
