"""A real JupyterHub (its proxy, the local profile of hub_config) with FLIP's coordinator as its service.

``flip hub``'s federation: users alice (hub group ``project-heart``) and bob (no group), the four
hospital sites approving project ``heart``. alice's server spawns and runs the quickstart notebook
in its kernel, with her hub token; bob is refused by name and project; calls without a valid hub
identity are refused, directly and through the hub's proxy.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from coordinator.federation import HubOptions
from coordinator.hubuser import HubUser
from helpers import REPO, local_federation

pytestmark = pytest.mark.integration

ROUNDS = 3  # the quickstart's parameters for the test: a few short rounds
PARAMETERS = f"rounds = {ROUNDS}\nstrategy = 'fedavg'\nseed = 42\nlr = 0.001\nlocal_steps = 20\noutput_dir = ''"


def quickstart_cells() -> list[str]:
    """The quickstart's code cells, with the test's parameters in place of the parameters cell."""
    notebook = json.loads((REPO / "notebooks" / "01_quickstart_heart.ipynb").read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    return [PARAMETERS if "parameters" in c["metadata"].get("tags", []) else "".join(c["source"]) for c in cells]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("flip-hub")
    options = HubOptions(password=secrets.token_urlsafe(8), notebooks=REPO / "notebooks")
    with local_federation(home, hub=options) as connection:
        yield connection


@pytest.fixture(scope="module")
def alice(hub: dict[str, Any]) -> HubUser:
    user = HubUser(hub["hub"]["url"], "alice", hub["hub"]["password"])
    user.start_server()
    return user


def test_alice_trains_in_her_hub_kernel_with_her_hub_identity(hub: dict[str, Any], alice: HubUser) -> None:
    kernel = alice.kernel("flip")  # the "FLIP (Python 3)" kernel: the magics are loaded
    try:
        env = kernel.execute("import os; print(os.environ['FLIP_API_URL'], 'JUPYTERHUB_API_TOKEN' in os.environ)")
        assert env.stdout.split() == [hub["coordinator_url"], "True"]
        for cell in quickstart_cells():
            done = kernel.execute(cell, timeout=300)
            assert done.status == "ok", f"{cell[:80]!r} failed: {done.text}"
        check = kernel.execute("print(result.status, type(model).__name__, record['researcher'], "
                               "record['project'], len(site_accuracy))")
    finally:
        kernel.close()
    assert check.stdout.split() == ["completed", "Linear", "alice", "heart", "4"]
    # the run is alice's, in project heart, as the coordinator stored it (the headless token sees project heart)
    runs = requests.get(f"{hub['coordinator_url']}/api/runs", timeout=10,
                        headers={"Authorization": f"Bearer {hub['token']}"}).json()
    assert [(r["researcher"], r["project"], r["status"]) for r in runs] == [("alice", "heart", "completed")]


def test_bob_is_refused_with_a_sentence_naming_the_project(hub: dict[str, Any]) -> None:
    bob = HubUser(hub["hub"]["url"], "bob", hub["hub"]["password"])
    bob.start_server()
    kernel = bob.kernel("flip")
    try:
        train = next(c for c in quickstart_cells() if c.startswith("%%flip_train"))
        kernel.execute(PARAMETERS)
        refused = kernel.execute(train)
        defined = kernel.execute("print('result' in dir())")
    finally:
        kernel.close()
        bob.stop_server()
    assert refused.status == "error"
    assert "bob is not in any FLIP project" in refused.stderr and "project-heart" in refused.stderr
    assert "Traceback" not in refused.text
    assert defined.stdout.strip() == "False"
    runs = requests.get(f"{hub['coordinator_url']}/api/runs", timeout=10,
                        headers={"Authorization": f"Bearer {hub['token']}"}).json()
    assert "bob" not in {r["researcher"] for r in runs}


def test_requests_without_a_valid_hub_identity_are_refused(hub: dict[str, Any], alice: HubUser) -> None:
    direct = hub["coordinator_url"] + "/api/sites"
    proxied = hub["hub"]["url"] + "/services/coordinator/api/sites"

    def get(url: str, token: str | None = None, **headers: str) -> requests.Response:
        if token is not None:
            headers["Authorization"] = f"token {token}"
        return requests.get(url, headers=headers, timeout=10)

    for url in (direct, proxied):
        assert get(url).status_code == 401
        assert "a valid identity is required" in get(url).json()["error"]
        assert get(url, "not-a-token").status_code == 401
    # alice's own token works, through the proxy and directly
    assert {s["site"] for s in get(proxied, alice.token).json()} == {"Cleveland", "Hungary", "Switzerland", "VA"}
    assert get(direct, alice.token).ok
    # a project she is not in
    other = get(direct, alice.token, **{"X-FLIP-Project": "breast"})
    assert other.status_code == 403 and "alice is not a member of FLIP project 'breast'" in other.json()["error"]
    # a token of alice's that the hub did not give access to the coordinator service
    narrow = requests.post(f"{hub['hub']['url']}/hub/api/users/alice/tokens", timeout=10,
                           headers={"Authorization": f"token {alice.token}"},
                           json={"scopes": ["read:users:activity!user"], "note": "no coordinator access"}).json()
    assert "access:services!service=coordinator" not in narrow["scopes"]
    assert get(direct, narrow["token"]).status_code == 401
    # a site's token is not a researcher's
    state = json.loads(Path(hub["federation"], "state.json").read_text())
    site_token = next(a.split("=", 1)[1] for p in state["processes"] if p["name"] == "site-VA"
                      for a in p["command"] if a.startswith("--token="))
    assert get(direct, site_token).status_code == 401
