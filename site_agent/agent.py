"""``flip-site start``: the site's Flower node, its task processes, and its line to the hub.

The agent is the site's SuperNode: it registers with the SuperLink's fleet API and keeps that
connection for its lifetime (``site_agent.fleet``). It announces the site's datasets (metadata
only) to the coordinator and holds a presence stream open, so that the hub sees at once when
the site goes away. Down the same stream the coordinator rings a doorbell ("wake") when the
server loop has put a message for this site on the SuperLink; the agent then pulls at once.
Without a ring it still polls the fleet API every ``IDLE_POLL_SECONDS``, so a lost ring costs
time, never a message.

Each message is one step of a run. The site's policy decides first (``site_agent.governance.gate``):
only an allowed step reaches the run's warm task process (``site_agent.tasks.service``), and only what
the output guard lets through goes back; both are written to the site's audit log. A message of
type "query" is a federated query, answered by the agent itself under the site's disclosure
control (``site_agent.queries.service``): no researcher code runs for it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from flip_core import __version__
from flip_core.bulk import BulkClient, BulkError
from flip_core.certs import SITE_KEYS, load_site_keys
from flip_core.protocol import StepResult, decode_request, encode_result
from flip_core.query import MESSAGE_TYPE_QUERY, QueryReply, encode_reply
from flip_core.status import Presence, StepStatus
from flip_core.trace import stage
from flip_core.versions import RECORDED_PACKAGES, environment_hash, package_versions
from flip_core.wire import blob_to_content, content_to_blob
from site_agent.data import formats
from site_agent.data.catalog import CatalogError, Handed, SiteConfig
from site_agent.disclosure.guard import announced
from site_agent.exits import SiteExit
from site_agent.fleet import FleetRefused, connect, release_session
from site_agent.governance.gate import Governance
from site_agent.queries.cohorts import CohortRefused, CohortStore
from site_agent.sandbox import cgroups, isolation
from site_agent.tasks.adoption import Adoption
from site_agent.tasks.service import TaskService
from site_agent.tasks.worker import ENV_THREADS

if TYPE_CHECKING:
    from flwr.app import Message, RecordDict

    from site_agent.queries.service import QueryService

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 0.5
RESTART_SECONDS = 1.0
REFUSED_SECONDS = 5.0  # a refusal that persists this long (its key is not registered) ends the agent
IDLE_POLL_SECONDS = 5.0
WARM_SECONDS = 900.0  # keep a spare task process this long after start or the last step
AGENT_FAILED = "SiteAgentError"  # a step the agent itself could not answer (its log says why)


def task_threads() -> int:
    """torch's threads in the site's task processes, as the site sets them (``FLIP_TASK_THREADS``; 0: torch's
    default), for every result: the task process's own count is its to change."""
    value = os.environ.get(ENV_THREADS, "")
    return int(value) if value.isdigit() else 0


class SiteAgent:
    def __init__(
        self,
        site: SiteConfig,
        superlink: str,
        coordinator: str,
        token: str,
        warm_seconds: float = WARM_SECONDS,
        *,
        ca: Path | None = None,
        key: Path | None = None,
        keep_scratch: bool = False,
        device: str = "cpu",
    ) -> None:
        """``ca`` (the consortium's CA certificate) and ``key`` (this site's registered key pair): TLS to the
        hub and SuperNode authentication; without them (``--insecure``) plain HTTP, for debugging only.
        ``keep_scratch``: leave each run's scratch folder behind when it ends (debugging a task)."""
        self.site = site
        self.device = device  # where its tasks run (site_agent.tasks.devices), announced
        self.superlink = superlink
        self.coordinator = coordinator.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.ca = None if ca is None else str(ca)
        self.keys = None if key is None else load_site_keys(key)
        # per call: requests lets REQUESTS_CA_BUNDLE override a session's own verify setting
        self.verify: str | bool = self.ca or True
        self.bulk = BulkClient(self.coordinator, token, self.ca)  # payloads too large for a Flower message
        self.node_id: int | None = None
        self.stopping = threading.Event()
        self.exit_code: int = SiteExit.OK
        self.node_ready = threading.Event()
        self.doorbell = threading.Event()
        # the site's policy, read once; what it knows of every step whatever a task process says of it
        self.governance = Governance(site, device=device, threads=task_threads())
        self.cohorts = CohortStore(site.root)
        self._query_service: QueryService | None = None
        self._queries_lock = threading.Lock()
        self.tasks = TaskService(
            site.name,
            site.root,
            warm_seconds,
            on_change=lambda: self._safe_announce(Presence.ONLINE),
            keep_scratch=keep_scratch,
            limits=self.governance.policy.limits,
        )
        self.governance.failures.update(self.tasks.failures)  # the sentences of the limits it holds tasks to

    # -- coordinator ----------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        threshold = self.governance.policy.disclosure_threshold  # counts under it never leave, not even here
        return {
            "version": __version__,
            "warm": self.tasks.warm,
            "device": self.device,
            "packages": package_versions(*RECORDED_PACKAGES),  # for run records: what a rerun must match
            "environment": environment_hash(),
            "datasets": [
                announced(d.summary(), threshold, self.governance.policy.admitted(name))
                for name, d in self.site.datasets.items()
            ],
        }

    def announce(self, state: str = Presence.ONLINE) -> None:
        body = {"site": self.site.name, "node_id": self.node_id, "info": self.info(), "state": state}
        response = self.session.post(f"{self.coordinator}/site/announce", json=body, timeout=10, verify=self.verify)
        if response.status_code == 401:
            raise SystemExit(f"the coordinator at {self.coordinator} refused this site's token")
        response.raise_for_status()

    def _presence(self) -> None:
        """Hold the presence stream; reconnect (and announce again) whenever it drops."""
        while not self.stopping.is_set():
            try:
                self.node_ready.wait()
                self.announce()
                threading.Thread(target=self.tasks.warm_up, name="warm-up", daemon=True).start()  # after: online first
                url = f"{self.coordinator}/site/presence/{self.site.name}"
                with self.session.get(url, stream=True, timeout=(5, 5), verify=self.verify) as response:
                    response.raise_for_status()
                    self.doorbell.set()  # pull once: a ring may have gone unheard while we were away
                    for line in response.iter_lines(chunk_size=None):  # each line as it arrives
                        if self.stopping.is_set():
                            return
                        if line == b"wake":
                            self.doorbell.set()
            except (requests.RequestException, OSError) as exc:
                log.info("presence stream to the coordinator dropped (%s: %s); reconnecting", type(exc).__name__, exc)
            self.stopping.wait(RECONNECT_SECONDS)

    def _safe_announce(self, state: str) -> None:
        try:
            self.announce(state)
        except (requests.RequestException, SystemExit) as exc:
            log.info("could not tell the coordinator this site is %s: %s", state, exc)

    # -- the fleet API --------------------------------------------------------------
    def _serve(self) -> None:
        """Stay registered with the SuperLink; pull on every ring or idle poll."""
        refused_since: float | None = None
        while not self.stopping.is_set():
            try:
                with connect(self.superlink, root_certificates=self.ca, authentication_keys=self.keys) as link:
                    self.node_id = link.node_id
                    refused_since = None
                    self._remember_node(link.node_id)
                    log.info("registered with the SuperLink at %s as node %s", self.superlink, link.node_id)
                    self.node_ready.set()
                    while not self.stopping.is_set():
                        self.doorbell.wait(IDLE_POLL_SECONDS)
                        self.doorbell.clear()
                        while not self.stopping.is_set() and (message := link.receive()) is not None:
                            if message.metadata.message_type == MESSAGE_TYPE_QUERY and self._query_service:
                                self._handle(link, message)  # milliseconds: replying first beats pulling again
                            else:
                                threading.Thread(target=self._handle, args=(link, message), daemon=True).start()
            except FleetRefused as refused:
                refused_since = refused_since or time.monotonic()
                if time.monotonic() - refused_since > REFUSED_SECONDS:
                    log.error(
                        "the SuperLink at %s refused this site: %s\nA site whose key is not registered "
                        "there is refused: the hub operator runs `flip site register %s KEY.pub`",
                        self.superlink,
                        str(refused).replace("\n", " "),
                        self.site.name,
                    )
                    self.exit_code = SiteExit.HUB_REFUSED
                    self.stopping.set()
                    return
                if refused.still_online and self._release_previous_session():
                    continue
                log.info("the SuperLink refused this site (%s); asking again", str(refused).replace("\n", " "))
            except Exception:  # noqa: BLE001 - the SuperLink may restart: register again
                log.exception("the fleet connection failed; registering again")
            if not self.stopping.is_set():
                self.node_ready.clear()
                self.node_id = None
                self._safe_announce(Presence.OFFLINE)
                self.stopping.wait(RESTART_SECONDS)

    def _node_file(self) -> Path:
        return self.site.root / SITE_KEYS / "node-id"

    def _remember_node(self, node_id: int) -> None:
        if self.keys is not None:
            self._node_file().write_text(str(node_id))

    def _release_previous_session(self) -> bool:
        """A crashed agent's session of this site (same key, same node) still counts online at the SuperLink:
        end it, so that this agent need not wait for it to lapse. True when it was ended."""
        if self.keys is None or self.ca is None or not self._node_file().exists():
            return False
        node_id = int(self._node_file().read_text())
        try:
            release_session(self.superlink, root_certificates=self.ca, authentication_keys=self.keys, node_id=node_id)
        except Exception as exc:  # noqa: BLE001 - not ours, or not online: the refusal stands
            log.info("could not end this site's previous session at the SuperLink (%s)", exc)
            return False
        log.info("ended this site's previous session (node %s) at the SuperLink: a crashed agent's", node_id)
        return True

    def _handle(self, link: Any, message: Message) -> None:
        started = time.monotonic()
        query = message.metadata.message_type == MESSAGE_TYPE_QUERY
        try:
            with stage("site fetch+verify"):
                blob = content_to_blob(message.content, self._fetch)
            result = self._queries().answer(blob) if query else self._step(blob)
        except Exception as exc:  # noqa: BLE001 - the hub gets a type, the site log the details
            log.exception("could not answer a message of Flower run %s", message.metadata.run_id)
            where = "the site agent"
            # a step's: one fixed type (bytes a task process wrote could choose which exception the agent met)
            result = (
                encode_reply(QueryReply(self.site.name, StepStatus.ERROR, f"{where} failed ({type(exc).__name__})"))
                if query
                else encode_result(
                    StepResult(site=self.site.name, status=StepStatus.ERROR, error_type=AGENT_FAILED, error_where=where)
                )
            )
        try:
            with stage("site sha+upload"):
                content = self._reply_content(result, query)
            with stage("site flower reply"):
                link.reply(message, content, time.monotonic() - started)
        except Exception:  # noqa: BLE001 - the hub's liveness check reports the missing reply
            log.exception("could not send the reply to Flower run %s", message.metadata.run_id)

    def _reply_content(self, result: bytes | bytearray, query: bool) -> RecordDict:
        """The reply's content; when its payload cannot be handed to the hub, a small reply saying so instead
        (the round loop then marks this site failed at once, rather than waiting for an answer)."""
        try:
            return blob_to_content(result, self._publish)
        except BulkError as exc:
            log.error("the hub did not take this site's reply payload: %s", exc)
            why = "the site agent (the hub did not take its reply's payload)"
            failed = (
                encode_reply(QueryReply(self.site.name, StepStatus.ERROR, why))
                if query
                else encode_result(
                    StepResult(
                        site=self.site.name, status=StepStatus.ERROR, error_type="PayloadRefused", error_where=why
                    )
                )
            )
            return blob_to_content(failed)

    def _fetch(self, sha: str, size: int) -> bytearray:
        """A step's payload, published by the hub for this site (checked against its hash by the caller)."""
        return self.bulk.get(f"/site/blobs/{sha}?site={self.site.name}", size)

    def _publish(self, blob: bytes | bytearray, sha: str) -> None:
        """This site's reply payload, for the hub's round loop only (sent after the output guard passed it)."""
        self.bulk.put(f"/site/blobs/{sha}?site={self.site.name}", blob)

    def _step(self, blob: bytes | bytearray) -> bytes | bytearray:
        """One step of a training run: the policy, the task process, the output guard."""
        with stage("site decode+admit"):
            request = decode_request(blob)
            answer = self.governance.admit(request)  # policy first: no task code runs unless it allows
        if answer is not None:
            return encode_result(answer)
        seconds, memory_mb = self.governance.limits(request)
        rows = index = None
        if request.cohort:  # the rows frozen under that name here: the task process is handed them, not the file
            try:
                entry = self.site.dataset(request.dataset)
                cohort = self.cohorts.checked(request.project, request.cohort, request.dataset, entry.fingerprint)
                rows, index = list(cohort.rows), list(cohort.index) or None
            except (CohortRefused, CatalogError) as exc:
                refused = StepResult(
                    site=self.site.name, status=StepStatus.REFUSED, error_where=f"{self.site.name}: {exc}"
                )
                return encode_result(refused)
        with stage("site task step"):
            started = time.monotonic()
            # made when the run adopts a process
            adoption = self._adoption(request.dataset, request.cohort, rows, request.covariates, index)
            produced = self.tasks.step(blob, seconds, memory_mb, adoption)  # isolated, killed at its time limit
            took = time.monotonic() - started  # the agent's clock, never the task process's
        with stage("site release"):  # the output guard rebuilds what leaves from the agent's own facts, audited
            released = self.governance.release(
                request,
                produced,
                seconds=took,
                cohort_rows=None if rows is None else len(rows),
                notes=self.tasks.notes(request.run_id),
            )
        self.tasks.settle(request.run_id, released)  # a step the guard failed ends the run's process here too
        return released

    def _adoption(
        self,
        dataset: str,
        cohort: str,
        rows: list[int] | None,
        covariates: dict[str, Any] | None = None,
        index: list[str] | None = None,
    ) -> Callable[[], Adoption]:
        """What a run's task process is handed when the run adopts it: the run's rows only (``rows``, the cohort's;
        None: the whole dataset), read and cut here, outside any sandbox (``site_agent.data.formats.handed``); with
        ``covariates``, the per-person table they declare of an OMOP database (at the cohort's ``index`` dates)."""

        def adoption() -> Adoption:
            entry = self.site.datasets.get(dataset)
            handed = Handed(b"") if entry is None else formats.handed(self.site, dataset, rows, covariates, index)
            return Adoption(self.site.name, entry, cohort, handed)

        return adoption

    def _queries(self) -> QueryService:
        """The query service, made at the first query (it loads pandas, which training steps never need here)."""
        with self._queries_lock:
            if self._query_service is None:
                from site_agent.queries.service import QueryService

                self._query_service = QueryService(self.site, self.governance, self.cohorts)
            return self._query_service

    def run(self) -> int:
        def stop(*_: Any) -> None:
            self.stopping.set()
            self.doorbell.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
        log.info("task processes at this site: %s", isolation.describe(isolation.protections()))
        self.tasks.groups = cgroups.TaskGroups.open()  # a cgroup per task process, where the host delegates them
        log.info("a run's memory and processes: %s", cgroups.describe(self.tasks.groups))
        threading.Thread(target=self.tasks.reap_forever, name="reaper", daemon=True).start()
        threading.Thread(target=self._presence, name="presence", daemon=True).start()
        fleet = threading.Thread(target=self._serve, name="fleet", daemon=True)
        fleet.start()
        self.stopping.wait()
        fleet.join(timeout=5)
        self.tasks.close()
        self._safe_announce(Presence.OFFLINE)
        log.info("site agent %s stopped", self.site.name)
        return self.exit_code
