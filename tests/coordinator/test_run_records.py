"""Behaviour tests for coordinator.records and the run record the coordinator keeps (coordinator.service)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coordinator import records
from coordinator.aggregate import RunningMean
from coordinator.service import Principal, RunManager
from coordinator.store import Store
from flip_core.api import TaskSpec, parse
from flip_core.cell import step_seed

from fakes import FakeControl
from helpers import HEART, model_bytes


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
    assert ended["history"][0] == {"round": 1, "site": "VA", "phase": "evaluate", "metric": "accuracy", "value": 0.5}


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
