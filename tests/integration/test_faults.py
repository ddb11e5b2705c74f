"""Sites that die mid-run, and a site that joins a running federation: real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from flip_core.errors import RunFailed
from flip_core.util import wait_until
from flip_local.federation import restart
from flip_local.sites import local_policy
from flip_magics.client import RunHandle
from site_agent.data.catalog import load_site, write_policy

from helpers import GATED_CELL, PAUSING_CELL, TINY_CELL, Gate

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def kill_site_after_round_one(federation: Any, handle: RunHandle, site: str) -> float:
    assert wait_until(lambda: any(e["type"] == "metrics" and e["round"] >= 1 for e in handle.events), 180), (
        f"no round-1 metrics: {handle.events[-3:]}"
    )
    os.killpg(federation.pid(f"site-{site}"), signal.SIGKILL)
    return time.time()


def test_a_run_survives_a_coordinator_restart_and_the_notebook_reconnects(federation: Any) -> None:
    client = federation.client()
    handle = client.train(TINY_CELL, dataset="heart-disease", rounds=2, name="restart")
    assert wait_until(lambda: any(e["type"] == "metrics" and e["round"] >= 1 for e in handle.events), 180)
    restart("coordinator", federation.home)  # SIGKILL, then the same command again
    handle.wait(timeout=300)
    assert sorted(set(handle.history["round"])) == [0, 1, 2]
    assert handle.status == "completed" and len(handle.record["model_sha256"]) == 64
    assert client.run(handle.run_id)["status"] == "completed"


def test_killed_site_is_marked_failed_and_rejoins_after_a_restart(federation: Any) -> None:
    handle = federation.client().train(
        PAUSING_CELL, dataset="heart-disease", rounds=10, min_sites=3, name="kill-va", config={"pause": 1.0}
    )
    killed_at = kill_site_after_round_one(federation, handle, "VA")

    def events(status: str) -> list[dict[str, Any]]:
        return [e for e in handle.events if e["type"] == "site" and e["site"] == "VA" and e["status"] == status]

    assert wait_until(lambda: events("failed") or handle.done, 60)
    failed = events("failed")
    assert failed and failed[0]["detail"] == "the site went offline (its agent stopped answering)", handle.events
    print(f"VA shown as failed {failed[0]['received'] - killed_at:.1f} s after SIGKILL")
    failed_round = failed[0]["round"]
    # the round VA was in completes with the other three
    assert wait_until(lambda: any(e["type"] == "round" and e["round"] == failed_round for e in handle.events), 60)
    round_event = next(e for e in handle.events if e["type"] == "round" and e["round"] == failed_round)
    assert round_event["sites"] == 3

    restart("site-VA", federation.home)  # the same command again: a new agent, a new Flower node
    handle.wait(timeout=300)
    rejoined = events("rejoined")
    assert rejoined and rejoined[0]["round"] > failed_round, handle.events
    back = rejoined[0]["round"]
    trained = handle.history.query("phase == 'train' and site == 'VA'")
    assert set(trained["round"]) >= set(range(back, 11)), trained
    assert "VA" in set(handle.history.query("round == 10 and phase == 'evaluate'").site)
    assert handle.status == "completed" and handle.record["failed_sites"] == {}


def test_a_straggler_sits_out_rounds_past_the_round_timeout(federation: Any) -> None:
    client = federation.client()
    assert wait_until(lambda: len([s for s in client.sites() if s["status"] == "online"]) == 4, 60)
    handle = client.train(
        GATED_CELL,
        dataset="heart-disease",
        rounds=2,
        min_sites=3,
        round_timeout=1.5,
        name="straggler",
        config={"hold_at": "Hungary"},  # Hungary's training waits at a gate the test holds shut until the run ends
    )
    try:
        handle.wait(timeout=300)  # no round waited for Hungary: the whole run ended with Hungary still held
    finally:
        Gate(federation.home / "federation" / "sites").open(handle.run_id, "Hungary")
    late = [e for e in handle.events if e["type"] == "site" and e["status"] == "late"]
    assert {(e["site"], e["round"]) for e in late} == {("Hungary", 1), ("Hungary", 2)}, late
    assert late[0]["detail"] == "no reply within the round timeout (1.5 s)"
    rounds = [e for e in handle.events if e["type"] == "round"]
    assert [e["sites"] for e in rounds] == [3, 3]
    assert "Hungary" not in set(handle.history.query("phase == 'train'").site)
    assert handle.status == "completed"


def test_killed_site_below_min_sites_fails_the_run_with_a_sentence(federation: Any) -> None:
    client = federation.client()
    assert wait_until(lambda: len([s for s in client.sites() if s["status"] == "online"]) == 4, 60)
    handle = client.train(
        PAUSING_CELL, dataset="heart-disease", rounds=6, name="kill-switzerland", config={"pause": 0.5}
    )
    kill_site_after_round_one(federation, handle, "Switzerland")
    with pytest.raises(RunFailed) as failure:
        handle.wait(timeout=300)
    reason = failure.value.reason
    assert reason.startswith("Run stopped in round ")
    assert "3 site(s) remain (Cleveland, Hungary, VA) but --min-sites is 4" in reason
    assert "Switzerland: the site went offline" in reason
    assert client.run(handle.run_id)["status"] == "failed"


def test_a_new_site_joins_the_running_federation(federation: Any, tmp_path: Path, heart_dir: Path) -> None:
    site_dir = tmp_path / "extra"
    env = {**os.environ, "FLIP_HOME": str(federation.home)}
    subprocess.run([BIN / "flip-site", "init", site_dir, "--name", "Extra"], check=True, env=env)
    added = subprocess.run(
        [
            BIN / "flip-site",
            "dataset",
            "add",
            site_dir,
            "heart-extra",
            heart_dir / "processed.cleveland.data",
            "--format",
            "uci-heart",
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    assert "dataset 'heart-extra': 303 rows" in added.stdout
    # its admin admits the federation's project (a new site admits none: no project would see its dataset)
    write_policy(load_site(site_dir), local_policy())
    # as a hospital joins: its admin makes a key pair, the hub operator registers the public key and sends
    # back a token with the consortium's CA certificate, the admin records them and starts the agent
    made = subprocess.run([BIN / "flip-site", "keygen", site_dir], check=True, env=env, capture_output=True, text=True)
    assert "flip site register Extra Extra.pub" in made.stdout
    registered = subprocess.run(
        [BIN / "flip", "site", "register", "Extra", site_dir / "keys" / "Extra.pub"],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    token = registered.stdout.split("its token (shown once; send it to the site with the CA certificate): ")[1].split()[
        0
    ]
    again = subprocess.run(
        [BIN / "flip", "site", "register", "Extra", site_dir / "keys" / "Extra.pub"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 1 and "site 'Extra' is already registered" in again.stderr
    subprocess.run(
        [
            BIN / "flip-site",
            "join",
            site_dir,
            "--fleet",
            federation.connection["superlink"],
            "--ca",
            federation.connection["ca"],
            f"--token={token}",
        ],
        check=True,
        env=env,
    )
    agent = subprocess.Popen(
        [BIN / "flip-site", "start", site_dir],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = federation.client()

    def extra() -> dict[str, Any] | None:
        return next((s for s in client.sites() if s["site"] == "Extra"), None)

    try:
        assert wait_until(lambda: (extra() or {}).get("status") == "online", 90)
        assert [d["name"] for d in extra()["datasets"]] == ["heart-extra"]  # type: ignore[index]
    finally:
        os.killpg(agent.pid, signal.SIGTERM)
        agent.wait(timeout=30)
    assert wait_until(lambda: (extra() or {}).get("status") == "offline", 10)


def test_flip_status_json_describes_the_federation(federation: Any) -> None:
    env = {**os.environ, "FLIP_HOME": str(federation.home)}
    out = subprocess.run([BIN / "flip", "status", "--json"], env=env, capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["running"] is True
    assert info["coordinator_url"] == federation.connection["coordinator_url"]
    assert info["superlink"] == federation.connection["superlink"]
    assert {"Cleveland", "Hungary"} <= {s["site"] for s in info["sites"]}


def test_a_failure_while_starting_stops_what_was_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flip_local.federation as federation_module
    import flip_local.hub as hub_module
    from flip_local.processes import Federation, alive

    started: list[int] = []
    spawn = federation_module.spawn

    def recording_spawn(*args: Any, **kwargs: Any) -> dict[str, Any]:
        process = spawn(*args, **kwargs)
        started.append(process["pid"])
        return process

    def failing_hub_launch(*args: Any, **kwargs: Any) -> Any:  # the injected fault: after the SuperLink started
        raise OSError("No space left on device: hub/settings.json")

    monkeypatch.setattr(federation_module, "spawn", recording_spawn)
    monkeypatch.setattr(hub_module, "launch", failing_hub_launch)
    with pytest.raises(OSError, match="No space left on device"):
        federation_module.up(tmp_path, hub=federation_module.HubOptions())
    assert len(started) == 2  # the ServerApp starter and the SuperLink were running when it failed
    assert not [pid for pid in started if alive(pid)]
    assert not Federation(tmp_path).running()
