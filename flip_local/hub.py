"""``flip hub``: a local JupyterHub (``hub_config``'s local profile) in front of the local federation.

The hub starts the coordinator as its managed service (and restarts it if it dies); users log in
with a development password, and hub groups ``project-<name>`` are FLIP projects.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import requests

from coordinator.hubside import ProcessSpec, bin_path
from flip_core.paths import data_dir
from flip_core.util import free_port

HUB_PROJECT = "heart"  # the demo's project, hub group project-heart


@dataclass(frozen=True)
class HubOptions:
    """``users`` and ``groups`` (hub groups and their members; ``project-<name>`` is FLIP project ``name``);
    ``password``: the development login's shared password; ``notebooks``: copied into each user's home;
    ``port``: the hub's (0: a free one)."""

    users: tuple[str, ...] = ("alice", "bob")
    groups: tuple[tuple[str, tuple[str, ...]], ...] = (("project-" + HUB_PROJECT, ("alice",)),)
    password: str = ""
    notebooks: Path | None = None
    port: int = 0

    def chosen(self) -> HubOptions:
        """These options with the port and password chosen now, once."""
        return dataclasses.replace(
            self, port=self.port or free_port(), password=self.password or secrets.token_urlsafe(12)
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def summary(self) -> dict[str, object]:
        """What the connection file says of the hub."""
        return {
            "url": self.url,
            "users": list(self.users),
            "groups": {g: list(m) for g, m in self.groups},
            "password": self.password,
        }


def launch(
    root: Path,
    hub: HubOptions,
    coordinator: ProcessSpec,
    coordinator_url: str,
    coordinator_env: dict[str, str],
    base_env: dict[str, str],
) -> ProcessSpec:
    """Write the local hub's settings (``hub_config.profiles.local`` reads them) and say how it starts:
    its command line, with the environment that chooses the profile and points at them."""
    import hub_config

    state = root / "hub"
    state.mkdir(parents=True)
    settings = {
        "state": str(state),
        "port": hub.port,
        "hub_port": free_port(),
        "proxy_api_port": free_port(),
        "coordinator": {"url": coordinator_url, "command": coordinator.command, "environment": coordinator_env},
        "users": list(hub.users),
        "groups": {group: list(members) for group, members in hub.groups},
        "password": hub.password,
        "notebooks": str(hub.notebooks) if hub.notebooks else None,
        # the quickstart compares with FLamby's published results, kept with the data
        "environment": {"FLIP_DATA_DIR": str(data_dir())},
    }
    path = state / "settings.json"
    path.write_text(json.dumps(settings, indent=2))
    path.chmod(0o600)
    config = Path(hub_config.__file__).parent / "jupyterhub_config.py"
    return ProcessSpec(
        "jupyterhub",
        [bin_path("jupyterhub"), "-f", str(config)],
        {**base_env, "FLIP_HUB_PROFILE": "local", "FLIP_HUB_SETTINGS": str(path)},
    )


def answers(url: str) -> bool:
    """The hub's API answers at ``url``."""
    try:
        return requests.get(f"{url}/hub/api", timeout=1).ok
    except requests.RequestException:
        return False
