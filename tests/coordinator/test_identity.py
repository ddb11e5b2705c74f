"""Which project a request acts in, and the refusals' wording (pure), and the app's use of a hub identity."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from coordinator.app import Notifier, build_app
from coordinator.config import TokenGrant
from coordinator.identity import Caller, HubIdentity, Refused, choose_project, project_of, static_caller
from coordinator.service import RunManager
from coordinator.store import Store

from fakes import FakeControl, FakeHubIdentity
from helpers import coordinator_config


def test_hub_groups_project_dash_name_are_projects() -> None:
    assert [project_of(g) for g in ["project-heart", "project-", "heart", "admins"]] == ["heart", None, None, None]


def test_the_only_project_is_chosen_and_a_named_one_must_be_held() -> None:
    alice = Caller("alice", ("heart",), "hub")
    assert choose_project(alice, None, []) == "heart"
    assert choose_project(alice, "heart", []) == "heart"
    with pytest.raises(Refused, match=r"alice is not a member of FLIP project 'breast' \(hub group project-breast\)"):
        choose_project(alice, "breast", [])


def test_a_user_in_no_project_is_told_how_projects_are_joined() -> None:
    with pytest.raises(Refused) as refused:
        choose_project(Caller("bob", (), "hub"), None, ["heart", "breast"])
    assert str(refused.value) == (
        "bob is not in any FLIP project: a project's members are the hub group project-<name> (on this hub: "
        "project-heart, project-breast); the hub operator adds members to a group"
    )
    assert refused.value.status == 403


def test_a_user_in_several_projects_must_choose() -> None:
    with pytest.raises(
        Refused, match="carol is in projects breast, heart: choose one with %flip_connect --project"
    ) as refused:
        choose_project(Caller("carol", ("breast", "heart"), "hub"), None, [])
    assert refused.value.status == 400


def test_a_static_token_speaks_for_one_project_only() -> None:
    grants = {"tok": TokenGrant("ci", "heart")}
    caller = static_caller("tok", grants)
    assert caller == Caller("ci", ("heart",), "token")
    assert static_caller("", grants) is None and static_caller("tok2", grants) is None
    with pytest.raises(Refused, match="this token is for project 'heart', not 'breast'"):
        choose_project(caller, "breast", [])


def test_hub_settings_come_from_the_service_environment() -> None:
    assert HubIdentity.from_env({}) is None
    identity = HubIdentity.from_env(
        {
            "JUPYTERHUB_API_URL": "http://127.0.0.1:1/hub/api/",
            "JUPYTERHUB_API_TOKEN": "t",
            "JUPYTERHUB_SERVICE_NAME": "coordinator",
            "JUPYTERHUB_OAUTH_ACCESS_SCOPES": '["access:services!service=coordinator", "access:services"]',
        }
    )
    assert identity is not None and identity.api_url == "http://127.0.0.1:1/hub/api"
    assert identity.required == {"access:services!service=coordinator", "access:services"}


@pytest.fixture
def hub_app(tmp_path: Path) -> TestClient:
    config = coordinator_config(tmp_path, tokens={"ci": TokenGrant("ci", "heart")})
    notifier = Notifier()
    manager = RunManager(Store(tmp_path), FakeControl(), notifier.notify, presence_grace=0)
    identity = FakeHubIdentity(
        {"alice-hub": ("alice", ("heart",)), "bob-hub": ("bob", ()), "carol-hub": ("carol", ("breast", "heart"))},
        ["breast", "heart"],
    )
    return TestClient(build_app(config, manager, notifier, identity, "/services/coordinator/"))  # type: ignore[arg-type]


def who(client: TestClient, token: str | None, path: str = "/api/whoami", **headers: str) -> tuple[int, object]:
    if token is not None:
        headers["Authorization"] = f"token {token}"
    response = client.get(path, headers=headers)
    return response.status_code, response.json()


def test_hub_users_act_in_their_projects_and_others_are_refused(hub_app: TestClient) -> None:
    assert who(hub_app, "alice-hub") == (200, {"researcher": "alice", "project": "heart"})
    assert who(hub_app, "carol-hub", **{"X-FLIP-Project": "breast"}) == (
        200,
        {"researcher": "carol", "project": "breast"},
    )
    status, body = who(hub_app, "bob-hub", "/api/sites")
    assert status == 403 and "bob is not in any FLIP project" in body["error"]  # type: ignore[index]
    assert "project-breast, project-heart" in body["error"]  # type: ignore[index]
    assert who(hub_app, "carol-hub")[0] == 400
    assert who(hub_app, "ci") == (200, {"researcher": "ci", "project": "heart"})  # the headless token still works
    for token in (None, "", "nobody"):
        status, body = who(hub_app, token)
        assert status == 401 and "a valid identity is required" in body["error"]  # type: ignore[index]


def test_the_api_is_served_under_the_hub_proxy_prefix_too(hub_app: TestClient) -> None:
    assert who(hub_app, "alice-hub", "/services/coordinator/api/whoami") == (
        200,
        {"researcher": "alice", "project": "heart"},
    )
    assert who(hub_app, None, "/services/coordinator/api/whoami")[0] == 401
