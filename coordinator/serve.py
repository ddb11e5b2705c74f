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
from coordinator.flower_control import FlowerControl
from coordinator.hubside import HubSide
from flip_core.certs import load_ca, make_ca, make_server_cert
from flip_core.errors import FlipError
from flip_core.util import free_port, wait_until

STOP_SECONDS = 10.0
READY_SECONDS = 90.0


class _Stop(Exception):  # noqa: N818 - a signal's way out of the wait loop, not an error
    pass


class ServeError(FlipError):
    """The hub side could not start: the message says which part."""


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
        state_dir=state / "coordinator",
        host=coordinator_listen,
        port=coordinator_port,
        superlink_control=f"127.0.0.1:{free_port()}",
        internal_token=old.internal_token if old else secrets.token_urlsafe(24),
        site_token="",
        tokens=dict(old.tokens) if old else {},
        superlink_ca=str(ca.cert),
    )
    config.state_dir.mkdir(exist_ok=True)
    config.dump(path)
    return config


def serve(
    state: Path,
    *,
    listen: str = "0.0.0.0",
    fleet_port: int = 9092,
    coordinator_listen: str = "127.0.0.1",
    coordinator_port: int = 8900,
    hub_names: list[str] | None = None,
    front: str = "python",
) -> int:
    state = state.resolve()
    config = prepare(
        state, coordinator_listen=coordinator_listen, coordinator_port=coordinator_port, hub_names=list(hub_names or [])
    )
    pki = state / "pki"
    hub = HubSide(
        state,
        state / "coordinator.json",
        config,
        pki,
        listen=listen,
        front_port=fleet_port,
        database=str(state / "superlink.db"),
        front_kind=front,
    )

    def stop_signal(signum: int, frame: Any) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    children: dict[int, str] = {}
    code = 0
    try:
        for spec in hub.processes():
            children[subprocess.Popen(spec.command, env=spec.env, stdin=subprocess.DEVNULL).pid] = spec.name
        control = FlowerControl(hub.superlink, pki / "ca.pem")
        try:
            if not wait_until(lambda: _exited(children) or control.ready(), READY_SECONDS, 0.1):
                raise ServeError("the SuperLink's control API did not answer within 90 s")
        finally:
            control.close()  # an open connection would hold up the SuperLink's shutdown
        if not wait_until(lambda: _exited(children) or _health(hub.coordinator_url), READY_SECONDS, 0.1):
            raise ServeError("the coordinator did not answer within 90 s")
        print(
            json.dumps(
                {
                    "flip": "serving",
                    "fleet": f"{listen}:{fleet_port}",
                    "coordinator": f"{coordinator_listen}:{coordinator_port}",
                    "state": str(state),
                    "ca": str(pki / "ca.pem"),
                }
            ),
            flush=True,
        )
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid in children:
                print(
                    f"flip serve: {children[pid]} exited ({_describe(status)}); stopping", file=sys.stderr, flush=True
                )
                code = 1
                break
    except _Stop as why:
        print(f"flip serve: {why}, stopping", file=sys.stderr, flush=True)
    except ServeError as exc:
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
            raise ServeError(f"{name} exited at start ({_describe(status)})")
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
