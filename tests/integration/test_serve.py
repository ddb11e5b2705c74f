"""``flip serve``, the hub side of a real deployment (the coordinator container's command), as real processes.

A site registers and joins it; the hub side is stopped with SIGTERM (as ``docker stop`` does) and started
again on the same state: the CA is the same, the site's registration holds (the SuperLink's database
kept its key, the coordinator's register its token) and the site is back online without a new
registration; registering it again is refused.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from flip_core.certs import fingerprint
from flip_core.util import free_port, wait_until

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


@contextmanager
def serving(state: Path, fleet_port: int, coordinator_port: int) -> Iterator[dict[str, Any]]:
    process = subprocess.Popen(
        [
            BIN / "flip",
            "serve",
            "--state",
            state,
            "--listen",
            "127.0.0.1",
            "--fleet-port",
            str(fleet_port),
            "--coordinator-port",
            str(coordinator_port),
            "--hub-name",
            "hub.test",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def drain() -> None:  # its children log to the same stdout: keep reading, so that none of them blocks
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=drain, daemon=True).start()
    seen: list[str] = []
    try:
        while not (seen and seen[-1].startswith('{"flip": "serving"')):
            seen.append(lines.get(timeout=120))
            assert seen[-1], "flip serve exited at start:\n" + "".join(seen)
        yield json.loads(seen[-1])
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        assert code == 0, f"flip serve exited {code} on SIGTERM"


def sites(state: Path, coordinator_port: int) -> dict[str, dict[str, Any]]:
    internal = json.loads((state / "coordinator.json").read_text())["internal_token"]
    response = requests.get(
        f"http://127.0.0.1:{coordinator_port}/internal/sites",
        timeout=5,
        headers={"Authorization": f"Bearer {internal}"},
    )
    return {s["site"]: s for s in response.json()} if response.ok else {}


def test_the_hub_side_keeps_its_sites_across_a_restart(tmp_path: Path, heart_dir: Path) -> None:
    state, site_dir = tmp_path / "state", tmp_path / "VA"
    fleet_port, coordinator_port = free_port(), free_port()
    env = {**os.environ, "FLIP_HOME": str(tmp_path / "home")}

    def flip(*args: Any, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True)
        assert done.returncode == 0 or not check, f"{args[:3]}: {done.stderr}"
        return done

    flip(BIN / "flip-site", "init", site_dir, "--name", "VA")
    flip(
        BIN / "flip-site",
        "dataset",
        "add",
        site_dir,
        "heart-disease",
        heart_dir / "processed.va.data",
        "--format",
        "uci-heart",
    )
    flip(BIN / "flip-site", "keygen", site_dir)
    agent = None
    try:
        with serving(state, fleet_port, coordinator_port) as first:
            assert first["fleet"] == f"127.0.0.1:{fleet_port}" and first["ca"] == str(state / "pki" / "ca.pem")
            ca = fingerprint(state / "pki" / "ca.pem")
            registered = flip(
                BIN / "flip",
                "site",
                "register",
                "VA",
                site_dir / "keys" / "VA.pub",
                "--config",
                state / "coordinator.json",
            )
            token = registered.stdout.split("its token (shown once; send it to the site with the CA certificate): ")[1]
            flip(
                BIN / "flip-site",
                "join",
                site_dir,
                "--fleet",
                f"127.0.0.1:{fleet_port}",
                "--ca",
                state / "pki" / "ca.pem",
                f"--token={token.split()[0]}",
            )
            agent = subprocess.Popen(
                [BIN / "flip-site", "start", site_dir],
                env=env,
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            assert wait_until(lambda: sites(state, coordinator_port).get("VA", {}).get("status") == "online", 90)
            node = sites(state, coordinator_port)["VA"]["node_id"]
        with serving(state, fleet_port, coordinator_port):
            assert fingerprint(state / "pki" / "ca.pem") == ca
            # the same agent, never restarted, is back on the same node once the hub side is
            assert wait_until(lambda: sites(state, coordinator_port).get("VA", {}).get("status") == "online", 90)
            assert sites(state, coordinator_port)["VA"]["node_id"] == node
            again = flip(
                BIN / "flip",
                "site",
                "register",
                "VA",
                site_dir / "keys" / "VA.pub",
                "--config",
                state / "coordinator.json",
                check=False,
            )
            assert again.returncode == 1 and "site 'VA' is already registered" in again.stderr
    finally:
        if agent is not None:
            os.killpg(agent.pid, signal.SIGTERM)
            agent.wait(timeout=30)
