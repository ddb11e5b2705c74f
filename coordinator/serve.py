"""``flip serve``: the hub side of a real federation, in the foreground (a container's one command).

It runs what ``flip up`` runs on the hub, without sites: the SuperLink (TLS, node authentication,
its state in a database file), the coordinator, the warm ServerApp starter and the fleet front
(the sites' one address). Unlike ``flip up`` it keeps everything under ``--state`` across restarts:
the consortium CA (made once), the registered sites (the SuperLink's database holds their keys, the
coordinator's register their tokens), runs and models. The hub's certificate is issued afresh at
each start for the ``--hub-name``s given. Children log to this process's stdout (``docker logs``).
It stops them all on SIGTERM or SIGINT, and stops (exit 1) when one of them dies, so the container's
restart policy starts the whole hub side again.

The researchers' API listens on ``--coordinator-listen``; on a hub the coordinator takes the hub's
identity settings from the environment JupyterHub gives its services (``JUPYTERHUB_API_URL``,
``JUPYTERHUB_API_TOKEN``, ``JUPYTERHUB_SERVICE_NAME``).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import requests

from coordinator.config import CoordinatorConfig
from coordinator.federation import READY_SECONDS, FederationError, _bin
from coordinator.flower_control import FlowerControl
from coordinator.local import flower_env, free_port, wait_until
from coordinator.serverapp_zygote import ENV_SOCKET as ZYGOTE_SOCKET_ENV
from coordinator.serverapp_zygote import write_launcher
from site_agent.certs import load_ca, make_ca, make_server_cert

STOP_SECONDS = 10.0


class _Stop(Exception):
    pass


def prepare(state: Path, *, coordinator_listen: str, coordinator_port: int, hub_names: list[str]) -> CoordinatorConfig:
    """The state folder for this start: the CA (once), a fresh hub certificate, the coordinator's config
    (its internal token and headless tokens kept; this start's addresses)."""
    state.mkdir(parents=True, exist_ok=True)
    pki = state / "pki"
    ca = load_ca(pki) if (pki / "ca.pem").exists() else make_ca(pki)
    make_server_cert(pki, "superlink", sorted({"127.0.0.1", "localhost", *hub_names}))
    path = state / "coordinator.json"
    old = CoordinatorConfig.load(path) if path.exists() else None
    config = CoordinatorConfig(
        state_dir=state / "coordinator", host=coordinator_listen, port=coordinator_port,
        superlink_control=f"127.0.0.1:{free_port()}",
        internal_token=old.internal_token if old else secrets.token_urlsafe(24), site_token="",
        tokens=dict(old.tokens) if old else {}, superlink_ca=str(ca.cert),
    )
    config.state_dir.mkdir(exist_ok=True)
    config.dump(path)
    return config


def serve(state: Path, *, listen: str = "0.0.0.0", fleet_port: int = 9092, coordinator_listen: str = "127.0.0.1",
          coordinator_port: int = 8900, hub_names: list[str] | None = None) -> int:
    state = state.resolve()
    config = prepare(state, coordinator_listen=coordinator_listen, coordinator_port=coordinator_port,
                     hub_names=list(hub_names or []))
    pki = state / "pki"
    coordinator_url = f"http://127.0.0.1:{coordinator_port}"
    base_env = flower_env(state / "flwr")
    hub_env = {**base_env, "FLIP_COORDINATOR_URL": coordinator_url, "FLIP_INTERNAL_TOKEN": config.internal_token}
    launcher_dir = write_launcher(state / "bin").parent
    superlink_env = {**hub_env, "PATH": str(launcher_dir) + os.pathsep + hub_env["PATH"],
                     ZYGOTE_SOCKET_ENV: str(state / "serverapp.sock")}
    superlink = config.superlink_control
    commands: list[tuple[str, list[str], dict[str, str]]] = [
        ("serverapp-zygote", [sys.executable, "-m", "coordinator.serverapp_zygote",
                              "--socket", str(state / "serverapp.sock")], superlink_env),
        ("superlink", [_bin("flower-superlink"), "--ssl-certfile", str(pki / "superlink.pem"),
                       "--ssl-keyfile", str(pki / "superlink.key"), "--ssl-ca-certfile", str(pki / "ca.pem"),
                       "--enable-supernode-auth", "--host", "127.0.0.1", "--port", superlink.rsplit(":", 1)[1],
                       "--disable-runtime-dependency-installation",
                       "--database", str(state / "superlink.db")], superlink_env),
        ("coordinator", [sys.executable, "-m", "coordinator", "--config", str(state / "coordinator.json")], hub_env),
        ("fleet-front", [sys.executable, "-m", "coordinator.fleet_front", "--host", listen, "--port", str(fleet_port),
                         "--superlink", f"https://{superlink}", "--superlink-ca", str(pki / "ca.pem"),
                         "--coordinator", coordinator_url, "--certfile", str(pki / "superlink.pem"),
                         "--keyfile", str(pki / "superlink.key")], base_env),
    ]

    def stop_signal(signum: int, frame: Any) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    children: dict[int, str] = {}
    code = 0
    try:
        for name, command, env in commands:
            children[subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL).pid] = name
        control = FlowerControl(superlink, pki / "ca.pem")
        try:
            if not wait_until(lambda: _exited(children) or control.ready(), READY_SECONDS, 0.1):
                raise FederationError("the SuperLink's control API did not answer within 90 s")
        finally:
            control.close()  # an open connection would hold up the SuperLink's shutdown
        if not wait_until(lambda: _exited(children) or _health(coordinator_url), READY_SECONDS, 0.1):
            raise FederationError("the coordinator did not answer within 90 s")
        print(json.dumps({"flip": "serving", "fleet": f"{listen}:{fleet_port}", "coordinator":
                          f"{coordinator_listen}:{coordinator_port}", "state": str(state),
                          "ca": str(pki / "ca.pem")}), flush=True)
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid in children:
                print(f"flip serve: {children[pid]} exited ({_describe(status)}); stopping", file=sys.stderr, flush=True)
                code = 1
                break
    except _Stop as why:
        print(f"flip serve: {why}, stopping", file=sys.stderr, flush=True)
    except FederationError as exc:
        print(f"flip serve: {exc}; stopping", file=sys.stderr, flush=True)
        code = 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop(children)
    return code


def _health(url: str) -> bool:
    try:
        return requests.get(f"{url}/api/health", timeout=1).ok
    except requests.RequestException:
        return False


def _exited(children: dict[int, str]) -> bool:
    for pid, name in children.items():
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise FederationError(f"{name} exited at start ({_describe(status)})")
    return False


def _describe(status: int) -> str:
    return f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"code {os.WEXITSTATUS(status)}"


def _stop(children: dict[int, str]) -> None:
    """SIGTERM to every child still running (the fleet front and coordinator first), SIGKILL after 10 s."""
    order = sorted(children, key=lambda pid: children[pid] == "superlink")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in order:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

        def reaped() -> bool:
            for pid in list(order):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    order.remove(pid)
            return not order
        if wait_until(reaped, STOP_SECONDS, 0.05):
            return
