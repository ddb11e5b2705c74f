from __future__ import annotations

import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from coordinator.app import Notifier, build_app
from coordinator.config import TokenGrant
from coordinator.service import RunManager
from coordinator.store import Store

from fakes import FakeControl
from helpers import HEART, coordinator_config, model_bytes

TOKEN, OTHER = "researcher-token", "other-project-token"
MODEL = model_bytes()


@pytest.fixture
def setup(tmp_path: Path) -> tuple[TestClient, RunManager]:
    config = coordinator_config(
        tmp_path, site_token="site", tokens={TOKEN: TokenGrant("alice", "heart"), OTHER: TokenGrant("bob", "lungs")}
    )
    notifier = Notifier()
    manager = RunManager(Store(tmp_path), FakeControl(), notifier.notify, presence_grace=0)
    return TestClient(build_app(config, manager, notifier)), manager


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def start_run(client: TestClient, manager: RunManager) -> tuple[str, str]:
    """An online site holding heart-disease, an uploaded model and a run on them: (run_id, model sha)."""
    manager.announce("VA", 1, {"datasets": [HEART]}, "online")
    manager.presence.hold("VA")
    sha = client.post("/api/models", headers=auth(TOKEN), content=MODEL).json()["sha256"]
    run = client.post(
        "/api/runs", headers=auth(TOKEN), json={"source": "x", "dataset": "heart-disease", "initial_model": sha}
    )
    assert run.status_code == 201, run.text
    return run.json()["run_id"], sha


def test_requests_without_a_valid_token_are_refused(setup: tuple[TestClient, RunManager]) -> None:
    client, _ = setup
    assert client.get("/api/sites").status_code == 401
    assert client.get("/api/sites", headers=auth("wrong")).status_code == 401
    assert client.get("/internal/sites", headers=auth(TOKEN)).status_code == 401
    assert client.post("/site/announce", headers=auth(TOKEN), json={"site": "X"}).status_code == 401


def test_site_announcement_and_presence_make_it_online(setup: tuple[TestClient, RunManager]) -> None:
    client, manager = setup
    body = {"site": "VA", "node_id": 2**63 + 5, "info": {"version": "0.1.0", "datasets": [HEART]}}
    assert client.post("/site/announce", headers=auth("site"), json=body).status_code == 200
    sites = client.get("/api/sites", headers=auth(TOKEN)).json()
    assert [(s["site"], s["status"], s["node_id"]) for s in sites] == [("VA", "offline", 2**63 + 5)]
    manager.presence.hold("VA")
    assert client.get("/api/sites", headers=auth(TOKEN)).json()[0]["status"] == "online"


def test_unknown_dataset_answer_names_the_known_ones(setup: tuple[TestClient, RunManager]) -> None:
    client, manager = setup
    manager.announce("VA", 1, {"datasets": [HEART]}, "online")
    manager.presence.hold("VA")
    sha = client.post("/api/models", headers=auth(TOKEN), content=MODEL).json()["sha256"]
    response = client.post(
        "/api/runs", headers=auth(TOKEN), json={"source": "x", "dataset": "hearts", "initial_model": sha}
    )
    assert response.status_code == 404
    assert response.json()["error"] == "unknown dataset 'hearts': the datasets that exist are heart-disease"


def test_event_stream_replays_after_a_sequence_number_and_ends_with_the_run(
    setup: tuple[TestClient, RunManager],
) -> None:
    client, manager = setup
    run_id, sha = start_run(client, manager)
    internal = auth("internal")
    client.post(
        f"/internal/runs/{run_id}/events",
        headers=internal,
        json=[
            {"type": "metrics", "round": 1, "site": "global", "phase": "train", "metrics": {"loss": 0.5}},
            {"type": "run", "status": "completed", "model_sha256": sha},
        ],
    )
    with client.stream("GET", f"/api/runs/{run_id}/events", headers=auth(TOKEN)) as response:
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert [e["type"] for e in events] == ["run", "metrics", "run"]
    assert events[-1]["status"] == "completed"
    later = client.get(
        f"/api/runs/{run_id}/events", params={"after": events[0]["seq"], "stream": "0"}, headers=auth(TOKEN)
    ).json()
    assert [e["seq"] for e in later] == [e["seq"] for e in events[1:]]
    assert client.get(f"/api/runs/{run_id}/model", headers=auth(TOKEN)).content == MODEL


def test_runs_are_visible_only_inside_their_project(setup: tuple[TestClient, RunManager]) -> None:
    client, manager = setup
    run_id, _ = start_run(client, manager)
    assert client.get(f"/api/runs/{run_id}", headers=auth(OTHER)).status_code == 404
    assert client.get("/api/runs", headers=auth(OTHER)).json() == []
    assert [r["run_id"] for r in client.get("/api/runs", headers=auth(TOKEN)).json()] == [run_id]


def test_a_task_is_checked_before_the_notebook_builds_its_model(setup: tuple[TestClient, RunManager]) -> None:
    client, manager = setup
    manager.announce("VA", 7, {"version": "0.1.0", "datasets": [HEART]}, "online")
    manager.presence.hold("VA")
    bad = client.post("/api/runs/check", headers=auth(TOKEN), json={"source": "x", "dataset": "lungs"})
    assert bad.status_code == 404 and "unknown dataset 'lungs'" in bad.json()["error"]
    good = client.post("/api/runs/check", headers=auth(TOKEN), json={"source": "x", "dataset": "heart-disease"})
    assert good.status_code == 200 and good.json() == {"ok": True, "sites": ["VA"], "min_sites": 1}
    assert manager.store.runs() == []  # nothing was created


RUN_ROUTES = [
    ("GET", "{}"),
    ("GET", "{}/events"),
    ("GET", "{}/events?stream=0"),
    ("GET", "{}/model"),
    ("POST", "{}/stop"),
]


@pytest.mark.parametrize(("method", "route"), RUN_ROUTES)
def test_another_projects_run_is_answered_exactly_as_an_unknown_one(
    setup: tuple[TestClient, RunManager], method: str, route: str
) -> None:
    client, manager = setup
    run_id, _ = start_run(client, manager)
    unknown = "0" * len(run_id)
    theirs = client.request(method, "/api/runs/" + route.format(run_id), headers=auth(OTHER))
    none = client.request(method, "/api/runs/" + route.format(unknown), headers=auth(OTHER))
    assert theirs.status_code == none.status_code == 404
    assert theirs.json()["error"].replace(run_id, unknown) == none.json()["error"]
    assert {k: v for k, v in theirs.headers.items() if k != "content-length"} == {
        k: v for k, v in none.headers.items() if k != "content-length"
    }
    assert manager.view(run_id)["status"] != "stopped"  # nothing was done to it


def test_a_project_sees_only_the_datasets_its_sites_admitted_it_to(setup: tuple[TestClient, RunManager]) -> None:
    client, manager = setup
    lungs = {**HEART, "name": "lung-ct", "projects": ["lungs", "heart"]}
    secret = {**HEART, "name": "secret-cohort", "projects": []}
    manager.announce("VA", 1, {"datasets": [HEART, lungs, secret]}, "online")
    manager.presence.hold("VA")
    for token, seen in ((TOKEN, ["heart-disease", "lung-ct"]), (OTHER, ["lung-ct"])):
        [site] = client.get("/api/sites", headers=auth(token)).json()
        assert [d["name"] for d in site["datasets"]] == seen
        assert all("projects" not in d for d in site["datasets"])  # nor which other projects a site admits
    refused = client.post("/api/runs/check", headers=auth(OTHER), json={"source": "x", "dataset": "heart-disease"})
    assert refused.status_code == 404
    assert refused.json()["error"] == "unknown dataset 'heart-disease': the datasets that exist are lung-ct"
    query = client.post("/api/queries", headers=auth(OTHER), json={"dataset": "secret-cohort", "kind": "count"})
    assert query.status_code == 404 and "secret-cohort" not in query.json()["error"].split(":", 1)[1]


def test_a_model_over_the_limit_is_refused_as_it_streams_and_nothing_is_kept(tmp_path: Path) -> None:
    config = coordinator_config(tmp_path, tokens={TOKEN: TokenGrant("alice", "heart")}, max_model_bytes=1 << 16)
    manager = RunManager(Store(tmp_path), FakeControl(), lambda: None, presence_grace=0)
    client = TestClient(build_app(config, manager, Notifier()))
    declared = client.post("/api/models", headers=auth(TOKEN), content=b"\0" * (1 << 17))
    streamed = client.post("/api/models", headers=auth(TOKEN), content=iter([b"\0" * 4096] * 40))  # no length
    assert declared.status_code == streamed.status_code == 413
    assert "65536" in streamed.json()["error"]
    assert list((tmp_path / "models").iterdir()) == []  # no upload left behind, whole or partial
    kept = client.post("/api/models", headers=auth(TOKEN), content=iter([MODEL[:10], MODEL[10:]]))
    assert kept.status_code == 201
    assert [p.name for p in (tmp_path / "models").iterdir()] == [kept.json()["sha256"] + ".npz"]


def test_the_upload_quota_is_a_days_and_the_servers_own_uploads_are_not_counted(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.record_upload("heart/alice", "a" * 64, 100, at=1000.0)
    store.record_upload("heart/alice", "b" * 64, 50, at=1000.0 + 3600)
    assert store.uploaded_since("heart/alice", 1000.0) == 150
    assert store.uploaded_since("heart/alice", 1001.0) == 50  # a day on, the first no longer counts
    assert store.uploaded_since("lungs/bob", 0.0) == 0
