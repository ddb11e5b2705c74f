"""Who a researcher is: a JupyterHub token checked with the hub, or a static headless token.

On a hub the coordinator is a hub service. A notebook's kernel sends its user's hub token
(``$JUPYTERHUB_API_TOKEN``, the single-user server's token); :class:`HubIdentity` asks the hub
who holds it (``HubAuth``) and refuses a token that may not use this service. The user's FLIP
projects are their hub groups ``project-<name>``, read with the coordinator's own service token
(its hub role grants ``read:users:groups`` and ``list:groups`` and nothing more). A static token
(``coordinator.json``) speaks for one researcher in one project: for papermill and scripts.

The project a request acts in is the one the client names (``X-FLIP-Project``), or the user's only
project; a user in none, or naming one they are not in, is refused with a sentence that names it.
"""

from __future__ import annotations

import hmac
import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from coordinator.config import CoordinatorConfig, TokenGrant
from flip_core.errors import Rejected

GROUP_PREFIX = "project-"
GROUP_CACHE_SECONDS = 10.0  # a change of hub group reaches the coordinator within this


class Refused(Rejected):
    """The caller is unknown (401) or may not act here (403); the message says why."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message, status)


@dataclass(frozen=True)
class Caller:
    """An identified researcher: their name, the projects they belong to, and how they were identified."""

    researcher: str
    projects: tuple[str, ...]
    via: str  # "hub" or "token"


def project_of(group: str) -> str | None:
    return group[len(GROUP_PREFIX) :] if group.startswith(GROUP_PREFIX) and len(group) > len(GROUP_PREFIX) else None


def choose_project(caller: Caller, wanted: str | None, hub_projects: list[str]) -> str:
    """The project this request acts in (pure: the refusals' wording lives here)."""
    if wanted:
        if wanted in caller.projects:
            return wanted
        if caller.via == "token":
            raise Refused(f"this token is for project {caller.projects[0]!r}, not {wanted!r}")
        raise Refused(
            f"{caller.researcher} is not a member of FLIP project {wanted!r} (hub group "
            f"{GROUP_PREFIX}{wanted}): the hub operator adds members to the group"
        )
    if len(caller.projects) == 1:
        return caller.projects[0]
    if not caller.projects:
        known = ", ".join(GROUP_PREFIX + p for p in hub_projects) or "none yet"
        raise Refused(
            f"{caller.researcher} is not in any FLIP project: a project's members are the hub group "
            f"{GROUP_PREFIX}<name> (on this hub: {known}); the hub operator adds members to a group"
        )
    raise Refused(
        f"{caller.researcher} is in projects {', '.join(caller.projects)}: choose one with "
        f"%flip_connect --project NAME",
        400,
    )


class HubIdentity:
    """Researchers by hub token (``jupyterhub.services.auth.HubAuth``) and hub groups."""

    def __init__(
        self, api_url: str, api_token: str, service_name: str = "coordinator", access_scopes: set[str] | None = None
    ) -> None:
        from jupyterhub.services.auth import HubAuth

        self.api_url = api_url.rstrip("/")
        self.service_name = service_name
        self.auth = HubAuth(api_url=self.api_url, api_token=api_token, cache_max_age=int(GROUP_CACHE_SECONDS))
        # a token may call this service only if the hub gave it access to it (JupyterHub's own rule)
        self.required = access_scopes or {"access:services", f"access:services!service={service_name}"}
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"token {api_token}"
        self._lock = threading.Lock()
        self._groups: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._projects: tuple[float, list[str]] | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> HubIdentity | None:
        """The hub's settings, as JupyterHub gives them to a service (None: not a hub service)."""
        url, token = env.get("JUPYTERHUB_API_URL"), env.get("JUPYTERHUB_API_TOKEN")
        if not url or not token:
            return None
        raw = env.get("JUPYTERHUB_OAUTH_ACCESS_SCOPES", "")  # a JSON list, as the hub sets it for a managed service
        scopes = set(json.loads(raw)) if raw.startswith("[") else set(raw.split())
        return cls(url, token, env.get("JUPYTERHUB_SERVICE_NAME", "coordinator"), scopes or None)

    def user(self, token: str) -> str | None:
        """The hub user holding ``token``, if it may call this service (blocking: call from a thread)."""
        from jupyterhub.services.auth import check_scopes

        model: dict[str, Any] | None = self.auth.user_for_token(token, sync=True)
        if not model or model.get("kind", "user") != "user":
            return None
        if not check_scopes(self.required, set(model.get("scopes", []))):
            return None
        return str(model["name"])

    def _get(self, path: str) -> Any:
        response = self.session.get(f"{self.api_url}{path}", timeout=10)
        response.raise_for_status()
        return response.json()

    def groups(self, user: str) -> tuple[str, ...]:
        now = time.monotonic()
        with self._lock:
            cached = self._groups.get(user)
        if cached and now - cached[0] < GROUP_CACHE_SECONDS:
            return cached[1]
        groups = tuple(sorted(self._get(f"/users/{quote(user, safe='')}").get("groups", [])))
        with self._lock:
            self._groups[user] = (now, groups)
        return groups

    def hub_projects(self) -> list[str]:
        """Every project this hub has a group for (named in refusals)."""
        now = time.monotonic()
        if self._projects and now - self._projects[0] < GROUP_CACHE_SECONDS:
            return self._projects[1]
        names = sorted(p for g in self._get("/groups") if (p := project_of(str(g["name"]))))
        self._projects = (now, names)
        return names

    def caller(self, token: str) -> Caller | None:
        name = self.user(token)
        if name is None:
            return None
        projects = tuple(p for g in self.groups(name) if (p := project_of(g)))
        return Caller(name, projects, "hub")


class HeadlessTokens:
    """The headless tokens of ``coordinator.json``, read again whenever the file changes
    (``flip token add`` / ``revoke`` take effect without a restart)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._grants: dict[str, TokenGrant] = {}

    def grants(self) -> dict[str, TokenGrant]:
        stat = self.path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._grants, self._stamp = CoordinatorConfig.load(self.path).tokens, stamp
        return self._grants


def static_caller(token: str, grants: Mapping[str, TokenGrant]) -> Caller | None:
    """The headless token's researcher, in its one project."""
    for known, grant in grants.items():
        if token and hmac.compare_digest(token, known):
            return Caller(grant.researcher, (grant.project,), "token")
    return None
