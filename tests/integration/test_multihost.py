"""The hub and two sites on separate hosts: each in its own network namespace, linked by veth pairs.

Made by the test (as root, with ``ip netns``): the hub's namespace holds the SuperLink, the
coordinator and the fleet front (``flip up --sites 0 --listen 0.0.0.0``); each site's namespace
has one link to the hub and nothing else. The sites join as hospitals do (``flip-site keygen``,
``flip site register`` on the hub, ``flip-site join``) and train through the fleet address over
TLS. From a site, the other site and the hub's SuperLink and coordinator cannot be reached; the
fleet front refuses Flower's control API.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flip_local.sites import local_policy
from site_agent.data.catalog import init_site, write_policy
from site_agent.data.formats import add_dataset

from helpers import TINY_CELL, shared_data

BIN = Path(sys.executable).parent
SITES = {"Cleveland": "processed.cleveland.data", "VA": "processed.va.data"}

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="network namespaces need root and iproute2 (CI runs as root)",
)


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def in_ns(
    ns: str, *command: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, *command],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    if check and done.returncode != 0:
        raise AssertionError(f"[{ns}] {' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def python_in(ns: str, code: str, env: dict[str, str] | None = None, check: bool = True) -> Any:
    """Run ``code`` with this venv's Python in ``ns``; the JSON it printed last."""
    done = in_ns(ns, sys.executable, "-c", textwrap.dedent(code), env=env, check=check)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("flip-multihost")
    heart_dir = shared_data() / "heart-disease"
    tag = f"f{os.getpid() % 100000}"
    hub = f"{tag}hub"
    sites = {name: f"{tag}s{i}" for i, name in enumerate(SITES, start=1)}
    address = {name: (f"10.231.{i}.1", f"10.231.{i}.2") for i, name in enumerate(SITES, start=1)}
    made: list[str] = []
    agents: list[subprocess.Popen[bytes]] = []
    hub_env = {"FLIP_HOME": str(root / "hub")}
    try:
        for ns in (hub, *sites.values()):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        for i, (name, ns) in enumerate(sites.items(), start=1):
            hub_end, site_end = f"{tag}h{i}", f"{tag}v{i}"
            sh("ip", "link", "add", hub_end, "type", "veth", "peer", "name", site_end)
            sh("ip", "link", "set", hub_end, "netns", hub)
            sh("ip", "link", "set", site_end, "netns", ns)
            hub_ip, site_ip = address[name]
            in_ns(hub, "ip", "addr", "add", f"{hub_ip}/24", "dev", hub_end)
            in_ns(hub, "ip", "link", "set", hub_end, "up")
            in_ns(ns, "ip", "addr", "add", f"{site_ip}/24", "dev", site_end)
            in_ns(ns, "ip", "link", "set", site_end, "up")
        # the hub host: SuperLink and coordinator on its loopback, the fleet front on every address
        names = [a[0] for a in address.values()]
        in_ns(
            hub,
            str(BIN / "flip"),
            "up",
            "--sites",
            "0",
            "--cold",
            "--listen",
            "0.0.0.0",
            *(f"--hub-name={n}" for n in names),
            env=hub_env,
        )
        connection = json.loads((root / "hub" / "connection.json").read_text())
        port = connection["superlink"].rsplit(":", 1)[1]
        for name, ns in sites.items():
            site_dir = root / name
            write_policy(
                add_dataset(init_site(site_dir, name), "heart-disease", heart_dir / SITES[name], "uci-heart"),
                local_policy(),
            )
            sh(str(BIN / "flip-site"), "keygen", str(site_dir))
            said = in_ns(
                hub, str(BIN / "flip"), "site", "register", name, str(site_dir / "keys" / f"{name}.pub"), env=hub_env
            ).stdout
            token = said.split("send it to the site with the CA certificate): ")[1].split()[0]
            fleet = f"{address[name][0]}:{port}"
            sh(
                str(BIN / "flip-site"),
                "join",
                str(site_dir),
                "--fleet",
                fleet,
                "--ca",
                connection["ca"],
                f"--token={token}",
            )
            log = open(root / f"{name}.log", "wb")  # noqa: SIM115 - the agent writes it until the end
            agents.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", ns, str(BIN / "flip-site"), "start", str(site_dir), "--warm-seconds", "0"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        yield {
            "root": root,
            "hub": hub,
            "sites": sites,
            "address": address,
            "connection": connection,
            "hub_env": hub_env,
            "port": int(port),
        }
    finally:
        for agent in agents:
            agent.terminate()
        for agent in agents:
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.kill()
        if hub in made:
            in_ns(hub, str(BIN / "flip"), "down", env=hub_env, check=False)
        for ns in made:
            sh("ip", "netns", "del", ns, check=False)


def test_sites_on_other_hosts_train_through_the_fleet_address_over_tls(hosts) -> None:
    connection = hosts["connection"]
    result = python_in(
        hosts["hub"],
        f"""
        import json
        from flip_core.util import wait_until
        from flip_magics.client import FlipClient
        client = FlipClient({connection["coordinator_url"]!r}, {connection["token"]!r})
        online = lambda: {{s["site"] for s in client.sites() if s["status"] == "online"}} == {set(SITES)!r}
        assert wait_until(online, 120, 0.2), client.sites()
        handle = client.train({TINY_CELL!r}, dataset="heart-disease", rounds=2, name="multihost").wait(300)
        print(json.dumps({{"status": handle.status, "sites": sorted(set(handle.history.site))}}))
    """,
    )
    assert result == {"status": "completed", "sites": ["Cleveland", "VA", "global"]}
    for name in SITES:
        log = (hosts["root"] / f"{name}.log").read_text()
        assert f"registered with the SuperLink at {hosts['address'][name][0]}:{hosts['port']}" in log


def test_a_site_reaches_nothing_of_the_hub_but_the_fleet_address(hosts) -> None:
    connection = hosts["connection"]
    superlink_port = int(connection["coordinator_url"].rsplit(":", 1)[1])  # the coordinator's port
    control_port = None
    state = json.loads((Path(connection["federation"]) / "state.json").read_text())
    for process in state["processes"]:
        if process["name"] == "superlink":
            control_port = int(process["command"][process["command"].index("--port") + 1])
    assert control_port is not None
    hub_ip, _ = hosts["address"]["Cleveland"]
    _, other_site = hosts["address"]["VA"]
    # something listens at the other site, so that "unreachable" means the network, not an empty port
    listener = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            hosts["sites"]["VA"],
            sys.executable,
            "-c",
            "import socket,time\ns=socket.create_server(('0.0.0.0', 8765))\nprint('up', flush=True)\ns.accept()",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "up"
        result = python_in(
            hosts["sites"]["Cleveland"],
            f"""
            import json, socket, requests
            def reach(host, port):
                try:
                    socket.create_connection((host, port), timeout=3).close()
                    return "open"
                except OSError as exc:
                    return type(exc).__name__
            fleet = "https://{hub_ip}:{hosts["port"]}"
            ca = {connection["ca"]!r}
            print(json.dumps({{
                "fleet": requests.get(fleet + "/health", verify=ca, timeout=5).text,
                "control_via_front": requests.post(fleet + "/v1/control/list-runs", verify=ca, timeout=5).status_code,
                "superlink": reach("{hub_ip}", {control_port}),
                "coordinator": reach("{hub_ip}", {superlink_port}),
                "other_site": reach("{other_site}", 8765),
                "hub_loopback": reach("127.0.0.1", {control_port}),
            }}))
        """,
        )
        from_hub = in_ns(
            hosts["hub"],
            sys.executable,
            "-c",
            f"import socket; socket.create_connection(('{other_site}', 8765), timeout=3).close()",
        )
        assert from_hub.returncode == 0  # the listener is there: the hub may reach it, a site may not
    finally:
        listener.kill()
    assert result["fleet"] == "ok" and result["control_via_front"] == 403
    assert result["superlink"] == "ConnectionRefusedError"  # the SuperLink listens on the hub's loopback only
    assert result["coordinator"] == "ConnectionRefusedError"
    assert result["other_site"] in ("OSError", "TimeoutError")  # no route from one site to another
    assert result["hub_loopback"] == "ConnectionRefusedError"  # a site's 127.0.0.1 is its own
