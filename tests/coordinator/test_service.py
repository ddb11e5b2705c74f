from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.service import Principal, RunManager, TaskRejected
from coordinator.store import Store
from flip_core.api import TaskSpec, parse
from flip_core.cell import task_hash
from flip_core.errors import RequestInvalid
from flip_core.util import wait_until

from fakes import FakeControl, FakeFlowerStatus
from helpers import HEART, model_bytes

ALICE = Principal("alice", "heart")


@pytest.fixture
def manager(tmp_path: Path) -> RunManager:
    m = RunManager(Store(tmp_path), FakeControl(), notify=lambda: None, presence_grace=0)
    for i, site in enumerate(["Cleveland", "Hungary", "VA"]):
        m.announce(site, 10 + i, {"version": "0.1.0", "datasets": [HEART]}, "online")
        m.presence.hold(site)
    return m


def spec(manager: RunManager, **over: object) -> TaskSpec:
    sha = manager.store.put_model(model_bytes())
    return parse(
        TaskSpec,
        {"source": "def build_model(): pass", "dataset": "heart-disease", "rounds": 2, "initial_model": sha, **over},
        "the task",
    )


def test_unknown_dataset_is_refused_naming_it_and_the_known_ones(manager: RunManager) -> None:
    with pytest.raises(TaskRejected, match=r"unknown dataset 'lungs': the datasets that exist are heart-disease"):
        manager.create_run(ALICE, spec(manager, dataset="lungs"))
    assert manager.control.started == []  # type: ignore[attr-defined]


def test_min_sites_above_online_holders_is_refused(manager: RunManager) -> None:
    manager.presence.release("VA")
    with pytest.raises(
        TaskRejected, match=r"--min-sites is 3 but only 2 online site\(s\) hold 'heart-disease' \(VA offline\)"
    ):
        manager.create_run(ALICE, spec(manager, min_sites=3))


def test_run_goes_to_online_holders_and_records_identity(manager: RunManager) -> None:
    view = manager.create_run(ALICE, spec(manager))
    assert view["sites"] == ["Cleveland", "Hungary", "VA"]
    assert view["record"]["researcher"] == "alice" and view["record"]["project"] == "heart"
    assert view["record"]["source_hash"].startswith("sha256:")
    task = manager.store.run(view["run_id"]).task
    assert [s.node_id for s in task.sites] == [10, 11, 12] and task.min_sites == 3


COVARIATES = {"features": [{"name": "celecoxib", "domain": "drug", "concepts": [1118084], "window": [0, 0]}]}


def test_a_covariate_specification_is_for_an_omop_database_and_is_hashed_and_recorded_with_the_cell(
    manager: RunManager,
) -> None:
    with pytest.raises(TaskRejected, match=r"built from an OMOP CDM database, and 'heart-disease' at Cleveland is not"):
        manager.create_run(ALICE, spec(manager, covariates=COVARIATES))
    omop = {**HEART, "name": "gibleed", "format": "omop"}
    for i, site in enumerate(["Cleveland", "Hungary", "VA"]):
        manager.announce(site, 10 + i, {"version": "0.1.0", "datasets": [HEART, omop]}, "online")
    view = manager.create_run(ALICE, spec(manager, dataset="gibleed", covariates=COVARIATES))
    task = manager.store.run(view["run_id"]).task
    assert task.covariates == view["record"]["covariates"] and task.covariates["features"][0]["value"] == "presence"
    assert task.source_hash == view["record"]["source_hash"] == task_hash(task.source, COVARIATES)


def test_server_loop_events_drive_the_run_status(manager: RunManager) -> None:
    run_id = manager.create_run(ALICE, spec(manager))["run_id"]
    manager.ingest(run_id, [{"type": "run", "status": "running"}])
    assert manager.view(run_id)["status"] == "running"
    manager.ingest(run_id, [{"type": "run", "status": "completed", "model_sha256": "abc", "site_info": {}}])
    view = manager.view(run_id)
    assert view["status"] == "completed" and view["record"]["model_sha256"] == "abc"
    manager.ingest(run_id, [{"type": "run", "status": "failed", "reason": "late"}])
    assert manager.view(run_id)["status"] == "completed"  # a finished run never changes


def test_flower_run_that_ends_without_a_result_fails_the_run_with_the_log(manager: RunManager) -> None:
    run_id = manager.create_run(ALICE, spec(manager))["run_id"]
    flower_id = manager.store.run(run_id).flower_run_id
    manager.control.statuses[flower_id] = FakeFlowerStatus("finished", "failed")  # type: ignore[attr-defined]
    assert wait_until(lambda: manager.view(run_id)["status"] == "failed", 10)
    assert "boom" in manager.view(run_id)["reason"]


def test_unreachable_superlink_is_a_clear_refusal(manager: RunManager) -> None:
    manager.control.refuse = True  # type: ignore[attr-defined]
    with pytest.raises(TaskRejected, match="SuperLink refused the run"):
        manager.create_run(ALICE, spec(manager))


def test_stop_stops_the_flower_run(manager: RunManager) -> None:
    run_id = manager.create_run(ALICE, spec(manager))["run_id"]
    assert manager.stop(run_id)["status"] == "stopped"
    assert manager.control.stopped == [manager.store.run(run_id).flower_run_id]  # type: ignore[attr-defined]
    assert manager.store.events(run_id)[-1]["status"] == "stopped"


def test_sites_count_as_online_while_a_restarted_coordinator_settles(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.upsert_site("VA", 1, {"datasets": [HEART]}, "online")
    store.upsert_site("Hungary", 2, {"datasets": [HEART]}, "offline")
    restarted = RunManager(store, FakeControl(), notify=lambda: None, presence_grace=60)
    assert {s["site"]: s["status"] for s in restarted.sites()} == {"VA": "online", "Hungary": "offline"}
    settled = RunManager(store, FakeControl(), notify=lambda: None, presence_grace=0)
    assert {s["site"]: s["status"] for s in settled.sites()} == {"VA": "offline", "Hungary": "offline"}


def test_a_dispatched_step_rings_only_that_sites_doorbell(manager: RunManager) -> None:
    import asyncio

    async def scenario() -> tuple[bool, bool]:
        va, hungary = manager.presence.hold("VA"), manager.presence.hold("Hungary")
        run_id = manager.create_run(ALICE, spec(manager))["run_id"]
        manager.ingest(
            run_id,
            [
                {"type": "site", "site": "VA", "status": "training", "round": 1},
                {"type": "site", "site": "Hungary", "status": "done", "round": 1},
            ],
        )
        await asyncio.sleep(0)  # let the loop run the thread-safe callbacks
        return va.is_set(), hungary.is_set()

    assert asyncio.run(scenario()) == (True, False)


def test_round_timeout_must_be_positive(manager: RunManager) -> None:
    with pytest.raises(RequestInvalid, match=r"--round-timeout must be between 0 and \d+ seconds, not -1"):
        manager.create_run(ALICE, spec(manager, round_timeout=-1))
    view = manager.create_run(ALICE, spec(manager, round_timeout=2.5))
    assert view["record"]["round_timeout"] == 2.5


def test_a_task_declares_the_metric_names_given_or_else_those_its_cell_returns(manager: RunManager) -> None:
    source = (
        'def build_model(): pass\ndef train(m, d, c):\n    return {"loss": 0.1}\ndef evaluate(m, d, c):\n    pass\n'
    )
    read = manager.create_run(ALICE, spec(manager, source=source))
    given = manager.create_run(ALICE, spec(manager, source=source, metrics=["auc"]))
    assert manager.store.run(read["run_id"]).task.metrics == ["loss"]
    assert manager.store.run(given["run_id"]).task.metrics == ["auc"]
