"""The hub's configuration: one function per profile, chosen by ``$FLIP_HUB_PROFILE``.

*local* (``flip hub``, the tests): everything on 127.0.0.1, free ports, a local-process spawner
with a home per user under the hub's state folder, the coordinator started and watched by the hub
(a managed service), and a development login (a shared password) for users and groups given in
``$FLIP_HUB_SETTINGS`` (a JSON file ``flip hub`` writes).

*production* (``deploy/compose.hub.yml``): TLS on the hub's address, DockerSpawner with FLIP's
single-user image on the hub's docker network and a volume per user, an OpenID Connect login whose
group claim becomes hub groups, the idle culler, and the coordinator as an external service (its
own container, beside the SuperLink). Settings come from the environment (``deploy/hub.env``).

Both: researchers belong to FLIP project ``X`` by being in hub group ``project-X``. Every user's
server token may call the coordinator service (``access:services!service=coordinator``); the
coordinator decides project by project from the groups. The coordinator's own hub role reads users'
groups and lists groups, nothing more.

This package imports only the standard library and JupyterHub: the hub's image holds no FLIP.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PROFILE_ENV = "FLIP_HUB_PROFILE"
SETTINGS_ENV = "FLIP_HUB_SETTINGS"
SERVICE = "coordinator"
GROUP_PREFIX = "project-"
API_URL_ENV = "FLIP_API_URL"  # what a user's kernels call (flip_magics.client reads it)

COORDINATOR_SCOPES = ["read:users:groups", "list:groups"]
SERVER_TOKEN_SCOPES = ["access:servers!server", "users:activity!user", f"access:services!service={SERVICE}"]
LAB_OFFLINE = ["--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
CULLER_SCOPES = ["list:users", "read:users:activity", "read:servers", "delete:servers"]


class HubConfigError(Exception):
    """A setting the profile needs is missing or wrong; the message names it."""


def configure(c: Any, env: Mapping[str, str] = os.environ) -> str:
    """Fill JupyterHub's config object ``c`` for the profile ``env`` chooses; returns the profile."""
    profile = env.get(PROFILE_ENV, "local")
    if profile == "local":
        path = env.get(SETTINGS_ENV)
        if not path:
            raise HubConfigError(f"the local profile reads its settings from ${SETTINGS_ENV} (`flip hub` writes it)")
        local(c, json.loads(Path(path).read_text()))
    elif profile == "production":
        production(c, env)
    else:
        raise HubConfigError(f"${PROFILE_ENV} is {profile!r}: it must be 'local' or 'production'")
    return profile


def _common(c: Any, coordinator_url: str) -> None:
    c.JupyterHub.load_roles = [
        {
            "name": "user",
            "description": "every hub user: their own things, and the FLIP coordinator's API",
            "scopes": ["self", f"access:services!service={SERVICE}"],
        },
        {
            "name": "flip-coordinator",
            "description": "the FLIP coordinator: which projects (groups) a user is in",
            "scopes": COORDINATOR_SCOPES,
            "services": [SERVICE],
        },
    ]
    # the user's server token ($JUPYTERHUB_API_TOKEN, which kernels inherit) may call the coordinator
    c.Spawner.server_token_scopes = SERVER_TOKEN_SCOPES
    c.Spawner.environment = {API_URL_ENV: coordinator_url}
    c.Spawner.default_url = "/lab"
    # JupyterLab calls out to the internet for news and new versions: not from a hospital's hub
    c.Spawner.args.extend(LAB_OFFLINE)


def local(c: Any, s: Mapping[str, Any]) -> None:
    """The development and test hub, on loopback. ``s``: state, port, hub_port, proxy_api_port,
    coordinator {url, command, environment}, users, groups, password, notebooks, environment."""
    state = Path(s["state"])
    bindir = Path(sys.executable).parent
    c.JupyterHub.ip = "127.0.0.1"
    c.JupyterHub.port = int(s["port"])
    c.JupyterHub.hub_ip = "127.0.0.1"
    c.JupyterHub.hub_port = int(s["hub_port"])
    c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{int(s['proxy_api_port'])}"
    c.ConfigurableHTTPProxy.command = [str(bindir / "configurable-http-proxy")]
    c.JupyterHub.db_url = f"sqlite:///{state / 'jupyterhub.sqlite'}"
    c.JupyterHub.cookie_secret_file = str(state / "jupyterhub_cookie_secret")
    c.JupyterHub.pid_file = str(state / "jupyterhub.pid")

    c.JupyterHub.spawner_class = "simple"  # SimpleLocalProcessSpawner: no system users needed
    c.SimpleLocalProcessSpawner.home_dir_template = str(state / "home" / "{username}")
    c.Spawner.cmd = [str(bindir / "jupyterhub-singleuser")]
    c.Spawner.args = ["--allow-root"] if os.geteuid() == 0 else []  # as root it refuses to start without it
    c.Spawner.ip = "127.0.0.1"
    c.Spawner.start_timeout = 120
    c.Spawner.http_timeout = 120
    _common(c, s["coordinator"]["url"])
    c.Spawner.environment.update(s.get("environment", {}))
    notebooks = s.get("notebooks")
    if notebooks:
        c.Spawner.pre_spawn_hook = _copy_notebooks(Path(notebooks))

    c.JupyterHub.authenticator_class = "dummy"  # one shared development password: never on a real hub
    c.DummyAuthenticator.password = s["password"]
    c.Authenticator.allowed_users = set(s["users"])
    c.Authenticator.admin_users = set(s.get("admins", []))
    c.JupyterHub.load_groups = {group: {"users": list(members)} for group, members in s["groups"].items()}

    coordinator = s["coordinator"]
    c.JupyterHub.services = [
        {
            "name": SERVICE,
            "url": coordinator["url"],
            "command": list(coordinator["command"]),
            "environment": dict(coordinator.get("environment", {})),
            "oauth_no_confirm": True,
        }
    ]


def _copy_notebooks(source: Path) -> Any:
    def hook(spawner: Any) -> None:
        """The example notebooks in the user's home (never over their own edits)."""
        home = Path(spawner.home_dir_template.format(username=spawner.user.name))
        home.mkdir(parents=True, exist_ok=True)
        for notebook in sorted(source.glob("*.ipynb")):
            if not (home / notebook.name).exists():
                shutil.copy2(notebook, home / notebook.name)

    return hook


def _need(env: Mapping[str, str], name: str, why: str) -> str:
    value = env.get(name, "")
    if not value:
        raise HubConfigError(f"${name} is not set: {why} (see deploy/hub.env.example)")
    return value


def production(c: Any, env: Mapping[str, str]) -> None:
    """The consortium's hub in containers (``deploy/compose.hub.yml``)."""
    c.JupyterHub.ip = "0.0.0.0"
    c.JupyterHub.port = int(env.get("FLIP_HUB_PORT", "8443"))
    c.JupyterHub.ssl_cert = _need(env, "FLIP_HUB_TLS_CERT", "the hub's TLS certificate (PEM)")
    c.JupyterHub.ssl_key = _need(env, "FLIP_HUB_TLS_KEY", "the hub's TLS key (PEM)")
    c.JupyterHub.hub_ip = "0.0.0.0"  # the hub's API, for the users' containers on the docker network
    c.JupyterHub.hub_connect_ip = env.get("FLIP_HUB_CONNECT_HOST", "jupyterhub")
    c.JupyterHub.db_url = "sqlite:////srv/jupyterhub/jupyterhub.sqlite"
    c.JupyterHub.cookie_secret_file = "/srv/jupyterhub/jupyterhub_cookie_secret"
    c.JupyterHub.cleanup_servers = False  # users' containers outlive a hub restart

    c.JupyterHub.spawner_class = "dockerspawner.DockerSpawner"
    c.DockerSpawner.image = _need(env, "FLIP_SINGLEUSER_IMAGE", "the single-user image (deploy/singleuser.Dockerfile)")
    c.DockerSpawner.network_name = env.get("FLIP_DOCKER_NETWORK", "flip-hub")
    c.DockerSpawner.use_internal_ip = True
    c.DockerSpawner.notebook_dir = "/home/jovyan/work"
    c.DockerSpawner.volumes = {"flip-user-{username}": "/home/jovyan/work"}
    c.DockerSpawner.remove = True  # the container goes; the user's volume stays
    c.DockerSpawner.post_start_cmd = "cp -rn /srv/flip/notebooks/. /home/jovyan/work/"
    c.DockerSpawner.mem_limit = env.get("FLIP_SINGLEUSER_MEM", "8G")
    _common(c, _need(env, "FLIP_COORDINATOR_SERVICE_URL", "where users' kernels reach the coordinator"))

    # OpenID Connect (an NHS trust's Entra ID tenant, Keycloak, ...): its group claim gives hub groups
    c.JupyterHub.authenticator_class = "generic-oauth"
    c.GenericOAuthenticator.authorize_url = _need(env, "FLIP_OIDC_AUTHORIZE_URL", "the identity provider's login")
    c.GenericOAuthenticator.token_url = _need(env, "FLIP_OIDC_TOKEN_URL", "the identity provider's token endpoint")
    if env.get("FLIP_OIDC_USERDATA_FROM_ID_TOKEN", "") in ("1", "true", "yes"):
        # Microsoft Entra ID puts groups in the ID token, not in its userinfo answer
        c.GenericOAuthenticator.userdata_from_id_token = True
    else:
        c.GenericOAuthenticator.userdata_url = _need(env, "FLIP_OIDC_USERDATA_URL", "the identity provider's userinfo")
    c.GenericOAuthenticator.scope = ["openid", "profile", "email"]
    c.GenericOAuthenticator.username_claim = env.get("FLIP_OIDC_USERNAME_CLAIM", "preferred_username")
    c.GenericOAuthenticator.manage_groups = True
    c.GenericOAuthenticator.auth_state_groups_key = "oauth_user." + env.get("FLIP_OIDC_GROUPS_CLAIM", "groups")
    allowed = [g for g in env.get("FLIP_HUB_ALLOWED_GROUPS", "").replace(",", " ").split() if g]
    if not allowed:
        raise HubConfigError(
            "$FLIP_HUB_ALLOWED_GROUPS is not set: the identity provider's groups whose members may "
            "log in (e.g. project-heart project-breast)"
        )
    c.GenericOAuthenticator.allowed_groups = set(allowed)
    c.GenericOAuthenticator.admin_groups = {g for g in [env.get("FLIP_HUB_ADMIN_GROUP", "")] if g}

    c.JupyterHub.services = [
        {
            "name": SERVICE,
            "url": env["FLIP_COORDINATOR_SERVICE_URL"],
            "oauth_no_confirm": True,
            "api_token": _need(env, "FLIP_COORDINATOR_HUB_TOKEN", "the coordinator's hub token (shared with it)"),
        },
        {
            "name": "idle-culler",
            "command": [
                sys.executable,
                "-m",
                "jupyterhub_idle_culler",
                f"--timeout={int(env.get('FLIP_IDLE_TIMEOUT', '3600'))}",
            ],
        },
    ]
    c.JupyterHub.load_roles.append({"name": "idle-culler", "scopes": CULLER_SCOPES, "services": ["idle-culler"]})
