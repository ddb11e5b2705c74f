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

import dataclasses
import getpass
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from coordinator.config import CoordinatorConfig, TokenGrant
from coordinator.data_fetch import data_dir
from coordinator.flower_control import FlowerControl
from coordinator.registry import RegistryError, SiteRegistry
from coordinator.serverapp_zygote import ENV_SOCKET as ZYGOTE_SOCKET_ENV
from coordinator.serverapp_zygote import write_launcher
from coordinator.local import (
    connection_path, flip_home, flower_env, free_port, read_connection, wait_until, write_connection,
)
from site_agent import isolation
from site_agent.catalog import add_dataset, init_site, write_policy
from site_agent.certs import (
    SITE_KEYS, fingerprint, make_ca, make_server_cert, make_site_keys, public_key_bytes,
)
from site_agent.policy import DEFAULT_THRESHOLD

HEART_SITES = {
    "Cleveland": "processed.cleveland.data",
    "Hungary": "processed.hungarian.data",
    "Switzerland": "processed.switzerland.data",
    "VA": "processed.va.data",
}
# FLamby's Fed-Heart-Disease split: 66 % train, seed 43, stratified on the label.
HEART_SPLIT = {"train_fraction": 0.66, "split_seed": 43}
DEFAULT_PROJECT = "default"
READY_SECONDS = 90.0
HUB_PROJECT = "heart"  # `flip hub`: the demo's project, hub group project-heart


@dataclass(frozen=True)
class HubOptions:
    """``flip hub``: a local JupyterHub (hub_config's local profile) that starts and watches the coordinator.

    ``groups``: hub groups and their members (``project-<name>`` is FLIP project ``name``); ``password``:
    the development login's shared password; ``notebooks``: copied into each user's home."""

    users: tuple[str, ...] = ("alice", "bob")
    groups: tuple[tuple[str, tuple[str, ...]], ...] = (("project-" + HUB_PROJECT, ("alice",)),)
    password: str = ""
    notebooks: Path | None = None
    port: int = 0


class FederationError(Exception):
    """The local federation could not be started or reached; the message says why."""


@dataclass(frozen=True)
class Federation:
    home: Path

    @property
    def root(self) -> Path:
        return self.home / "federation"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    def state(self) -> dict[str, Any] | None:
        if not self.state_file.exists():
            return None
        return json.loads(self.state_file.read_text())  # type: ignore[no-any-return]

    def running(self) -> bool:
        state = self.state()
        return bool(state) and any(_alive(p["pid"]) for p in state["processes"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie counts as dead
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _spawn(name: str, command: list[str], logs: Path, env: dict[str, str]) -> dict[str, Any]:
    log_path = logs / f"{name}.log"
    with open(log_path, "ab") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )
    # what FLIP set on top of the caller's environment, so that `restart` can start it again as it was
    flip_env = {k: v for k, v in env.items() if os.environ.get(k) != v}
    return {"name": name, "pid": process.pid, "log": str(log_path), "command": command, "env": flip_env}


def _write_state(federation: Federation, state: dict[str, Any]) -> None:
    """The federation's processes (their environment holds tokens: owner-only)."""
    tmp = federation.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.chmod(0o600)
    tmp.replace(federation.state_file)


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _sites_online(url: str, token: str, names: list[str]) -> bool:
    try:
        response = requests.get(f"{url}/api/sites", headers={"Authorization": f"Bearer {token}"}, timeout=2)
        response.raise_for_status()
    except requests.RequestException:
        return False
    online = {s["site"] for s in response.json() if s["status"] == "online" and s["node_id"] is not None}
    return set(names) <= online


def heart_site_names(count: int = len(HEART_SITES)) -> list[str]:
    """The four hospitals, then numbered copies of them (``Cleveland-2`` …) for scale tests."""
    hospitals = list(HEART_SITES)
    return [hospitals[i % len(hospitals)] + (f"-{i // len(hospitals) + 1}" if i >= len(hospitals) else "")
            for i in range(count)]


def local_policy(auto_approve: bool = True, project: str = DEFAULT_PROJECT) -> dict[str, Any]:
    """The local federation's site policy: ``project`` approved for anyone on any dataset,
    the disclosure threshold at its default, and code auto-approved (development) unless
    ``auto_approve`` is False, when each site's admin must approve it (`flip-site approve`)."""
    return {"policy": {"disclosure_threshold": DEFAULT_THRESHOLD},
            "projects": {project: {"approved": True, "researchers": ["*"], "datasets": ["*"],
                                   "auto_approve": auto_approve}}}


def prepare_heart_sites(root: Path, source: Path | None = None, count: int = len(HEART_SITES), *,
                        auto_approve: bool = True, policy: dict[str, Any] | None = None,
                        project: str = DEFAULT_PROJECT) -> list[Path]:
    """One site directory per hospital, each holding only its own file as ``heart-disease``,
    under the local federation's policy (:func:`local_policy`) or ``policy`` (site.toml's tables).

    With ``count`` above four, further sites hold copies of the hospitals' files in turn
    (a machine-local scale test, not a real federation)."""
    source = source or data_dir() / "heart-disease"
    missing = [f for f in HEART_SITES.values() if not (source / f).is_file()]
    if missing:
        raise FederationError(
            f"the heart-disease files are not in {source} (missing {', '.join(missing)}); "
            "set FLIP_DATA_DIR or run `flip data fetch heart-disease`"
        )
    dirs = []
    for name in heart_site_names(count):
        filename = HEART_SITES[name.split("-")[0]]
        site_dir = root / "sites" / name
        if site_dir.exists():
            shutil.rmtree(site_dir)
        site = init_site(site_dir, name)
        site = add_dataset(site, "heart-disease", source / filename, "uci-heart", **HEART_SPLIT)
        write_policy(site, policy or local_policy(auto_approve, project))
        dirs.append(site_dir)
    return dirs


def up(home: Path | None = None, *, data: Path | None = None, sites: int = len(HEART_SITES),
       warm: bool = True, auto_approve: bool = True, policy: dict[str, Any] | None = None,
       secure: bool = True, listen: str = "127.0.0.1", hub_names: tuple[str, ...] = (),
       hub: HubOptions | None = None) -> dict[str, Any]:
    """Start the local federation (``sites`` site agents) and return the connection it wrote.

    ``hub``: a local JupyterHub too (``flip hub``), which starts the coordinator as its service; the
    sites' project is then ``heart`` (hub group ``project-heart``), else ``default``.

    ``auto_approve``: the sites run any code of project ``default`` (development); without it
    each task waits until the site's admin approves its code (``flip-site approve``). ``policy``
    replaces the sites' whole policy (the ``policy`` and ``projects`` tables of site.toml).

    ``listen``: the address the fleet front binds (all sites reach the hub there; ``0.0.0.0`` for sites
    on other hosts), and ``hub_names`` the names or addresses they use for it (in its certificate).
    The SuperLink and the coordinator always listen on the hub's loopback only.

    ``warm``: each site keeps a spare task process (torch loaded) so that a run starts at once;
    without it a site costs only its agent's memory and a run first starts its task processes.
    """
    federation = Federation(home or flip_home())
    if federation.running():
        raise FederationError(f"a local federation is already running under {federation.root}; `flip down` first")
    processes: list[dict[str, Any]] = []  # what has been started, so far
    try:
        return _up(federation, processes, data=data, sites=sites, warm=warm, auto_approve=auto_approve,
                   policy=policy, secure=secure, listen=listen, hub_names=hub_names, hub=hub)
    except BaseException:  # whatever stopped it (an error, Ctrl-C), nothing it started is left running
        if processes:
            _write_state(federation, {"root": str(federation.root), "processes": processes})
            down(federation.home)
        raise


def _up(federation: Federation, processes: list[dict[str, Any]], *, data: Path | None, sites: int, warm: bool,
        auto_approve: bool, policy: dict[str, Any] | None, secure: bool, listen: str, hub_names: tuple[str, ...],
        hub: HubOptions | None) -> dict[str, Any]:
    root = federation.root
    if root.exists():
        shutil.rmtree(root)
    logs = root / "logs"
    logs.mkdir(parents=True)
    started = time.monotonic()
    project = HUB_PROJECT if hub else DEFAULT_PROJECT
    if hub is not None:  # this hub's port and development password, chosen now
        hub = dataclasses.replace(hub, port=hub.port or free_port(), password=hub.password or secrets.token_urlsafe(12))
    site_dirs = prepare_heart_sites(root, data, sites, auto_approve=auto_approve, policy=policy, project=project)

    superlink_port, coordinator_port, front_port = free_port(), free_port(), free_port()
    superlink = f"127.0.0.1:{superlink_port}"  # the hub's own: SuperLink control, runtime and fleet APIs
    fleet = f"127.0.0.1:{front_port}" if secure else superlink  # what the sites reach
    coordinator_url = f"http://127.0.0.1:{coordinator_port}"
    pki = root / "pki"
    if secure:
        ca = make_ca(pki).cert
        server = make_server_cert(pki, "superlink", ["127.0.0.1", "localhost", *hub_names])
        tls = ["--ssl-certfile", str(server.cert), "--ssl-keyfile", str(server.key), "--ssl-ca-certfile", str(ca),
               "--enable-supernode-auth"]
    else:
        print("WARNING: flip up --insecure: the SuperLink and the coordinator speak plain HTTP and take any node; "
              "for debugging only", file=sys.stderr)
        tls = ["--insecure"]
    token, researcher = secrets.token_urlsafe(24), getpass.getuser()
    config = CoordinatorConfig(
        state_dir=root / "coordinator", host="127.0.0.1", port=coordinator_port, superlink_control=superlink,
        internal_token=secrets.token_urlsafe(24), site_token="" if secure else secrets.token_urlsafe(24),
        tokens={token: TokenGrant(researcher=researcher, project=project)},
        superlink_ca=str(pki / "ca.pem") if secure else None,
    )
    config.state_dir.mkdir(parents=True)
    config.dump(root / "coordinator.json")
    base_env = flower_env(root / "flwr")
    hub_env = {**base_env, "FLIP_COORDINATOR_URL": coordinator_url, "FLIP_INTERNAL_TOKEN": config.internal_token}

    # FLIP_SUPERLINK_LOG_LEVEL=DEBUG makes the SuperLink log every API call (the benchmarks count them).
    # Its SuperExec finds FLIP's flwr-serverapp launcher first on PATH: each run's ServerApp is forked
    # from the warm starter (coordinator/serverapp_zygote.py) instead of importing Flower afresh.
    launcher_dir = write_launcher(root / "bin").parent
    superlink_env = {**hub_env, "FLWR_LOG_LEVEL": os.environ.get("FLIP_SUPERLINK_LOG_LEVEL", "INFO"),
                     "PATH": str(launcher_dir) + os.pathsep + hub_env["PATH"],
                     ZYGOTE_SOCKET_ENV: str(root / "serverapp.sock")}
    processes.extend([
        _spawn("serverapp-zygote", [sys.executable, "-m", "coordinator.serverapp_zygote",
                                    "--socket", str(root / "serverapp.sock")], logs, superlink_env),
        _spawn("superlink", [_bin("flower-superlink"), *tls, "--host", "127.0.0.1",
                             "--port", str(superlink_port), "--disable-runtime-dependency-installation",
                             "--database", ":flwr-in-memory:"], logs, superlink_env),
    ])
    coordinator_command = [sys.executable, "-m", "coordinator", "--config", str(root / "coordinator.json")]
    if hub is None:
        processes.append(_spawn("coordinator", coordinator_command, logs, hub_env))
    else:  # the hub starts the coordinator (a managed service) and restarts it if it dies
        hub_command, hub_settings = _hub_launch(root, hub, coordinator_url, coordinator_command,
                                                {k: v for k, v in hub_env.items() if os.environ.get(k) != v})
        processes.append(_spawn("jupyterhub", hub_command, logs, {**base_env, **hub_settings}))
    if secure:
        processes.append(_spawn("fleet-front", [
            sys.executable, "-m", "coordinator.fleet_front", "--host", listen, "--port", str(front_port),
            "--superlink", f"https://{superlink}", "--superlink-ca", str(pki / "ca.pem"),
            "--coordinator", coordinator_url, "--certfile", str(pki / "superlink.pem"),
            "--keyfile", str(pki / "superlink.key")], logs, base_env))
    state = {"root": str(root), "processes": processes}
    _write_state(federation, state)

    def fail(why: str) -> FederationError:
        tails = "\n".join(f"--- {p['name']} ({p['log']}):\n{_tail(p['log'])}" for p in processes)
        down(federation.home)
        return FederationError(f"{why}\n{tails}")

    def dead() -> list[str]:
        return [p["name"] for p in processes if not _alive(p["pid"])]

    def coordinator_up() -> bool:
        if dead():
            return True
        try:
            return requests.get(f"{coordinator_url}/api/health", timeout=1).ok
        except requests.RequestException:
            return False

    if not wait_until(coordinator_up, READY_SECONDS, 0.1) or dead():
        raise fail(f"the coordinator did not start ({', '.join(dead()) or 'no answer'})")
    # four sites share this machine's cores: one torch thread per task process
    site_env = {**base_env, "FLIP_HOME": str(federation.home), "FLIP_TASK_THREADS": "1"}
    if why := isolation.probe():  # a local development federation still runs; a real site refuses instead
        site_env.update({isolation.ENV_ALLOW_NETWORK: "allow", isolation.ENV_ALLOW_FILES: "allow"})
        print(f"WARNING: task code at the local sites is not isolated from this machine ({why})", file=sys.stderr)
    if secure:
        control = FlowerControl(superlink, pki / "ca.pem")
        if not wait_until(lambda: bool(dead()) or control.ready(), READY_SECONDS, 0.1) or dead():
            raise fail(f"the SuperLink did not start ({', '.join(dead()) or 'no answer'})")
    for site_dir in site_dirs:
        if secure:  # as a real site joins: its own key pair, registered by the hub, and its own token
            keys = make_site_keys(site_dir / SITE_KEYS, site_dir.name)
            site_token = _register(control, SiteRegistry(config.registry_path), site_dir.name, keys.public)
            credentials = ["--ca", str(pki / "ca.pem"), "--coordinator", f"https://{fleet}"]
        else:
            site_token, credentials = config.site_token, ["--insecure", "--coordinator", coordinator_url]
        processes.append(_spawn(
            f"site-{site_dir.name}",
            [_bin("flip-site"), "start", str(site_dir), "--superlink", fleet, *credentials,
             f"--token={site_token}",  # a token may begin with "-"
             *([] if warm else ["--warm-seconds", "0"])],
            logs, site_env,
        ))
    if secure:
        control.close()  # an open connection would hold up the SuperLink's shutdown
    _write_state(federation, state)
    ready = lambda: bool(dead()) or _sites_online(coordinator_url, token, heart_site_names(sites))  # noqa: E731
    if not wait_until(ready, READY_SECONDS, 0.1) or dead():
        raise fail(f"not every site came online ({', '.join(dead()) or 'timed out'} stopped)")
    hub_url = f"http://127.0.0.1:{hub.port}" if hub is not None else ""
    if hub is not None and (not wait_until(lambda: bool(dead()) or _hub_up(hub_url), READY_SECONDS, 0.1) or dead()):
        raise fail(f"JupyterHub did not start ({', '.join(dead()) or 'no answer'})")
    connection = {
        "coordinator_url": coordinator_url, "token": token, "researcher": researcher,
        "project": project, "superlink": fleet, "site_token": config.site_token,
        "secure": secure, "ca": str(pki / "ca.pem") if secure else None,
        "federation": str(root), "started_seconds": round(time.monotonic() - started, 2),
    }
    if hub is not None:
        connection["hub"] = {"url": hub_url, "users": list(hub.users), "groups": {g: list(m) for g, m in hub.groups},
                             "password": hub.password}
    write_connection(connection, federation.home)
    return connection


def _hub_launch(root: Path, hub: HubOptions, coordinator_url: str, coordinator_command: list[str],
                coordinator_env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Write the local hub's settings (hub_config.profiles.local reads them); its command line and the
    environment that chooses the profile and points at them."""
    import hub_config

    state = root / "hub"
    state.mkdir(parents=True)
    settings = {
        "state": str(state), "port": hub.port, "hub_port": free_port(), "proxy_api_port": free_port(),
        "coordinator": {"url": coordinator_url, "command": coordinator_command, "environment": coordinator_env},
        "users": list(hub.users), "groups": {group: list(members) for group, members in hub.groups},
        "password": hub.password,
        "notebooks": str(hub.notebooks) if hub.notebooks else None,
        # the quickstart compares with FLamby's published results, kept with the data
        "environment": {"FLIP_DATA_DIR": str(data_dir())},
    }
    path = state / "settings.json"
    path.write_text(json.dumps(settings, indent=2))
    path.chmod(0o600)
    config = Path(hub_config.__file__).parent / "jupyterhub_config.py"
    return [_bin("jupyterhub"), "-f", str(config)], {"FLIP_HUB_PROFILE": "local", "FLIP_HUB_SETTINGS": str(path)}


def _hub_up(url: str) -> bool:
    try:
        return requests.get(f"{url}/hub/api", timeout=1).ok
    except requests.RequestException:
        return False


def _register(control: FlowerControl, registry: SiteRegistry, name: str, public: Path,
              replace: bool = False) -> str:
    """Register a site's public key with the SuperLink and give it a coordinator token (returned)."""
    old = {s.name: s for s in registry.sites()}.get(name)
    if old is not None and not replace:
        raise RegistryError(f"site {name!r} is already registered (node {old.node_id}); "
                            "--replace gives it a new key and token")
    node_id = control.register_node(public_key_bytes(public), name)
    if old is not None:
        control.unregister_node(old.node_id)  # its old key no longer joins
    return registry.register(name, node_id, fingerprint(public), replace=replace)


def register_site(name: str, public: Path, config_path: Path | None = None, *,
                  replace: bool = False) -> tuple[int, str]:
    """``flip site register``: the site's Flower node id and its coordinator token."""
    path = config_path or Federation(flip_home()).root / "coordinator.json"
    if not path.exists():
        raise FederationError(f"no coordinator config at {path} (give --config)")
    config = CoordinatorConfig.load(path)
    if not config.superlink_ca:
        raise FederationError("this federation runs --insecure: its SuperLink takes any node, nothing to register")
    registry = SiteRegistry(config.registry_path)
    control = FlowerControl(config.superlink_control, Path(config.superlink_ca))
    try:
        if not control.ready():
            raise FederationError(f"the SuperLink's control API at {config.superlink_control} does not answer: "
                                  "is the hub side running (flip up, flip serve)?")
        token = _register(control, registry, name, public, replace)
    finally:
        control.close()
    return {s.name: s for s in registry.sites()}[name].node_id, token


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
    if _alive(proc["pid"]):
        os.killpg(proc["pid"], signal.SIGKILL)
        wait_until(lambda: not _alive(proc["pid"]), 10, 0.05)
    respawned = _spawn(name, proc["command"], Path(proc["log"]).parent, {**os.environ, **proc["env"]})
    proc.update(pid=respawned["pid"])
    _write_state(federation, state)
    return int(respawned["pid"])


def down(home: Path | None = None, timeout: float = 15.0) -> list[str]:
    """Stop every process of the local federation (sites first); return their names."""
    federation = Federation(home or flip_home())
    state = federation.state()
    if state is None:
        return []
    ordered = sorted(state["processes"], key=lambda p: (not p["name"].startswith("site-"), p["name"] == "superlink"))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in ordered:
            if _alive(proc["pid"]):
                try:
                    os.killpg(proc["pid"], sig)
                except ProcessLookupError:
                    pass
        if wait_until(lambda: not any(_alive(p["pid"]) for p in ordered), timeout, 0.1):
            break
    federation.state_file.unlink(missing_ok=True)
    path = connection_path(federation.home)
    connection = read_connection(federation.home)
    if connection and connection.get("federation") == str(federation.root):
        path.unlink(missing_ok=True)
    return [p["name"] for p in ordered]


def status(home: Path | None = None) -> dict[str, Any]:
    """What is running, as ``flip status --json`` prints it."""
    federation = Federation(home or flip_home())
    connection = read_connection(federation.home)
    state = federation.state() or {"processes": []}
    out: dict[str, Any] = {
        "running": federation.running(),
        "coordinator_url": (connection or {}).get("coordinator_url"),
        "superlink": (connection or {}).get("superlink"),
        "processes": [{"name": p["name"], "pid": p["pid"], "alive": _alive(p["pid"]), "log": p["log"]}
                      for p in state["processes"]],
        "sites": [],
    }
    if connection:
        try:
            response = requests.get(f"{connection['coordinator_url']}/api/sites",
                                    headers={"Authorization": f"Bearer {connection['token']}"}, timeout=3)
            response.raise_for_status()
            out["sites"] = response.json()
        except requests.RequestException as exc:
            out["error"] = f"the coordinator at {connection['coordinator_url']} did not answer ({type(exc).__name__})"
    return out
