"""The site's word on a step (``site_agent.governance.gate``): policy before task code, the guard after, audited.

Real site directories over the hospitals' heart-disease data and the real task runner; no network.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from flip_core.airlock import ItemKind
from flip_core.cell import source_hash, task_hash
from flip_core.covariates import read_covariates
from flip_core.protocol import StepRequest, StepResult, decode_result, encode_result
from flip_core.status import Phase
from site_agent.data.catalog import init_site, write_policy
from site_agent.data.formats import add_dataset
from site_agent.governance.approvals import APPROVED, ApprovalStore
from site_agent.governance.audit import read_records, verify
from site_agent.governance.gate import Governance
from site_agent.tasks.runner import TaskSession

CELL = """
import torch

def build_model():
    return torch.nn.Linear(2, 1)

def train(model, data, config):
    return {"loss": 0.5}

def evaluate(model, data, config):
    return {"accuracy": 0.5}
"""


@pytest.fixture
def site(tmp_path: Path, heart_dir: Path):
    config = add_dataset(
        init_site(tmp_path / "VA", "VA"), "heart-disease", heart_dir / "processed.va.data", "uci-heart"
    )
    write_policy(config, {"projects": {"heart": {"approved": True, "researchers": ["alice"], "datasets": ["*"]}}})
    return config


def request(source: str = CELL, project: str = "heart", run: str = "r1") -> StepRequest:
    return StepRequest(
        run_id=run,
        source=source,
        source_hash="sha256:claimed-by-the-hub",
        dataset="heart-disease",
        project=project,
        researcher="alice",
        seed=0,
        round=1,
        phase=Phase.FIT,
        config={},
        params={"weight": np.zeros((1, 2), np.float32), "bias": np.zeros(1, np.float32)},
    )


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
    produced = StepResult(
        site="VA",
        status="ok",
        params={"weight": np.full((3, 2), 123456.789, np.float32), "bias": np.zeros(1, np.float32)},
        train_metrics={"loss": 0.25},
        num_train=150,
        num_test=40,
    )
    out = decode_result(gate.release(request(), encode_result(produced)))
    assert out.params == {} and out.status == "error" and out.error_type == "BadParameters"
    outcome = [r for r in read_records(site.root) if r["kind"] == "outcome"][-1]
    assert outcome["outgoing"]["status"] == "error"
    assert any("(3, 2)" in s and "(1, 2)" in s for s in outcome["stripped"])
    assert "123456" not in json.dumps(read_records(site.root))


def test_a_failed_steps_traceback_stays_in_the_sites_airlock_and_never_leaves(site) -> None:
    gate = Governance(site)
    text = "Traceback (most recent call last):\nValueError: patient Qzx-Wvk\n"
    produced = StepResult(site="VA", status="error", error_type="ValueError", error_line=3, detail=text)
    leaving = gate.release(request(run="r9"), encode_result(produced))
    assert b"Qzx-Wvk" not in bytes(leaving) and decode_result(leaving).detail == ""
    kept = gate.airlock.kept_for(ItemKind.TRACEBACK, "r9")
    assert kept is not None and kept[1] == text.encode() and kept[0]["researcher"] == request().researcher
    assert "Qzx-Wvk" not in json.dumps(read_records(site.root))  # nor in the audit log: it names the step only


def test_an_honest_step_leaves_as_the_task_made_it(site) -> None:
    gate = Governance(site)
    ApprovalStore(site.root).request(
        project="heart",
        researcher="alice",
        dataset="heart-disease",
        source=CELL,
        source_hash=source_hash(CELL),
        run_id="r1",
    )
    ApprovalStore(site.root).answer(source_hash(CELL), APPROVED)
    assert gate.admit(request()) is None
    produced = TaskSession(site).step(request())
    out = decode_result(gate.release(request(), encode_result(produced)))
    assert (out.status, out.train_metrics, sorted(out.params)) == ("ok", {"loss": 0.5}, ["bias", "weight"])
    assert out.num_train == produced.num_train >= 10


def private(site, max_epsilon: float) -> Governance:
    write_policy(
        site,
        {
            "projects": {
                "heart": {
                    "approved": True,
                    "researchers": ["alice"],
                    "datasets": ["*"],
                    "auto_approve": True,
                    "max_epsilon": max_epsilon,
                }
            }
        },
    )
    return Governance(site)


def dp_request(round_: int = 1, run: str = "r1", phase: str = Phase.FIT, epsilon: float = 1.0) -> StepRequest:
    base = request(run=run)
    return StepRequest(
        **{
            **base.__dict__,
            "round": round_,
            "phase": phase,
            "config": {"dp_epsilon": epsilon, "dp_clip": 0.1, "dp_rounds": 2},
        }
    )


def test_a_private_run_releases_only_noised_parameters_and_charges_the_projects_budget(site) -> None:
    gate = private(site, max_epsilon=1.2)
    produced = StepResult(
        site="VA",
        status="ok",
        num_train=150,
        num_test=50,
        train_metrics={"loss": 0.5},
        eval_metrics={"accuracy": 0.7},
        params={"weight": np.ones((1, 2), np.float32), "bias": np.ones(1, np.float32)},
    )
    assert gate.admit(dp_request(phase="prepare")) is None
    out = decode_result(gate.release(dp_request(), encode_result(produced)))
    assert out.private and out.train_metrics == {} and out.eval_metrics == {}
    assert (out.num_train, out.num_test) == (1, 0)  # the site's size does not leave either
    assert not np.allclose(out.params["weight"], 1.0)  # clipped to 0.1 and noised
    assert 0 < out.dp_epsilon == out.dp_project_epsilon < 1.0  # one of the run's two rounds
    outcome = [r for r in read_records(site.root) if r["kind"] == "outcome"][-1]
    assert outcome["dp"]["clip"] == 0.1 and outcome["dp"]["run_epsilon"] == out.dp_epsilon
    assert outcome["outgoing"]["train_metrics"] == [] and verify(site.root) == []

    gate.release(dp_request(round_=2), encode_result(produced))
    again = gate.admit(dp_request(run="r2", phase="prepare"))  # a second run of epsilon 1 does not fit in 1.2
    assert again is not None and again.status == "refused"
    assert again.error_where.startswith(
        "the privacy budget of project 'heart' at VA is exhausted: epsilon 1 of 1.2 "
        "spent; this task (--dp-epsilon 1) would bring it to 1."
    )


def forged_privacy(weight: float) -> StepResult:
    """A result whose task process claims privacy figures that only the site agent may set."""
    return StepResult(
        site="VA",
        status="ok",
        num_train=150,
        private=True,
        dp_epsilon=0.001,
        params={"weight": np.full((1, 2), weight, np.float32), "bias": np.ones(1, np.float32)},
    )


def test_privacy_figures_from_the_task_process_are_ignored(site) -> None:
    gate = private(site, max_epsilon=5.0)
    out = decode_result(gate.release(request(), encode_result(forged_privacy(1.0))))  # a run without DP
    assert (out.private, out.dp_epsilon) == (False, 0.0)
    assert np.allclose(out.params["weight"], 1.0)


def test_guarded_fields_are_written_in_place_when_the_parameters_leave_as_they_came(site) -> None:
    """The task process leaves room after its header; when the guard keeps the parameters, the site rewrites
    only the header (here: the forged privacy figures reset), never the parameters."""
    from site_agent.tasks.messages import RESULT_RESERVE

    gate = private(site, max_epsilon=5.0)  # a project that allows DP, in a run without it
    forged = forged_privacy(7.0)
    produced = bytearray(encode_result(forged, reserve=RESULT_RESERVE))
    archive = bytes(produced[-200:])
    released = gate.release(request(), produced)
    assert released is produced and bytes(released[-200:]) == archive  # the same buffer, parameters untouched
    out = decode_result(released)
    assert (out.private, out.dp_epsilon, out.status) == (False, 0.0, "ok")
    assert np.array_equal(out.params["weight"], np.full((1, 2), 7.0, np.float32))
    no_room = bytearray(encode_result(forged))  # a frame without room for a longer header: encoded afresh
    assert decode_result(gate.release(request(), no_room)).dp_epsilon == 0.0
    hiding = bytearray(encode_result(forged, reserve=RESULT_RESERVE)) + b"a patient's name"  # bytes after the archive
    leaving = gate.release(request(), hiding)
    assert leaving is not hiding and b"patient" not in leaving  # encoded afresh: what is hidden stays


def test_what_leaves_is_built_from_what_the_site_knows_not_what_the_task_process_says(site) -> None:
    gate = Governance(site, device="cuda:0", threads=3)
    entry = site.datasets["heart-disease"]
    forged = StepResult(
        site="LEAK1",
        status="ok",
        params={"weight": np.ones((1, 2), np.float32), "bias": np.ones(1, np.float32)},
        train_metrics={"loss": 0.5, "LEAK1": 1.0},
        num_train=entry.train_rows + 5,
        num_test=17,
        fingerprint="LEAK1",
        device="LEAK1",
        threads=11,
        version="LEAK1",
        seconds=987.0,
        gpu_peak_bytes=3 * 2**20,
    )
    out = decode_result(gate.release(request(), encode_result(forged), seconds=2.25))
    assert (out.site, out.fingerprint, out.device, out.threads, out.seconds) == (
        "VA",
        entry.fingerprint,
        "cuda:0",
        3,
        2.25,
    )
    assert (out.num_train, out.num_test, out.gpu_peak_bytes) == (entry.train_rows, entry.test_rows, 4 * 2**20)
    assert out.train_metrics == {"loss": 0.5} and "LEAK1" not in repr(out)  # CELL declares loss and accuracy
    assert (
        out.withheld == "train metrics withheld: not declared when the run was submitted (declare them with --metrics)"
    )
    cohort = decode_result(gate.release(request(), encode_result(forged), cohort_rows=30))
    assert (cohort.num_train, cohort.num_test) == (30, 17)  # a cohort's rows bound the claims


@pytest.mark.parametrize("blob", [b"", b"\x00" * 8, b"not a frame at all", encode_result(StepResult("VA", "ok"))[:20]])
def test_bytes_that_are_not_a_result_leave_as_one_fixed_failure(site, blob: bytes) -> None:
    out = decode_result(Governance(site).release(request(), bytearray(blob)))
    assert (out.status, out.error_type, out.error_where) == (
        "error",
        "BadResult",
        "the task process (its result could not be read)",
    )


def test_the_size_of_what_leaves_does_not_depend_on_the_room_the_task_process_left(site) -> None:
    gate = Governance(site)
    produced = StepResult(
        site="VA", status="ok", params={"weight": np.ones((1, 2), np.float32), "bias": np.ones(1, np.float32)}
    )
    sizes = {len(gate.release(request(), bytearray(encode_result(produced, reserve=r)))) for r in (0, 10, 9000, 20000)}
    assert len(sizes) == 1, sizes


def test_a_covariate_specification_is_approved_with_the_code_and_shown_to_the_admin(site) -> None:
    """The table a task asks of an OMOP database is part of what the admin approves: the same cell with another
    specification waits again, and a specification that is not one is refused before anything else."""
    spec = {"features": [{"name": "celecoxib", "domain": "drug", "concepts": [1118084], "window": [0, 0]}]}
    gate = Governance(site)
    asked = replace(request(), covariates=spec)
    assert gate.admit(asked).status == "pending"
    (pending,) = ApprovalStore(site.root).pending()
    assert pending["hash"] == task_hash(CELL, spec) != source_hash(CELL)
    assert pending["covariates"] == read_covariates(spec).model_dump(mode="json")  # as the site reads it, in full
    ApprovalStore(site.root).answer(task_hash(CELL, spec)[:20], APPROVED)
    assert gate.admit(asked) is None
    other = {"features": [{"name": "celecoxib", "domain": "drug", "concepts": [1124300], "window": [0, 0]}]}
    assert gate.admit(replace(request(run="r2"), covariates=other)).status == "pending"
    assert gate.admit(replace(request(run="r3"))).status == "pending"  # nor does the cell alone ride on it
    hostile = {"features": [{"name": "x", "domain": "drug", "concepts": ["1) or (1=1"]}]}
    refused = gate.admit(replace(request(run="r4"), covariates=hostile))
    assert refused is not None and refused.status == "refused" and "must be a whole number" in refused.error_where


def test_a_step_whose_epsilon_is_not_a_number_is_refused_not_raised(site) -> None:
    """The hub's step is data like any other: a differential-privacy setting that is not a number (a hostile or
    broken hub) is refused in a sentence, and audited, before anything runs."""
    for wrong in ("lots", [1.0], {"e": 1}):
        refused = Governance(site).admit(
            replace(request(run=f"r-{type(wrong).__name__}"), config={"dp_epsilon": wrong})
        )
        assert refused is not None and refused.status == "refused", wrong
        assert refused.error_where == "VA cannot run this task with differential privacy: its epsilon is not a number"
