"""A local federation on one machine: SuperLink, coordinator and one site agent per hospital.

``flip up`` starts every process detached (own session, logs under the federation
directory), waits until each site is registered and online, and writes the connection file
that notebooks read. ``flip down`` stops them. Everything binds 127.0.0.1 on free ports.

It is laid out as a real deployment is: a consortium CA and the hub's TLS certificate
(``pki/``); the SuperLink (TLS, SuperNode authentication) and the coordinator listening on the
hub's loopback only; the fleet front (``coordinator.fleet_front``) as the one site-facing
address, serving Flower's fleet API and the coordinator's site routes and nothing else; each site
with its own key pair, registered with the SuperLink, and its own coordinator token.
``insecure=True`` (``flip up --insecure``) drops all of it, for debugging only.
"""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from coordinator.config import CoordinatorConfig, TokenGrant
from coordinator.enrolment import register_key
from coordinator.flower_control import FlowerControl
from coordinator.hubside import HubSide, ProcessSpec, bin_path
from coordinator.registry import SiteRegistry
from flip_core.certs import SITE_KEYS, make_ca, make_server_cert, make_site_keys
from flip_core.errors import FlipError
from flip_core.paths import connection_path, flip_home, read_connection, write_connection
from flip_core.util import free_port, wait_until
from flip_local import hub as local_hub
from flip_local import postgres
from flip_local.hub import HUB_PROJECT, HubOptions
from flip_local.processes import Federation, alive, spawn, stop, tail
from flip_local.sites import DEFAULT_PROJECT, prepare_heart_sites, prepare_imaging_demo_sites, prepare_omop_sites
from site_agent.sandbox import isolation

DEMOS = ("heart", "imaging", "omop")

READY_SECONDS = 90.0

__all__ = ["DEFAULT_PROJECT", "Federation", "FederationError", "HubOptions", "down", "restart", "status", "up"]


class FederationError(FlipError):
    """The local federation could not be started or reached; the message says why."""


@dataclass(frozen=True)
class Options:
    """What ``flip up`` was asked for (see :func:`up`)."""

    data: Path | None = None
    sites: int = 4
    warm: bool = True
    auto_approve: bool = True
    policy: dict[str, Any] | None = None
    secure: bool = True
    listen: str = "127.0.0.1"
    hub_names: tuple[str, ...] = ()
    hub: HubOptions | None = None
    front: str = "python"
    demo: str = "heart"  # the sites' data: the four heart-disease hospitals, or BreastMNIST over three sites
    site_dirs: tuple[Path, ...] = ()  # site folders made beforehand (flip-site init, dataset add), not a demo's

    @property
    def project(self) -> str:
        return HUB_PROJECT if self.hub else DEFAULT_PROJECT


def up(
    home: Path | None = None,
    *,
    data: Path | None = None,
    sites: int = 4,
    warm: bool = True,
    auto_approve: bool = True,
    policy: dict[str, Any] | None = None,
    secure: bool = True,
    listen: str = "127.0.0.1",
    hub_names: tuple[str, ...] = (),
    hub: HubOptions | None = None,
    front: str = "python",
    demo: str = "heart",
    site_dirs: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """Start the local federation (``sites`` site agents) and return the connection it wrote.

    ``hub``: a local JupyterHub too (``flip hub``), which starts the coordinator as its service; the
    sites' project is then ``heart`` (hub group ``project-heart``), else ``default``.

    ``auto_approve``: the sites run any code of project ``default`` (development); without it
    each task waits until the site's admin approves its code (``flip-site approve``). ``policy``
    replaces the sites' whole policy (the ``policy`` and ``projects`` tables of site.toml).

    ``listen``: the address the fleet front binds (all sites reach the hub there; ``0.0.0.0`` for sites
    on other hosts), and ``hub_names`` the names or addresses they use for it (in its certificate).
    The SuperLink and the coordinator always listen on the hub's loopback only.

    ``front``: the fleet front sites reach: FLIP's own (``python``, ``coordinator.fleet_front``) or ``nginx``
    (``coordinator.nginx_front``, the same allow list; Debian's ``nginx-light``).

    ``warm``: each site keeps a spare task process (torch loaded) so that a run starts at once;
    without it a site costs only its agent's memory and a run first starts its task processes.

    ``demo``: ``heart`` (the four hospitals of the heart-disease study, ``sites`` of them), ``imaging``
    (BreastMNIST's images spread over three sites with a seeded non-IID split, ``flip_local.imaging_demo``,
    registered as the imaging dataset ``breastmnist``) or ``omop`` (a PostgreSQL of the federation's own, Debian's,
    holding three hospitals' OMOP CDM databases of OHDSI's Eunomia GiBleed, registered as ``gibleed``).
    ``site_dirs``: start these site folders instead (each made with ``flip-site init`` and ``dataset add``; a
    benchmark's or a test's own data), under their own policy.
    """
    federation = Federation(home or flip_home())
    if federation.running():
        raise FederationError(f"a local federation is already running under {federation.root}; `flip down` first")
    if front not in ("python", "nginx"):
        raise FederationError(f"the fleet front is 'python' or 'nginx', not {front!r}")
    if demo not in DEMOS:
        raise FederationError(f"the demo data is one of {', '.join(DEMOS)}, not {demo!r}")
    options = Options(
        data,
        sites,
        warm,
        auto_approve,
        policy,
        secure,
        listen,
        hub_names,
        hub.chosen() if hub is not None else None,
        front,
        demo,
        tuple(Path(d).resolve() for d in site_dirs),
    )
    launch = _Launch(federation, options)
    try:
        return launch.run()
    except BaseException:  # whatever stopped it (an error, Ctrl-C), nothing it started is left running
        if launch.processes:
            federation.write_state(launch.processes)
            down(federation.home)
        raise


@dataclass
class _Launch:
    """One ``flip up``, step by step; ``processes`` holds what has been started so far."""

    federation: Federation
    options: Options
    processes: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def root(self) -> Path:
        return self.federation.root

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def run(self) -> dict[str, Any]:
        if self.root.exists():
            shutil.rmtree(self.root)
        self.logs.mkdir(parents=True)
        o = self.options
        if o.site_dirs:
            site_dirs = list(o.site_dirs)
        elif o.demo == "omop":
            site_dirs = prepare_omop_sites(
                self.root, self.start_postgres(), auto_approve=o.auto_approve, policy=o.policy, project=o.project
            )
        elif o.demo == "imaging":
            site_dirs = prepare_imaging_demo_sites(
                self.root, o.data, auto_approve=o.auto_approve, policy=o.policy, project=o.project
            )
        else:
            site_dirs = prepare_heart_sites(
                self.root, o.data, o.sites, auto_approve=o.auto_approve, policy=o.policy, project=o.project
            )
        hub, token = self.hub_side()
        self.start_hub(hub)
        self.wait("the coordinator", lambda: _answers(f"{hub.coordinator_url}/api/health"))
        self.start_sites(hub, site_dirs)
        self.wait(
            "every site",
            lambda: _sites_online(hub.coordinator_url, token, [d.name for d in site_dirs]),
            "not every site came online",
        )
        if o.hub is not None:
            self.wait("JupyterHub", lambda: local_hub.answers(o.hub.url))  # type: ignore[union-attr]
        return self.write_connection(hub, token)

    def hub_side(self) -> tuple[HubSide, str]:
        """The hub's keys and certificate (unless insecure) and the coordinator's config; a researcher token."""
        o, pki = self.options, self.root / "pki"
        if o.secure:
            make_ca(pki)
            make_server_cert(pki, "superlink", ["127.0.0.1", "localhost", *o.hub_names])
        else:
            print(
                "WARNING: flip up --insecure: the SuperLink and the coordinator speak plain HTTP and take any "
                "node; for debugging only",
                file=sys.stderr,
            )
        token = secrets.token_urlsafe(24)
        config = CoordinatorConfig(
            state_dir=self.root / "coordinator",
            host="127.0.0.1",
            port=free_port(),
            superlink_control=f"127.0.0.1:{free_port()}",
            internal_token=secrets.token_urlsafe(24),
            site_token="" if o.secure else secrets.token_urlsafe(24),
            tokens={token: TokenGrant(researcher=getpass.getuser(), project=o.project)},
            superlink_ca=str(pki / "ca.pem") if o.secure else None,
        )
        config.state_dir.mkdir(parents=True)
        config.dump(self.root / "coordinator.json")
        return HubSide(
            self.root,
            self.root / "coordinator.json",
            config,
            pki if o.secure else None,
            listen=o.listen,
            front_port=free_port(),
            front_kind=o.front,
        ), token

    def start_postgres(self) -> postgres.Postgres:
        """The OMOP demo's PostgreSQL (Debian's, in the federation's folder, on a free port): a process of the
        federation, stopped with it."""
        server = postgres.prepare(self.root / "postgres")
        self.spawn(ProcessSpec("postgres", postgres.foreground(server), dict(os.environ)))
        self.federation.write_state(self.processes)
        self.wait("PostgreSQL", lambda: postgres.answers(server))
        return server

    def spawn(self, spec: ProcessSpec) -> None:
        self.processes.append(spawn(spec, self.logs))

    def start_hub(self, hub: HubSide) -> None:
        """The SuperLink and its ServerApp starter, the coordinator (or JupyterHub, which starts it), the front."""
        for spec in hub.engine():
            self.spawn(spec)
        if self.options.hub is None:
            self.spawn(hub.coordinator())
        else:  # the hub starts the coordinator (a managed service) and restarts it if it dies
            coordinator = hub.coordinator()
            self.spawn(
                local_hub.launch(
                    self.root,
                    self.options.hub,
                    coordinator,
                    hub.coordinator_url,
                    _flip_part(coordinator.env),
                    hub.base_env(),
                )
            )
        for spec in hub.front():
            self.spawn(spec)
        self.federation.write_state(self.processes)

    def start_sites(self, hub: HubSide, site_dirs: list[Path]) -> None:
        """Each site as a real one joins: its own key pair, registered by the hub, and its own token."""
        control = None
        if hub.pki is not None:
            control = FlowerControl(hub.superlink, hub.pki / "ca.pem")
            self.wait("the SuperLink", control.ready)
        env = self.site_env(hub)
        try:
            for site_dir in site_dirs:
                self.spawn(self.site_agent(hub, control, site_dir, env))
        finally:
            if control is not None:
                control.close()  # an open connection would hold up the SuperLink's shutdown
        self.federation.write_state(self.processes)

    def site_agent(
        self, hub: HubSide, control: FlowerControl | None, site_dir: Path, env: dict[str, str]
    ) -> ProcessSpec:
        if control is not None and hub.pki is not None:
            keys = make_site_keys(site_dir / SITE_KEYS, site_dir.name)
            token = register_key(control, SiteRegistry(hub.config.registry_path), site_dir.name, keys.public)
            credentials = ["--ca", str(hub.pki / "ca.pem"), "--coordinator", f"https://{hub.fleet}"]
        else:
            token, credentials = hub.config.site_token, ["--insecure", "--coordinator", hub.coordinator_url]
        command = [
            bin_path("flip-site"),
            "start",
            str(site_dir),
            "--superlink",
            hub.fleet,
            *credentials,
            f"--token={token}",  # a token may begin with "-"
            *([] if self.options.warm else ["--warm-seconds", "0"]),
        ]
        return ProcessSpec(f"site-{site_dir.name}", command, env)

    def site_env(self, hub: HubSide) -> dict[str, str]:
        # four sites share this machine's cores: one torch thread per task process
        env = {**hub.base_env(), "FLIP_HOME": str(self.federation.home), "FLIP_TASK_THREADS": "1"}
        if why := isolation.probe():  # a local development federation still runs; a real site refuses instead
            env.update({isolation.ENV_ALLOW_SANDBOX: "allow", isolation.ENV_ALLOW_FILES: "allow"})
            print(f"WARNING: task code at the local sites is not isolated from this machine ({why})", file=sys.stderr)
        return env

    def dead(self) -> list[str]:
        return [p["name"] for p in self.processes if not alive(p["pid"])]

    def wait(self, what: str, ready: Callable[[], object], failure: str = "") -> None:
        """Wait until ``ready()`` holds; stop everything with the processes' log tails if one dies or time runs out."""
        if wait_until(lambda: bool(self.dead()) or ready(), READY_SECONDS, 0.1) and not self.dead():
            return
        why = f"{failure or what + ' did not start'} ({', '.join(self.dead()) or 'no answer'}"
        why += " stopped)" if failure and self.dead() else ")"
        tails = "\n".join(f"--- {p['name']} ({p['log']}):\n{tail(p['log'])}" for p in self.processes)
        down(self.federation.home)
        raise FederationError(f"{why}\n{tails}")

    def write_connection(self, hub: HubSide, token: str) -> dict[str, Any]:
        o = self.options
        connection: dict[str, Any] = {
            "coordinator_url": hub.coordinator_url,
            "token": token,
            "researcher": getpass.getuser(),
            "project": o.project,
            "superlink": hub.fleet,
            "site_token": hub.config.site_token,
            "secure": o.secure,
            "ca": str(hub.pki / "ca.pem") if hub.pki is not None else None,
            "federation": str(self.root),
            "started_seconds": round(time.monotonic() - self.started, 2),
        }
        if o.hub is not None:
            connection["hub"] = o.hub.summary()
        write_connection(connection, self.federation.home)
        return connection


def _flip_part(env: dict[str, str]) -> dict[str, str]:
    """What FLIP set on top of this process's environment."""
    return {k: v for k, v in env.items() if os.environ.get(k) != v}


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).ok
    except requests.RequestException:
        return False


def _sites_online(url: str, token: str, names: list[str]) -> bool:
    try:
        response = requests.get(f"{url}/api/sites", headers={"Authorization": f"Bearer {token}"}, timeout=2)
        response.raise_for_status()
    except requests.RequestException:
        return False
    online = {s["site"] for s in response.json() if s["status"] == "online" and s["node_id"] is not None}
    return set(names) <= online


def restart(name: str, home: Path | None = None) -> int:
    """Kill one process of the local federation (SIGKILL) and start it again as it was; its new pid."""
    federation = Federation(home or flip_home())
    state = federation.state()
    if state is None:
        raise FederationError("no local federation is running")
    proc = next((p for p in state["processes"] if p["name"] == name), None)
    if proc is None:
        names = ", ".join(p["name"] for p in state["processes"])
        raise FederationError(f"no process {name!r} in the local federation (it has: {names})")
    if alive(proc["pid"]):
        os.killpg(proc["pid"], signal.SIGKILL)
        wait_until(lambda: not alive(proc["pid"]), 10, 0.05)
    respawned = spawn(ProcessSpec(name, proc["command"], {**os.environ, **proc["env"]}), Path(proc["log"]).parent)
    proc.update(pid=respawned["pid"])
    federation.write_state(state["processes"])
    return int(respawned["pid"])


def down(home: Path | None = None, timeout: float = 15.0) -> list[str]:
    """Stop every process of the local federation (sites first); return their names."""
    federation = Federation(home or flip_home())
    state = federation.state()
    if state is None:
        return []
    stopped = stop(state["processes"], timeout)
    federation.state_file.unlink(missing_ok=True)
    connection = read_connection(federation.home)
    if connection and connection.get("federation") == str(federation.root):
        connection_path(federation.home).unlink(missing_ok=True)
    return stopped


def status(home: Path | None = None) -> dict[str, Any]:
    """What is running, as ``flip status --json`` prints it."""
    federation = Federation(home or flip_home())
    connection = read_connection(federation.home) or {}
    state = federation.state() or {"processes": []}
    out: dict[str, Any] = {
        "running": federation.running(),
        "coordinator_url": connection.get("coordinator_url"),
        "superlink": connection.get("superlink"),
        "processes": [
            {"name": p["name"], "pid": p["pid"], "alive": alive(p["pid"]), "log": p["log"]} for p in state["processes"]
        ],
        "sites": [],
    }
    if connection:
        try:
            response = requests.get(
                f"{connection['coordinator_url']}/api/sites",
                headers={"Authorization": f"Bearer {connection['token']}"},
                timeout=3,
            )
            response.raise_for_status()
            out["sites"] = response.json()
        except requests.RequestException as exc:
            out["error"] = f"the coordinator at {connection['coordinator_url']} did not answer ({type(exc).__name__})"
    return out
