"""Behaviour tests for coordinator.records and the run record the coordinator keeps (coordinator.service)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np

from coordinator import records
from coordinator.service import Principal, RunManager
from coordinator.store import Store
from flip_core.aggregation import RunningMean
from flip_core.api import TaskSpec, parse
from flip_core.cell import step_seed
from flip_core.runs import MetricRow

from fakes import FakeControl
from helpers import HEART, model_bytes

ALICE = Principal("alice", "heart")


def test_step_seeds_differ_by_round_and_site_and_follow_the_rule() -> None:
    seeds = records.step_seeds(42, 3, ["Cleveland", "VA"])
    assert seeds["VA"][2] == step_seed(42, 2, "VA")
    assert len({s for row in seeds.values() for s in row}) == 8


def test_history_and_epsilon_are_read_from_the_events() -> None:
    events = [
        {"type": "run", "status": "running", "ts": 5.0},
        {"type": "metrics", "round": 1, "site": "VA", "phase": "evaluate", "metrics": {"accuracy": 0.5}},
        {"type": "metrics", "round": 1, "site": "VA", "phase": "privacy", "metrics": {"epsilon": 0.4}},
        {"type": "metrics", "round": 2, "site": "VA", "phase": "privacy", "metrics": {"epsilon": 0.9}},
        {"type": "site", "site": "VA", "status": "done", "round": 1},
    ]
    ended = records.ended(events)
    assert ended["started"] == 5.0 and ended["epsilon_spent"] == {"VA": 0.9}
    assert ended["history"][0] == MetricRow(round=1, site="VA", phase="evaluate", metric="accuracy", value=0.5)


def test_a_completed_runs_record_holds_environments_seeds_notebook_and_metrics(tmp_path: Path) -> None:
    manager = RunManager(Store(tmp_path), FakeControl(), notify=lambda: None, presence_grace=0)
    env = "sha256:" + "a" * 64
    manager.announce("VA", 10, {"datasets": [HEART], "packages": {"torch": "2.13.0"}, "environment": env}, "online")
    manager.presence.hold("VA")
    body = {
        "source": "def build_model(): pass",
        "dataset": "heart-disease",
        "rounds": 2,
        "seed": 5,
        "initial_model": manager.store.put_model(model_bytes()),
        "client_environment": env,
        "notebook": {"path": "/q.ipynb", "sha256": "b" * 64, "parameters": {"rounds": 2}, "execution": "e1", "cell": 1},
    }
    run_id = manager.create_run(Principal("alice", "heart"), parse(TaskSpec, body, "the task"))["run_id"]
    metrics = {"type": "metrics", "round": 2, "site": "global", "phase": "evaluate", "metrics": {"loss": 0.3}}
    manager.ingest(run_id, [{"type": "run", "status": "running"}, metrics])
    manager.ingest(
        run_id, [{"type": "run", "status": "completed", "model_sha256": "c" * 64, "aggregation_ordered": True}]
    )
    record = manager.view(run_id)["record"]
    assert record["site_packages"] == {"VA": {"packages": {"torch": "2.13.0"}, "hash": env}}
    assert record["client_environment"] == env and record["hub_environment"].startswith("sha256:")
    assert {"flip", "flwr", "torch", "numpy"} <= set(record["hub_packages"])
    assert record["notebook"]["parameters"] == {"rounds": 2} and record["notebook"]["execution"] == "e1"
    assert record["step_seeds"]["VA"] == [step_seed(5, r, "VA") for r in range(3)]
    assert record["history"] == [{"round": 2, "site": "global", "phase": "evaluate", "metric": "loss", "value": 0.3}]
    assert record["aggregation_ordered"] is True and record["started"] is not None


# The keys of a record as the previous version wrote them: at creation, once Flower took the run, when any run
# ended, when a run completed; and what GET /api/runs/ID adds.
CREATED = {
    "run_id", "name", "project", "researcher", "dataset", "rounds", "strategy", "strategy_options", "min_sites",
    "round_timeout", "seed", "config", "source_hash", "sites", "initial_model_sha256", "fab_sha256", "created",
    "hub_packages", "hub_environment", "client_packages", "client_environment", "site_packages", "site_datasets",
    "cohort", "notebook", "seed_rule", "step_seeds", "flower_run_id",
    "covariates",  # added by issue 28 (None unless the run declared an OMOP covariate specification)
}  # fmt: skip
ENDED = {"history", "epsilon_spent", "started"}
COMPLETED = {"model_sha256", "site_info", "failed_sites", "traffic", "aggregation_ordered"}
VIEWED = {"status", "reason", "finished"}


def _manager(tmp_path: Path) -> RunManager:
    manager = RunManager(Store(tmp_path), FakeControl(), notify=lambda: None, presence_grace=0)
    manager.announce("VA", 10, {"datasets": [HEART]}, "online")
    manager.presence.hold("VA")
    return manager


def test_a_records_json_has_the_keys_the_previous_version_wrote_at_each_stage(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    body = {"source": "x", "dataset": "heart-disease", "initial_model": manager.store.put_model(model_bytes())}
    first, second = (manager.create_run(ALICE, parse(TaskSpec, body, "the task"))["run_id"] for _ in range(2))
    assert set(manager.view(first)["record"]) == CREATED | VIEWED
    assert manager.view(first)["record"]["notebook"] is None and manager.view(first)["record"]["cohort"] is None
    manager.ingest(first, [{"type": "run", "status": "completed", "model_sha256": "c" * 64}])
    assert set(manager.view(first)["record"]) == CREATED | ENDED | COMPLETED | VIEWED
    manager.stop(second)
    assert set(manager.view(second)["record"]) == CREATED | ENDED | VIEWED


def test_a_run_the_previous_version_stored_is_read_and_viewed_as_it_was(tmp_path: Path) -> None:
    store = Store(tmp_path)
    announced = {k: v for k, v in HEART.items() if k != "projects"}  # the previous version's announcement
    site = {"site": "VA", "node_id": 10, "dataset": announced, "packages": {}, "environment": ""}
    task = {"name": "q", "project": "heart", "researcher": "alice", "source": "x", "source_hash": "sha256:1",
            "dataset": "heart-disease", "rounds": 2, "strategy": "fedavg", "strategy_options": {}, "min_sites": 1,
            "seed": 0, "config": {"lr": 0.1}, "initial_model": "a" * 64, "round_timeout": None, "cohort": None,
            "sites": [site], "run_id": "old"}  # fmt: skip
    record = {key: task[key] for key in ("name", "project", "researcher", "dataset", "rounds", "strategy", "seed")}
    record |= {"run_id": "old", "config": {"lr": 0.1}, "source_hash": "sha256:1", "sites": ["VA"], "created": 1.0}
    record |= {"site_datasets": {"VA": announced}, "model_sha256": "c" * 64, "site_info": {"VA": {"train_rows": 9}}}
    with sqlite3.connect(tmp_path / "coordinator.sqlite") as db:
        db.execute(
            "INSERT INTO runs (run_id, name, project, researcher, dataset, status, created, finished, task, record)"
            " VALUES ('old', 'q', 'heart', 'alice', 'heart-disease', 'completed', 1.0, 2.0, ?, ?)",
            (json.dumps(task), json.dumps(record)),
        )
    stored = store.run("old")
    assert stored is not None and stored.task.sites[0].dataset.rows == 303 and stored.record.site_info["VA"].train_rows
    view = RunManager(store, FakeControl(), notify=lambda: None).view("old")
    assert view["record"] == {**record, "status": "completed", "reason": "", "finished": 2.0}
    assert (view["rounds"], view["source"], view["sites"]) == (2, "x", ["VA"])
    assert json.loads(stored.task.model_dump_json(exclude_unset=True)) == task  # the ServerApp is handed the same task


def _update(seed: int) -> dict[str, np.ndarray]:
    return {"w": np.random.default_rng(seed).normal(0, 10.0 ** np.arange(-8, 8), size=16).astype(np.float32)}


def _mean(order: list[tuple[str, dict[str, np.ndarray], float]], limit: int | None = None) -> np.ndarray:
    running = RunningMean(ordered_bytes=limit)
    for site, params, weight in order:
        running.add(params, weight, site)
    assert running.ordered == (limit is None)
    return running.mean()["w"]


def test_a_running_mean_of_small_updates_is_the_same_bits_in_any_arrival_order() -> None:
    # two sites' large values cancel: summed as they come, the third's small one survives in one order only
    updates = [(site, {"w": np.array([v, 1.0], dtype=np.float32)}, 1.0) for site, v in (("a", 1e8), ("b", -1e8))]
    updates.append(("c", {"w": np.array([1e-8, 2.0], dtype=np.float32)}, 1.0))
    orders = [updates, updates[::-1], updates[2:] + updates[:2]]
    assert not np.array_equal(_mean(orders[0], limit=0), _mean(orders[2], limit=0))  # arrival order shows
    means = [_mean(order) for order in orders]
    assert all(np.array_equal(means[0], m) for m in means[1:])


def test_a_running_mean_over_its_limit_folds_as_replies_arrive_and_says_so() -> None:
    running = RunningMean(ordered_bytes=100)  # two 64-byte updates: the second does not fit
    running.add(_update(1), 1.0, "b")
    running.add(_update(2), 3.0, "a")
    expected = (_update(1)["w"].astype(np.float64) + 3 * _update(2)["w"].astype(np.float64)) / 4
    assert not running.ordered
    assert np.allclose(running.mean()["w"], expected.astype(np.float32))
