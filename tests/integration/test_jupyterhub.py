"""A real JupyterHub (its proxy, the local profile of hub_config) with FLIP's coordinator as its service.

``flip hub``'s federation: users alice (hub group ``project-heart``) and bob (no group), the four
hospital sites approving project ``heart``. alice's server spawns and runs the quickstart notebook
in its kernel, with her hub token; bob is refused by name and project; calls without a valid hub
identity are refused, directly and through the hub's proxy. Then a real browser (Playwright driving
Debian's chromium, headless) logs in as alice, opens the quickstart in JupyterLab, runs it and reads
the live widget; its screenshot is kept in ``test-output/`` (or ``$FLIP_TEST_OUTPUT``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import expect, sync_playwright

from bench.hubuser import HubUser
from flip_local.federation import HubOptions

import lab_driver
from helpers import REPO, local_federation

pytestmark = pytest.mark.integration

ROUNDS = 3  # the quickstart's parameters for the test: a few short rounds
PARAMETERS = f"rounds = {ROUNDS}\nstrategy = 'fedavg'\nseed = 42\nlr = 0.001\nlocal_steps = 20\noutput_dir = ''"


SITES = ["Cleveland", "Hungary", "Switzerland", "VA"]


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
        check = kernel.execute(
            "print(result.status, type(model).__name__, record['researcher'], record['project'], len(site_accuracy))"
        )
    finally:
        kernel.close()
    assert check.stdout.split() == ["completed", "Linear", "alice", "heart", "4"]
    # the run is alice's, in project heart, as the coordinator stored it (the headless token sees project heart)
    runs = requests.get(
        f"{hub['coordinator_url']}/api/runs", timeout=10, headers={"Authorization": f"Bearer {hub['token']}"}
    ).json()
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
    runs = requests.get(
        f"{hub['coordinator_url']}/api/runs", timeout=10, headers={"Authorization": f"Bearer {hub['token']}"}
    ).json()
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
    narrow = requests.post(
        f"{hub['hub']['url']}/hub/api/users/alice/tokens",
        timeout=10,
        headers={"Authorization": f"token {alice.token}"},
        json={"scopes": ["read:users:activity!user"], "note": "no coordinator access"},
    ).json()
    assert "access:services!service=coordinator" not in narrow["scopes"]
    assert get(direct, narrow["token"]).status_code == 401
    # a site's token is not a researcher's
    state = json.loads(Path(hub["federation"], "state.json").read_text())
    site_token = next(
        a.split("=", 1)[1]
        for p in state["processes"]
        if p["name"] == "site-VA"
        for a in p["command"]
        if a.startswith("--token=")
    )
    assert get(direct, site_token).status_code == 401


def test_alice_runs_the_quickstart_in_jupyterlab_in_a_real_browser(
    hub: dict[str, Any], alice: HubUser, tmp_path: Path
) -> None:
    if not Path(lab_driver.CHROMIUM).exists():
        pytest.fail(f"no chromium at {lab_driver.CHROMIUM}: `make test` installs Debian's chromium as root")
    home = Path(hub["federation"]) / "hub" / "home" / "alice"
    assert (home / "01_quickstart_heart.ipynb").is_file()  # the hub put the examples in her home
    notebook = json.loads((REPO / "notebooks" / "01_quickstart_heart.ipynb").read_text())
    for cell in notebook["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            cell["source"] = PARAMETERS
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    (home / "quickstart.ipynb").write_text(json.dumps(notebook))  # the quickstart, with the test's parameters
    output = Path(os.environ.get("FLIP_TEST_OUTPUT") or REPO / "test-output")
    output.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = lab_driver.launch(playwright)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1100}).new_page()
            lab = lab_driver.hub_login(page, hub["hub"]["url"], "alice", hub["hub"]["password"])
            lab_driver.open_notebook(page, lab, "quickstart.ipynb")
            lab_driver.run_all(page)
            try:
                assert lab_driver.wait_for_chart_rounds(page, 2, timeout=240) >= 2
                lab_driver.wait_for_sites(page, SITES, timeout=60)
                prompts = lab_driver.wait_for_run_all(page, timeout=300)
            finally:
                lab_driver.show_run_widget(page)
                shot = lab_driver.screenshot(page, tmp_path / "hub-quickstart.png")
                shutil.copy(shot, output / "hub-quickstart.png")
                print(f"\nscreenshot: {output / 'hub-quickstart.png'}")
            assert lab_driver.chart_rounds(page) == ROUNDS, lab_driver.chart_series(page)
            assert sorted(lab_driver.site_rows(page)) == SITES
            assert set(lab_driver.site_statuses(page).values()) == {"done"}, lab_driver.site_statuses(page)
            assert "completed" in lab_driver.header_text(page)
            assert all(p.strip("[]: ").isdigit() for p in prompts), prompts  # every cell ran
            assert lab_driver.error_outputs(page) == []
            expect(page.locator(".jp-OutputArea-output", has_text="FLamby FedAvg (published)").first).to_be_attached(
                timeout=10_000
            )
        finally:
            browser.close()
