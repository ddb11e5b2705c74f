"""The site's word on every step: policy before it runs, the output guard after, the audit of both.

The site agent (trusted FLIP code) calls :meth:`Governance.admit` with a decoded step before
any of the task's code runs, and :meth:`Governance.release` with what the task process
produced before anything goes back to the hub. Decisions come from ``site_agent.policy``
(pure), code approvals from ``site_agent.approvals``, the guard from ``site_agent.guard``;
each decision and each outcome is a record in the site's audit log.
"""

from __future__ import annotations

import threading

from site_agent.approvals import ApprovalStore
from site_agent.audit import AuditLog
from site_agent.catalog import SiteConfig, read_site_toml
from site_agent.guard import Declared, describe_outgoing, guard
from site_agent.policy import ALLOW, PENDING, SitePolicy, TaskFacts, decide, parse_policy
from site_agent.protocol import StepRequest, StepResult, decode_result, encode_result, source_hash


class Governance:
    def __init__(self, site: SiteConfig, policy: SitePolicy | None = None) -> None:
        self.site = site
        self.policy = policy or parse_policy(site.name, read_site_toml(site.root))
        self.approvals = ApprovalStore(site.root)
        self.audit = AuditLog(site.root)
        self._decided: set[tuple[str, str]] = set()  # (run, verdict) already in the audit log
        self._lock = threading.Lock()

    def admit(self, request: StepRequest) -> StepResult | None:
        """None when the step may run; otherwise the result the hub gets instead ("refused" or "pending").

        The first decision of each kind per run is audited (a task waiting for approval asks again
        and again: one record says so)."""
        code_hash = source_hash(request.source)  # the site hashes the source itself: a claimed hash proves nothing
        epsilon = request.config.get("dp_epsilon")
        facts = TaskFacts(project=request.project, researcher=request.researcher, dataset=request.dataset,
                          source_hash=code_hash, dp_epsilon=None if epsilon is None else float(epsilon))
        decision = decide(self.policy, facts, self.approvals.approval(facts.project, code_hash))
        if decision.verdict == PENDING:
            self.approvals.request(project=facts.project, researcher=facts.researcher, dataset=facts.dataset,
                                   source=request.source, source_hash=code_hash, run_id=request.run_id)
        with self._lock:
            first = (request.run_id, decision.verdict) not in self._decided
            self._decided.add((request.run_id, decision.verdict))
        if first:
            self.audit.append("decision", run=request.run_id, project=facts.project, researcher=facts.researcher,
                              dataset=facts.dataset, code_hash=code_hash, verdict=decision.verdict,
                              reason=decision.reason)
        if decision.verdict == ALLOW:
            return None
        status = "pending" if decision.verdict == PENDING else "refused"
        return StepResult(site=self.site.name, status=status, error_where=decision.reason)

    def limits(self, request: StepRequest) -> tuple[float, int]:
        """The step's time limit (seconds) and the run's memory limit (MB) under this site's policy."""
        project = self.policy.project(request.project)
        assert project is not None, "admit() refuses a project the site does not know"
        return project.time_limit_seconds, project.memory_limit_mb

    def release(self, request: StepRequest, produced: bytes) -> bytes:
        """What may leave the site of ``produced`` (the task process's result), audited."""
        guarded = guard(decode_result(produced), Declared.from_params(request.params),
                        self.policy.threshold(request.project))
        self.audit.append("outcome", run=request.run_id, round=request.round, phase=request.phase,
                          outgoing=describe_outgoing(guarded.result), stripped=guarded.stripped)
        return encode_result(guarded.result)
