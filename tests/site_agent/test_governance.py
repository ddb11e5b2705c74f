"""The site's word on a step (``site_agent.governance``): policy before task code, the guard after, audited.

Real site directories over the hospitals' heart-disease data and the real task runner; no network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from site_agent.approvals import APPROVED, ApprovalStore
from site_agent.audit import read_records, verify
from site_agent.catalog import add_dataset, init_site, write_policy
from site_agent.governance import Governance
from site_agent.protocol import PHASE_FIT, StepRequest, StepResult, decode_result, encode_result, source_hash
from site_agent.runner import TaskSession

CELL = '''
import torch

def build_model():
    return torch.nn.Linear(2, 1)

def train(model, data, config):
    return {"loss": 0.5}

def evaluate(model, data, config):
    return {"accuracy": 0.5}
'''


@pytest.fixture
def site(tmp_path: Path, heart_dir: Path):
    config = add_dataset(init_site(tmp_path / "VA", "VA"), "heart-disease", heart_dir / "processed.va.data",
                         "uci-heart")
    write_policy(config, {"projects": {"heart": {"approved": True, "researchers": ["alice"], "datasets": ["*"]}}})
    return config


def request(source: str = CELL, project: str = "heart", run: str = "r1") -> StepRequest:
    return StepRequest(run_id=run, source=source, source_hash="sha256:claimed-by-the-hub", dataset="heart-disease",
                       project=project, researcher="alice", seed=0, round=1, phase=PHASE_FIT, config={},
                       params={"weight": np.zeros((1, 2), np.float32), "bias": np.zeros(1, np.float32)})


def test_unapproved_code_waits_and_is_listed_for_the_admin_then_runs(site) -> None:
    gate = Governance(site)
    answer = gate.admit(request())
    assert answer is not None and (answer.status, answer.error_where) == ("pending", "waiting for approval at VA")
    gate.admit(request())  # the hub asks again while the admin has not answered
    pending = ApprovalStore(site.root).pending()
    assert [(p["hash"], p["source"]) for p in pending] == [(source_hash(CELL), CELL)]  # the site's own hash
    decisions = [r for r in read_records(site.root) if r["kind"] == "decision"]
    assert [(d["verdict"], d["code_hash"]) for d in decisions] == [("pending", source_hash(CELL))]  # once

    ApprovalStore(site.root).answer(source_hash(CELL)[:20], APPROVED)
    assert gate.admit(request()) is None
    assert [r["verdict"] for r in read_records(site.root) if r["kind"] == "decision"] == ["pending", "allow"]
    assert verify(site.root) == []


def test_a_project_the_site_does_not_know_is_refused_before_any_code_runs(site) -> None:
    answer = Governance(site).admit(request(project="oncology"))
    assert answer is not None and answer.status == "refused"
    assert answer.error_where == "project 'oncology' is not approved at VA"
    assert ApprovalStore(site.root).pending() == []


def test_what_leaves_is_guarded_and_the_audit_names_shapes_never_values(site) -> None:
    gate = Governance(site)
    produced = StepResult(site="VA", status="ok", params={"weight": np.full((3, 2), 123456.789, np.float32),
                                                         "bias": np.zeros(1, np.float32)},
                          train_metrics={"loss": 0.25}, num_train=150, num_test=40)
    out = decode_result(gate.release(request(), encode_result(produced)))
    assert out.params == {} and out.status == "error" and out.error_type == "BadParameters"
    outcome = [r for r in read_records(site.root) if r["kind"] == "outcome"][-1]
    assert outcome["outgoing"]["status"] == "error"
    assert any("(3, 2)" in s and "(1, 2)" in s for s in outcome["stripped"])
    assert "123456" not in json.dumps(read_records(site.root))


def test_an_honest_step_leaves_as_the_task_made_it(site) -> None:
    gate = Governance(site)
    ApprovalStore(site.root).request(project="heart", researcher="alice", dataset="heart-disease", source=CELL,
                                     source_hash=source_hash(CELL), run_id="r1")
    ApprovalStore(site.root).answer(source_hash(CELL), APPROVED)
    assert gate.admit(request()) is None
    produced = TaskSession(site).step(request())
    out = decode_result(gate.release(request(), encode_result(produced)))
    assert (out.status, out.train_metrics, sorted(out.params)) == ("ok", {"loss": 0.5}, ["bias", "weight"])
    assert out.num_train == produced.num_train >= 10
