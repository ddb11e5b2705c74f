"""The server loop's round logic over a fake Flower grid: round timeouts, stragglers, quorum, rejoining.

``FakeGrid`` and ``FakeHub`` are fakes (named so) standing in for Flower's Grid and the coordinator
link; the real path is covered by tests/integration/test_faults.py.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, Metadata
from flwr.app.message import make_message
from flwr.supercore.task_identity import TaskIdentity

from coordinator.flower_server import OFFLINE, RoundLoop, RunAborted
from flip_core.codec import frame_header as header
from flip_core.protocol import StepResult, decode_request
from flip_core.status import Phase
from flip_core.wire import content_to_blob, result_to_content

SITES = {"A": 1, "B": 2, "C": 3, "D": 4}


class FakeGrid:
    """Answers every message at once, except fit steps for the sites in ``silent`` (stragglers)."""

    def __init__(
        self,
        silent: set[str],
        pending: dict[str, int] | None = None,
        refusing: dict[str, str] | None = None,
        hub: FakeHub | None = None,
    ) -> None:
        self.silent = silent
        self.hub = hub  # where large payloads go (its fake store), for steps and replies above the inline limit
        self.pending = dict(pending or {})  # site: how many prepare asks it answers "pending" (awaiting approval)
        self.refusing = dict(refusing or {})  # site: its policy's refusal
        self.outbox: dict[str, Message] = {}
        self.count = 0

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            site = next(s for s, node in SITES.items() if node == msg.metadata.dst_node_id)
            self.count += 1
            mid = f"m{self.count}"
            ids.append(mid)
            step = content_to_blob(msg.content, None if self.hub is None else self.hub.fetch)
            phase = header(step)["phase"]
            width = int(decode_request(step).params["w"].size)
            if phase != Phase.PREPARE and site in self.silent:
                continue
            if phase == Phase.PREPARE and self.pending.get(site, 0) > 0:
                self.pending[site] -= 1
                self._answer(
                    site,
                    mid,
                    msg,
                    StepResult(site=site, status="pending", error_where=f"waiting for approval at {site}"),
                )
                continue
            if site in self.refusing:
                self._answer(site, mid, msg, StepResult(site=site, status="refused", error_where=self.refusing[site]))
                continue
            result = StepResult(
                site=site,
                status="ok",
                params={"w": np.ones(width)} if phase == "fit" else {},
                train_metrics={"loss": 0.5} if phase == "fit" else {},
                eval_metrics={"accuracy": 0.75},
                num_train=10,
                num_test=5,
            )
            self._answer(site, mid, msg, result)
        return ids

    def _answer(self, site: str, mid: str, msg: Message, result: StepResult) -> None:
        meta = Metadata(
            run_id=1,
            message_id="",
            src_node_id=SITES[site],
            dst_node_id=0,
            reply_to_message_id=mid,
            group_id="",
            created_at=time.time(),
            ttl=60,
            message_type=msg.metadata.message_type,
        )
        publish = None if self.hub is None else (lambda blob, sha: self.hub.uploaded.__setitem__((site, sha), blob))  # type: ignore[union-attr]
        self.outbox[mid] = make_message(meta, result_to_content(result, publish))

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [self.outbox.pop(mid) for mid in ids if mid in self.outbox]


class FakeHub:
    def __init__(self, nodes: dict[str, int]) -> None:
        self.nodes = dict(nodes)
        self.log: list[dict[str, Any]] = []
        self.published: dict[str, bytes] = {}  # a fake payload store: what the round loop published ...
        self.uploaded: dict[tuple[str, str], bytes] = {}  # ... and what each site uploaded
        self.tamper: set[str] = set()  # sites whose uploaded payload changes on the way

    def publish(self, blob: bytes, sha: str, readers: list[str]) -> None:
        self.published[sha] = bytes(blob)

    def unpublish(self, sha: str) -> None:
        self.published.pop(sha, None)

    def fetch(self, sha: str, size: int) -> bytes:
        return self.published[sha]

    def take(self, site: str, sha: str, size: int) -> bytes:
        blob = self.uploaded.pop((site, sha))
        return blob[:-1] + bytes([blob[-1] ^ 1]) if site in self.tamper else blob

    def sites(self) -> dict[str, dict[str, Any]]:
        return {
            s: {"site": s, "status": "online", "node_id": n, "datasets": [{"name": "heart"}]}
            for s, n in self.nodes.items()
        }

    def events(self, run_id: str, events: list[dict[str, Any]]) -> None:
        self.log.extend(events)

    def ring(self, sites: list[str]) -> None:
        self.log.append({"type": "ring", "sites": sites})


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower sets in a real ServerApp process (restored after each test)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def loop(grid: FakeGrid, hub: FakeHub, *, min_sites: int, rounds: int = 2) -> RoundLoop:
    task = {
        "run_id": "r",
        "sites": [{"site": s, "node_id": n} for s, n in SITES.items()],
        "strategy": "fedavg",
        "min_sites": min_sites,
        "rounds": rounds,
        "round_timeout": 0.05,
        "dataset": "heart",
        "source": "x",
        "source_hash": "sha256:x",
        "project": "p",
        "researcher": "r",
        "seed": 0,
    }
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
