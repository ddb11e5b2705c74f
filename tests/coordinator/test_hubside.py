"""The hub's processes, defined once for flip up and flip serve (commands only: nothing is started)."""

from __future__ import annotations

from pathlib import Path

from coordinator.hubside import HubSide

from helpers import coordinator_config


def hub(tmp_path: Path, pki: Path | None) -> HubSide:
    config = coordinator_config(tmp_path / "coordinator", port=8900, superlink_control="127.0.0.1:9100")
    return HubSide(
        tmp_path,
        tmp_path / "coordinator.json",
        config,
        pki,
        listen="0.0.0.0",
        front_port=9092,
        database=str(tmp_path / "superlink.db"),
    )


def test_a_secure_hub_runs_the_superlink_with_tls_and_node_keys_behind_the_fleet_front(tmp_path: Path) -> None:
    side = hub(tmp_path, tmp_path / "pki")
    names = [p.name for p in side.processes()]
    assert names == ["serverapp-zygote", "superlink", "coordinator", "fleet-front"]
    superlink = next(p for p in side.processes() if p.name == "superlink").command
    assert "--enable-supernode-auth" in superlink and "--insecure" not in superlink
    assert superlink[superlink.index("--host") + 1] == "127.0.0.1"  # the SuperLink is never the sites' address
    assert superlink[superlink.index("--port") + 1] == "9100"
    assert superlink[superlink.index("--database") + 1] == str(tmp_path / "superlink.db")
    front = side.front()[0].command
    assert front[front.index("--host") + 1] == "0.0.0.0" and front[front.index("--port") + 1] == "9092"
    assert side.fleet == "127.0.0.1:9092"


def test_the_coordinator_and_the_server_loop_get_the_internal_token_and_the_sites_get_none(tmp_path: Path) -> None:
    side = hub(tmp_path, tmp_path / "pki")
    by_name = {p.name: p for p in side.processes()}
    for name in ("coordinator", "superlink", "serverapp-zygote"):
        assert by_name[name].env["FLIP_INTERNAL_TOKEN"] == "internal"
        assert by_name[name].env["FLIP_COORDINATOR_URL"] == "http://127.0.0.1:8900"
    assert "FLIP_INTERNAL_TOKEN" not in by_name["fleet-front"].env


def test_an_insecure_hub_has_no_front_and_sites_reach_the_superlink(tmp_path: Path) -> None:
    side = hub(tmp_path, None)
    assert [p.name for p in side.processes(coordinator=False)] == ["serverapp-zygote", "superlink"]
    assert "--insecure" in side.engine()[1].command and side.fleet == "127.0.0.1:9100"
