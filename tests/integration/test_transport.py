"""Authenticated transport in a real local federation (``flip up``'s default).

The sites' one address is the fleet front: TLS with the consortium's certificate, Flower's fleet API
and the coordinator's site routes and nothing else. The SuperLink takes only SuperNodes whose keys the
hub operator registered; the coordinator takes only registered sites' tokens, each for its own site.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from flip_local.federation import Federation

from helpers import local_federation

BIN = Path(sys.executable).parent
FRONT = "this address serves only Flower's fleet API and FLIP's site routes"


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("flip-tls")
    with local_federation(home, warm=False) as connection:
        state = Federation(home).state()
        assert state is not None
        tokens = {
            p["name"][5:]: next(a for a in p["command"] if a.startswith("--token="))[8:]
            for p in state["processes"]
            if p["name"].startswith("site-")
        }
        yield {**connection, "home": home, "site_tokens": tokens}


def front(federation: dict[str, Any], method: str, path: str, **options: Any) -> requests.Response:
    return requests.request(
        method, f"https://{federation['superlink']}{path}", verify=federation["ca"], timeout=10, **options
    )


def test_only_the_fleet_api_and_site_routes_face_the_sites(federation) -> None:
    assert federation["secure"] and federation["superlink"] != federation["coordinator_url"]
    for method, path in [
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/runtime/pull-task-input"),
        ("GET", "/docs"),
        ("GET", "/api/runs"),
        ("GET", "/internal/sites"),
        ("GET", "/v1/fleet/pull-messages"),
    ]:
        refused = front(federation, method, path)
        assert (refused.status_code, refused.text.strip()) == (403, FRONT), (method, path)
    fleet = front(
        federation, "POST", "/v1/fleet/pull-messages", data=b"", headers={"Content-Type": "application/protobuf"}
    )
    assert fleet.status_code == 401 and "authentication" in fleet.text  # the SuperLink itself: no node signature
    with pytest.raises(requests.exceptions.SSLError):  # the hub's certificate is the consortium's, not a public CA's
        requests.get(f"https://{federation['superlink']}/health", timeout=10, verify=True)
    with pytest.raises(requests.exceptions.ConnectionError):  # and there is no plain HTTP
        requests.get(f"http://{federation['superlink']}/health", timeout=10)


def test_an_unregistered_token_is_refused_by_the_coordinator(federation) -> None:
    announce = front(
        federation,
        "POST",
        "/site/announce",
        json={"site": "Rogue", "node_id": None, "info": {}},
        headers={"Authorization": "Bearer not-a-registered-token"},
    )
    assert announce.status_code == 401 and "not registered" in announce.text


def test_a_site_speaks_only_for_itself(federation) -> None:
    va = {"Authorization": f"Bearer {federation['site_tokens']['VA']}"}
    posing = front(
        federation,
        "POST",
        "/site/announce",
        headers=va,
        json={"site": "Cleveland", "node_id": None, "info": {}, "state": "offline"},
    )
    assert posing.status_code == 403 and "belongs to site 'VA'" in posing.text
    listening = front(federation, "GET", "/site/presence/Hungary", headers=va)
    assert listening.status_code == 403
    other_node = front(
        federation,
        "POST",
        "/site/announce",
        headers=va,
        json={"site": "VA", "node_id": 12345, "info": {}, "state": "online"},
    )
    assert other_node.status_code == 403 and "is not the node registered for site 'VA'" in other_node.text


def test_a_site_with_an_unregistered_key_says_so_in_its_log(federation, tmp_path: Path, heart_dir: Path) -> None:
    env = {**os.environ, "FLIP_HOME": str(federation["home"])}
    site_dir = tmp_path / "rogue"
    subprocess.run([BIN / "flip-site", "init", site_dir, "--name", "Rogue"], check=True, env=env)
    subprocess.run(
        [
            BIN / "flip-site",
            "dataset",
            "add",
            site_dir,
            "heart",
            heart_dir / "processed.va.data",
            "--format",
            "uci-heart",
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    subprocess.run([BIN / "flip-site", "keygen", site_dir], check=True, env=env, capture_output=True)
    subprocess.run(
        [
            BIN / "flip-site",
            "join",
            site_dir,
            "--fleet",
            federation["superlink"],
            "--ca",
            federation["ca"],
            "--token=unregistered",
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    log = tmp_path / "rogue.log"
    with open(log, "wb") as sink:
        agent = subprocess.Popen(
            [BIN / "flip-site", "start", site_dir, "--warm-seconds", "0"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        assert agent.wait(timeout=60) == 3  # Flower ends a SuperNode the SuperLink will not register
    finally:
        if agent.poll() is None:
            agent.kill()
    said = log.read_text()
    assert "the SuperLink at " + federation["superlink"] + " refused this site" in said, said[-3000:]
    assert "the hub operator runs `flip site register Rogue KEY.pub`" in said
    assert "Rogue" not in {
        s["site"]
        for s in requests.get(
            f"{federation['coordinator_url']}/api/sites",
            headers={"Authorization": f"Bearer {federation['token']}"},
            timeout=10,
        ).json()
    }
