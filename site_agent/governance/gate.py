"""The site's word on every step: policy before it runs, the output guard after, the audit of both.

The site agent (trusted FLIP code) calls :meth:`Governance.admit` with a decoded step before
any of the task's code runs, and :meth:`Governance.release` with what the task process
produced before anything goes back to the hub. Decisions come from ``site_agent.governance.policy``
(pure), code approvals from ``site_agent.governance.approvals``, the guard from ``site_agent.disclosure.guard``;
each decision and each outcome is a record in the site's audit log.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from flip_core.airlock import ItemKind
from flip_core.cell import task_hash
from flip_core.codec import archive_is_canonical
from flip_core.covariates import read_covariates
from flip_core.protocol import (
    RESULT_ROOM,
    StepRequest,
    StepResult,
    decode_result,
    encode_result,
    header_room,
    reheader_result,
)
from flip_core.status import Phase, StepStatus
from site_agent.data.catalog import SiteConfig, read_site_toml
from site_agent.disclosure.guard import Declared, Known, describe_outgoing, guard, private_result
from site_agent.disclosure.privacy import DEFAULT_DELTA, PrivacyLedger, noise_multiplier, privatise
from site_agent.governance.airlock import Airlock
from site_agent.governance.approvals import ApprovalStore
from site_agent.governance.audit import AuditLog
from site_agent.governance.policy import (
    ALLOW,
    PENDING,
    REFUSE,
    Budget,
    Decision,
    SitePolicy,
    TaskFacts,
    decide,
    parse_policy,
)

DP_WITHHELD = "metrics and row counts withheld: a differential-privacy run releases only noised parameters"


@dataclass(frozen=True)
class PrivateRun:
    """A run's differential-privacy request as this site will honour it."""

    epsilon: float
    clip: float
    rounds: int
    delta: float

    @property
    def noise_multiplier(self) -> float:
        return noise_multiplier(self.epsilon, self.delta, self.rounds)


def private_run(config: dict[str, Any], delta: float) -> PrivateRun | None:
    """The run's ``dp_*`` settings (None when it does not ask for DP); ValueError says what is wrong."""
    if config.get("dp_epsilon") is None:
        return None
    try:
        run = PrivateRun(
            float(config["dp_epsilon"]), float(config.get("dp_clip", 1.0)), int(config.get("dp_rounds", 1)), delta
        )
    except (TypeError, ValueError):
        raise ValueError("its differential-privacy settings are not numbers") from None
    if not (0 < run.epsilon < float("inf") and 0 < run.clip < float("inf") and run.rounds >= 1):
        raise ValueError("its differential-privacy settings are out of range")
    run.noise_multiplier  # noqa: B018 - raises ValueError for an epsilon too small to reach
    return run


class Governance:
    def __init__(
        self, site: SiteConfig, policy: SitePolicy | None = None, *, device: str = "cpu", threads: int = 0
    ) -> None:
        """``device`` and ``threads``: where the site's task processes run and how many threads it gave them, what
        every result says of them whatever its task process says (``site_agent.disclosure.guard.Known``)."""
        self.site = site
        self.device = device
        self.threads = threads
        self.policy = policy or parse_policy(site.name, read_site_toml(site.root))
        self.approvals = ApprovalStore(site.root)
        self.audit = AuditLog(site.root)
        self.ledger = PrivacyLedger(site.root)
        self.airlock = Airlock(site.root, site.name, self.audit)
        # the site's limits that stop a step, each with its one sentence (the agent's task service says them)
        self.failures: dict[str, tuple[str, ...]] = {}
        self._decided: set[tuple[str, str]] = set()  # (run, verdict) already in the audit log
        self._lock = threading.Lock()

    def admit(self, request: StepRequest) -> StepResult | None:
        """None when the step may run; otherwise the result the hub gets instead ("refused" or "pending").

        The first decision of each kind per run is audited (a task waiting for approval asks again
        and again: one record says so), a covariate specification that is not one among them."""
        refusal: Decision | None = None
        try:  # the site hashes the source (and covariates) itself: a claimed hash proves nothing
            # the specification as this site reads it, every default written out: what it hashes, builds and shows
            # its admin (never the text as sent, whose second "features" key, say, a reader could miss)
            covariates = (
                None if request.covariates is None else read_covariates(request.covariates).model_dump(mode="json")
            )
            code_hash = task_hash(request.source, covariates)
        except ValueError as exc:
            covariates, code_hash = None, ""
            refusal = Decision(REFUSE, f"{self.site.name}: {exc}")
        epsilon_asked = request.config.get("dp_epsilon")
        try:
            epsilon = None if epsilon_asked is None else float(epsilon_asked)
        except (TypeError, ValueError):  # a hub's step is data too: a setting that is not a number is refused
            epsilon = None
            refusal = refusal or Decision(
                REFUSE, f"{self.site.name} cannot run this task with differential privacy: its epsilon is not a number"
            )
        facts = TaskFacts(
            project=request.project,
            researcher=request.researcher,
            dataset=request.dataset,
            source_hash=code_hash,
            dp_epsilon=epsilon,
        )
        if refusal is not None:
            decision = refusal
        else:
            try:
                budget = self._budget(request)
            except ValueError as exc:
                decision = Decision(REFUSE, f"{self.site.name} cannot run this task with differential privacy: {exc}")
            else:
                decision = decide(self.policy, facts, self.approvals.approval(facts.project, code_hash), budget)
        if decision.verdict == PENDING:
            self.approvals.request(
                project=facts.project,
                researcher=facts.researcher,
                dataset=facts.dataset,
                source=request.source,
                source_hash=code_hash,
                run_id=request.run_id,
                covariates=covariates,
            )
        with self._lock:
            first = (request.run_id, decision.verdict) not in self._decided
            self._decided.add((request.run_id, decision.verdict))
        if first:
            self.audit.append(
                "decision",
                run=request.run_id,
                project=facts.project,
                researcher=facts.researcher,
                dataset=facts.dataset,
                code_hash=code_hash,
                verdict=decision.verdict,
                reason=decision.reason,
            )
        if decision.verdict == ALLOW:
            return None
        status = StepStatus.PENDING if decision.verdict == PENDING else StepStatus.REFUSED
        return StepResult(site=self.site.name, status=status, error_where=decision.reason)

    def _delta(self, project: str) -> float:
        found = self.policy.project(project)
        return found.dp_delta if found else DEFAULT_DELTA

    def _budget(self, request: StepRequest) -> Budget:
        """The project's epsilon here now and after this step's releases (all of the run's, when it starts)."""
        run = private_run(request.config, self._delta(request.project))
        project = self.policy.project(request.project)
        if run is None or project is None or project.max_epsilon is None:
            return Budget()
        count = run.rounds if request.phase == Phase.PREPARE else 1 if request.phase == Phase.FIT else 0
        spend = self.ledger.spend(request.project, run.delta, run.noise_multiplier, count)
        return Budget(spend.spent, spend.after)

    def limits(self, request: StepRequest) -> tuple[float, int]:
        """The step's time limit (seconds) and the run's memory limit (MB) under this site's policy."""
        project = self.policy.project(request.project)
        assert project is not None, "admit() refuses a project the site does not know"
        return project.time_limit_seconds, project.memory_limit_mb

    def known(self, request: StepRequest, seconds: float = 0.0, cohort_rows: int | None = None) -> Known:
        """What this site knows of ``request``'s step itself: its catalog's dataset (fingerprint, split rows; a
        cohort's ``cohort_rows`` bound them), the cell's lines, the project's time limit, the agent's ``seconds``."""
        entry = self.site.datasets.get(request.dataset)
        project = self.policy.project(request.project)
        known = Known(
            site=self.site.name,
            device=self.device,
            threads=self.threads,
            seconds=max(0.0, seconds),
            lines=request.source.count("\n") + 1,
            time_limit=project.time_limit_seconds if project else 0.0,
            holds_dataset=entry is not None,
            failures=self.failures,
        )
        if entry is None:
            return known
        rows = (entry.train_rows, entry.test_rows) if cohort_rows is None else (cohort_rows, cohort_rows)
        return replace(
            known, fingerprint=entry.fingerprint, train_rows=rows[0], test_rows=rows[1], exact=cohort_rows is None
        )

    def release(
        self,
        request: StepRequest,
        produced: bytes | bytearray,
        *,
        seconds: float = 0.0,
        cohort_rows: int | None = None,
        notes: tuple[str, ...] = (),
    ) -> bytes | bytearray:
        """What may leave the site of ``produced`` (the task process's result, a claim), rebuilt and audited.

        ``seconds``: the step by the agent's clock; ``cohort_rows``: the rows of the run's cohort, if it has one;
        ``notes``: the agent's own sentences of a limit the step reached without failing (its output cut in the log),
        told with what the guard withheld (not in a private run, which tells none).
        When the guard let the parameters through as they came and no noise is added, the guarded fields
        are written into ``produced``'s header in place and the parameters are not encoded again."""
        try:
            decoded = decode_result(produced)
        except Exception:  # noqa: BLE001 - the task process's bytes: how they fail to decode is its choice
            decoded = StepResult(site=self.site.name, status=StepStatus.ERROR, error_type="BadResult")
        if decoded.status != StepStatus.OK and isinstance(decoded.detail, str) and decoded.detail:
            self.airlock.keep(ItemKind.TRACEBACK, request.run_id, _kept_facts(request, decoded), decoded.detail)
        if decoded.status == StepStatus.OK and request.phase == Phase.EVALUATE and isinstance(decoded.report, str):
            self.airlock.keep(ItemKind.EVALUATION, request.run_id, _kept_facts(request, decoded), decoded.report)
        guarded = guard(
            decoded,
            Declared.from_request(request),
            self.policy.threshold(request.project),
            self.known(request, seconds, cohort_rows),
            metrics=self.policy.metrics(request.project),
        )
        result, privacy = guarded.result, dict[str, Any]()
        result.withheld = "; ".join(filter(None, (result.withheld, *notes)))
        run = private_run(request.config, self._delta(request.project))  # admit() has checked it
        if run is not None:
            result, privacy = self._private(request, result, run)
            guarded.stripped.append(DP_WITHHELD)
        self.audit.append(
            "outcome",
            run=request.run_id,
            round=request.round,
            phase=request.phase,
            outgoing=describe_outgoing(result),
            stripped=guarded.stripped,
            **privacy,
        )
        return _leaving(produced, decoded, result)

    def _private(self, request: StepRequest, result: StepResult, run: PrivateRun) -> tuple[StepResult, dict[str, Any]]:
        """``result`` as a differential-privacy run may release it, charged to the project's ledger first."""
        out = private_result(result)
        privacy: dict[str, Any] = {}
        if out.params:
            z = run.noise_multiplier
            self.ledger.charge(request.project, request.run_id, request.round, z)  # before anything leaves
            rng = np.random.default_rng(secrets.randbits(128))  # never the run's seed: the hub knows it
            out.params = privatise(out.params, request.params, run.clip, z, rng)
            out.num_train = 1  # each site's update counts the same: its size is not released
            privacy = {"dp": {"noise_multiplier": z, "clip": run.clip, "delta": run.delta}}
        out.dp_epsilon = self.ledger.run_spent(request.project, request.run_id, run.delta)
        out.dp_project_epsilon = self.ledger.spend(request.project, run.delta).spent
        if privacy:
            privacy["dp"].update(run_epsilon=out.dp_epsilon, project_epsilon=out.dp_project_epsilon)
        return out, privacy


def _kept_facts(request: StepRequest, claimed: StepResult) -> dict[str, Any]:
    """What the airlock keeps beside a failed step's traceback or a report: the step, and whose run it is."""
    return {
        "round": request.round,
        "phase": str(request.phase),
        "researcher": request.researcher,
        "project": request.project,
        "dataset": request.dataset,
        "error_type": str(claimed.error_type)[:100],
        "error_line": claimed.error_line if isinstance(claimed.error_line, int) else 0,
    }


def _leaving(produced: bytes | bytearray, decoded: StepResult, result: StepResult) -> bytes | bytearray:
    """The bytes of ``result``: the task process's own frame with the header rewritten in place when they are
    exactly the canonical encoding of the parameters the guard passed (nothing hidden beside them) in a header room
    of the standard size (so that its size says nothing of the task's header), else encoded afresh here."""
    same = (
        bool(result.params)
        and result.params.keys() == decoded.params.keys()
        and all(result.params[k] is decoded.params[k] for k in result.params)
    )
    if (
        same
        and isinstance(produced, bytearray)
        and header_room(produced) == RESULT_ROOM
        and archive_is_canonical(produced, result.params)
        and reheader_result(produced, result)
    ):
        return produced
    return encode_result(result, reserve=1)  # the header padded to the standard room, as the task process's is
