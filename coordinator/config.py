"""Coordinator configuration: one JSON file, read once in ``main()``."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

DEFAULT_MAX_MODEL_BYTES = 4 << 30


@dataclass(frozen=True)
class TokenGrant:
    """A static API token (headless use): who it speaks for and in which project."""

    researcher: str
    project: str


@dataclass(frozen=True)
class CoordinatorConfig:
    state_dir: Path
    host: str
    port: int
    superlink_control: str
    internal_token: str
    site_token: str  # "" when every site has its own token (coordinator.registry): no shared one
    tokens: dict[str, TokenGrant] = field(default_factory=dict)
    superlink_ca: str | None = None  # the consortium's CA certificate: the SuperLink speaks TLS
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES  # the largest model a notebook or the ServerApp may upload
    # what one researcher may upload as models in a day (None: twice the largest model): the hub's disk is shared
    upload_quota_bytes: int | None = None

    @property
    def upload_quota(self) -> int:
        return 2 * self.max_model_bytes if self.upload_quota_bytes is None else self.upload_quota_bytes

    @property
    def registry_path(self) -> Path:
        return self.state_dir / "sites.json"

    @classmethod
    def load(cls, path: Path) -> CoordinatorConfig:
        raw: dict[str, Any] = json.loads(Path(path).read_text())
        return cls(
            state_dir=Path(raw["state_dir"]),
            host=raw.get("host", "127.0.0.1"),
            port=int(raw["port"]),
            superlink_control=raw["superlink_control"],
            internal_token=raw["internal_token"],
            site_token=raw["site_token"],
            superlink_ca=raw.get("superlink_ca"),
            tokens={t: TokenGrant(**g) for t, g in raw.get("tokens", {}).items()},
            max_model_bytes=int(raw.get("max_model_bytes", DEFAULT_MAX_MODEL_BYTES)),
            upload_quota_bytes=None if raw.get("upload_quota_bytes") is None else int(raw["upload_quota_bytes"]),
        )

    def dump(self, path: Path) -> None:
        raw = {
            "state_dir": str(self.state_dir),
            "host": self.host,
            "port": self.port,
            "superlink_control": self.superlink_control,
            "internal_token": self.internal_token,
            "site_token": self.site_token,
            "superlink_ca": self.superlink_ca,
            "max_model_bytes": self.max_model_bytes,
            "upload_quota_bytes": self.upload_quota_bytes,
            "tokens": {t: {"researcher": g.researcher, "project": g.project} for t, g in self.tokens.items()},
        }
        tmp = path.with_suffix(".tmp")  # the running coordinator reads it again when it changes: never half-written
        tmp.unlink(missing_ok=True)
        with os.fdopen(
            os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w"
        ) as fh:  # owner-only from the start
            fh.write(json.dumps(raw, indent=2))
        tmp.replace(path)


def add_token(path: Path, researcher: str, project: str) -> str:
    """``flip token add``: a new headless token for ``researcher`` in ``project`` (returned; shown once)."""
    config = CoordinatorConfig.load(path)
    token = secrets.token_urlsafe(24)
    replace(config, tokens={**config.tokens, token: TokenGrant(researcher, project)}).dump(path)
    return token


def revoke_tokens(path: Path, researcher: str, project: str) -> int:
    """``flip token revoke``: drop every headless token of ``researcher`` in ``project``; how many."""
    config = CoordinatorConfig.load(path)
    kept = {t: g for t, g in config.tokens.items() if (g.researcher, g.project) != (researcher, project)}
    replace(config, tokens=kept).dump(path)
    return len(config.tokens) - len(kept)
