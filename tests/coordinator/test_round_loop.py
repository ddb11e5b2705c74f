"""The server loop's round logic over a fake Flower grid: round timeouts, stragglers, quorum, rejoining.

``FakeGrid`` and ``FakeHub`` (tests/fakes) stand in for Flower's Grid and the coordinator link; the real path
is covered by tests/integration/test_faults.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity

from coordinator.flower_server import OFFLINE, RoundLoop, RunAborted
from flip_core.runs import AnnouncedDataset, Task, TaskSite
from flip_core.status import Phase

from fakes import GRID_NODES, FakeGrid, FakeHub

SITES = GRID_NODES  # the fake grid's sites and their Flower node ids


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower sets in a real ServerApp process (restored after each test)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def loop(grid: FakeGrid, hub: FakeHub, *, min_sites: int, rounds: int = 2) -> RoundLoop:
    heart = AnnouncedDataset(name="heart")
    task = Task(
        run_id="r",
        name="run",
        sites=[TaskSite(site=s, node_id=n, dataset=heart) for s, n in SITES.items()],
        strategy="fedavg",
        min_sites=min_sites,
        rounds=rounds,
        round_timeout=0.05,
        dataset="heart",
        source="x",
        source_hash="sha256:x",
        project="p",
        researcher="r",
        seed=0,
    )
    return RoundLoop(grid, hub, task)  # type: ignore[arg-type]


def test_a_straggler_sits_out_each_round_and_the_run_goes_on() -> None:
    hub = FakeHub(SITES)
    params = loop(FakeGrid(silent={"D"}), hub, min_sites=3).run({"w": np.zeros(2)})
    assert np.allclose(params["w"], 1.0)
    late = [(e["site"], e["round"]) for e in hub.log if e.get("status") == "late"]
    assert ("D", 1) in late and ("D", 2) in late
    assert [e["sites"] for e in hub.log if e["type"] == "round"] == [3, 3]


def test_too_few_replies_in_time_stop_the_run_naming_the_late_sites() -> None:
    with pytest.raises(RunAborted) as stopped:
        loop(FakeGrid(silent={"C", "D"}), FakeHub(SITES), min_sites=3).run({"w": np.zeros(2)})
    assert str(stopped.value) == (
        "Run stopped in round 1: only 2 site(s) replied within the round timeout "
        "(0.05 s) but --min-sites is 3. Late: C, D."
    )


def test_a_site_that_went_offline_rejoins_with_its_new_node() -> None:
    hub = FakeHub(SITES)
    rounds = loop(FakeGrid(silent=set()), hub, min_sites=3)
    rounds.active.pop("B")
    rounds.failed["B"] = OFFLINE
    hub.nodes["B"] = 22  # back online: a restarted agent registers as a new Flower node
    rounds.readmit(3)
    assert rounds.active["B"] == 22 and "B" not in rounds.failed
    assert hub.log[-1] == {
        "type": "site",
        "site": "B",
        "status": "rejoined",
        "round": 3,
        "detail": "back online: it takes part again from this round",
    }


def test_a_site_awaiting_approval_is_shown_waiting_then_joins_when_it_approves(monkeypatch) -> None:
    monkeypatch.setattr("coordinator.flower_server.APPROVAL_POLL_MIN_SECONDS", 0.01)
    hub = FakeHub(SITES)
    grid = FakeGrid(silent=set(), pending={"B": 3})
    loop(grid, hub, min_sites=4).run({"w": np.zeros(2)})
    waiting = [e for e in hub.log if e.get("status") == "waiting-approval"]
    assert waiting == [
        {"type": "site", "site": "B", "status": "waiting-approval", "round": 0, "detail": "waiting for approval at B"}
    ]  # said once, not at every ask
    assert [e["sites"] for e in hub.log if e["type"] == "ring"] == [["B"], ["B"], ["B"]]  # asked again, rung
    assert {e["site"] for e in hub.log if e.get("status") == "ready"} == set(SITES)
    assert {e["site"] for e in hub.log if e.get("status") == "done" and e["round"] == 1} == set(SITES)


def test_a_site_that_refuses_says_why_and_the_run_stops_below_min_sites() -> None:
    hub = FakeHub(SITES)
    grid = FakeGrid(silent=set(), refusing={"C": "project 'p' is not approved at C"})
    with pytest.raises(RunAborted) as stopped:
        loop(grid, hub, min_sites=4).run({"w": np.zeros(2)})
    assert "C: refused by the site: project 'p' is not approved at C" in str(stopped.value)
    failed = [e for e in hub.log if e.get("status") == "failed"]
    assert [(e["site"], e["detail"]) for e in failed] == [
        ("C", "refused by the site: project 'p' is not approved at C")
    ]


def test_large_models_travel_beside_their_messages_and_a_tampered_reply_fails_only_its_site() -> None:
    hub = FakeHub(SITES)
    hub.tamper = {"C"}
    big = {"w": np.zeros(300_000)}  # 2.4 MB: above the inline limit
    rounds = loop(FakeGrid(silent=set(), hub=hub), hub, min_sites=3)
    params = rounds.run(big)
    assert np.array_equal(params["w"], np.ones(300_000))  # the three untouched sites' mean
    failed = [(e["site"], e["detail"]) for e in hub.log if e.get("status") == "failed"]
    assert [site for site, _ in failed] == ["C"]
    assert failed[0][1].startswith("the site's reply could not be read: payload ") and "arrived altered" in failed[0][1]
    done = [e for e in hub.log if e.get("status") == "done" and e["round"] == 1]
    assert {e["site"] for e in done} == {"A", "B", "D"}
    assert all(e["received_bytes"] > 2_400_000 and e["sent_bytes"] > 2_400_000 for e in done)
    assert not hub.uploaded and len(hub.published) == 1  # every reply taken; only the last step's payload is out
    rounds.unpublish()  # what the ServerApp does when the run ends
    assert not hub.published


def test_each_step_carries_the_metric_names_the_task_declared() -> None:
    rounds = loop(FakeGrid(silent=set()), FakeHub(SITES), min_sites=3)
    assert rounds.request(1, Phase.FIT, {}).metrics is None  # none declared: each site reads the cell's
    rounds.task = rounds.task.model_copy(update={"metrics": ["loss", "auc"]})
    assert rounds.request(1, Phase.FIT, {}).metrics == ["loss", "auc"]
