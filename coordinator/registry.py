"""The hub's register of sites: which site may speak as which name, and which Flower node it is.

``flip site register NAME KEY.pub`` (the hub operator) registers the site's public key with the
SuperLink (only registered keys may join the fleet) and records here the node id the SuperLink
gave it and a fresh token for the site's calls to the coordinator (``/site/...``); the token is
shown once and only its hash is kept. The coordinator reads this file again whenever it changes,
so registering a site needs no restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flip_core.errors import ConfigError

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


class RegistryError(ConfigError):
    """A site cannot be registered; the message says why."""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class RegisteredSite:
    name: str
    node_id: int
    key_fingerprint: str


class SiteRegistry:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._sites: dict[str, dict[str, Any]] = {}

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._sites = None, {}
            return self._sites
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._sites, self._stamp = json.loads(self.path.read_text())["sites"], stamp
        return self._sites

    def sites(self) -> list[RegisteredSite]:
        return [
            RegisteredSite(name, int(s["node_id"]), s["key_fingerprint"]) for name, s in sorted(self._load().items())
        ]

    def register(self, name: str, node_id: int, key_fingerprint: str, *, replace: bool = False) -> str:
        """Record ``name`` as Flower node ``node_id``; the site's new coordinator token (shown once)."""
        if not SITE_NAME.fullmatch(name):
            raise RegistryError(f"{name!r} is not a site name (letters, digits, '.', '_', '-'; at most 64)")
        sites = dict(self._load())
        if name in sites and not replace:
            raise RegistryError(
                f"site {name!r} is already registered (node {sites[name]['node_id']}); "
                "--replace gives it a new key and token"
            )
        token = secrets.token_urlsafe(32)
        sites[name] = {"node_id": int(node_id), "key_fingerprint": key_fingerprint, "token_sha256": _digest(token)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"sites": sites}, indent=2))
        tmp.chmod(0o600)
        tmp.replace(self.path)
        return token

    def identify(self, token: str) -> RegisteredSite | None:
        """The site whose token this is, or None."""
        if not token:
            return None
        digest = _digest(token)
        for name, site in self._load().items():
            if hmac.compare_digest(digest, site["token_sha256"]):
                return RegisteredSite(name, int(site["node_id"]), site["key_fingerprint"])
        return None
