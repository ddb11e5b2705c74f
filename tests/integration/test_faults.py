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

from coordinator.federation import restart
from coordinator.local import wait_until
from flip_magics.client import RunHandle
from flip_magics.errors import RunFailed
from helpers import TINY_CELL

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def kill_site_after_round_one(federation: Any, handle: RunHandle, site: str) -> float:
    assert wait_until(lambda: any(e["type"] == "metrics" and e["round"] >= 1 for e in handle.events), 180), \
        f"no round-1 metrics: {handle.events[-3:]}"
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


def test_killed_site_is_marked_failed_and_the_run_finishes_on_the_others(federation: Any) -> None:
    handle = federation.client().train(TINY_CELL, dataset="heart-disease", rounds=2, min_sites=3, name="kill-va")
    killed_at = kill_site_after_round_one(federation, handle, "VA")
    handle.wait(timeout=300)
    failed = [e for e in handle.events if e["type"] == "site" and e["site"] == "VA" and e["status"] == "failed"]
    assert failed, handle.events
    assert failed[0]["detail"] == "the site went offline (its agent stopped answering)", failed
    print(f"VA shown as failed {failed[0]['received'] - killed_at:.1f} s after SIGKILL")
    rows = {r["site"]: r["status"] for r in handle.site_rows()}
    assert rows == {"Cleveland": "done", "Hungary": "done", "Switzerland": "done", "VA": "failed"}
    final = handle.history.query("round == 2 and phase == 'evaluate' and site != 'global'")
    assert sorted(set(final.site)) == ["Cleveland", "Hungary", "Switzerland"]
    assert handle.record["failed_sites"] == {"VA": "the site went offline (its agent stopped answering)"}


def test_killed_site_below_min_sites_fails_the_run_with_a_sentence(federation: Any) -> None:
    client = federation.client()
    assert {s["site"] for s in client.sites() if s["status"] == "online"} == {"Cleveland", "Hungary", "Switzerland"}
    handle = client.train(TINY_CELL, dataset="heart-disease", rounds=3, name="kill-switzerland")
    kill_site_after_round_one(federation, handle, "Switzerland")
    with pytest.raises(RunFailed) as failure:
        handle.wait(timeout=300)
    reason = failure.value.reason
    assert reason.startswith("Run stopped in round ")
    assert "2 site(s) remain (Cleveland, Hungary) but --min-sites is 3" in reason
    assert "Switzerland: the site went offline" in reason
    assert client.run(handle.run_id)["status"] == "failed"


def test_a_new_site_joins_the_running_federation(federation: Any, tmp_path: Path, heart_dir: Path) -> None:
    site_dir = tmp_path / "extra"
    env = {**os.environ, "FLIP_HOME": str(federation.home)}
    subprocess.run([BIN / "flip-site", "init", site_dir, "--name", "Extra"], check=True, env=env)
    added = subprocess.run([BIN / "flip-site", "dataset", "add", site_dir, "heart-extra",
                            heart_dir / "processed.cleveland.data", "--format", "uci-heart"],
                           check=True, env=env, capture_output=True, text=True)
    assert "dataset 'heart-extra': 303 rows" in added.stdout
    agent = subprocess.Popen([BIN / "flip-site", "start", site_dir], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
