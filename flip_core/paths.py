"""Where FLIP keeps things on one machine: its home (the connection file) and the public data.

``$FLIP_HOME`` (default ``~/.flip``) holds ``connection.json``: ``flip up`` writes it, and the
notebooks and local site agents of that machine read it to find the federation. Its format is
the contract between them, so it lives here. ``$FLIP_DATA_DIR`` is where public data sets are
(``flip data fetch`` puts them there); notebooks reach it through ``flip_magics.data_dir``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV_HOME = "FLIP_HOME"
ENV_DATA_DIR = "FLIP_DATA_DIR"
CONNECTION_FILE = "connection.json"


def flip_home() -> Path:
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".flip").expanduser()


def connection_path(home: Path | None = None) -> Path:
    return (home or flip_home()) / CONNECTION_FILE


def read_connection(home: Path | None = None) -> dict[str, Any] | None:
    """The local federation's connection (coordinator URL, token, fleet address), or None."""
    path = connection_path(home)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else None


def write_connection(data: dict[str, Any], home: Path | None = None) -> Path:
    """Write the connection file atomically and owner-only (it holds a token)."""
    path = connection_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


def data_dir() -> Path:
    """Where data sets live: ``$FLIP_DATA_DIR``, else ``<checkout>/../shared/data`` if it exists,
    else ``~/.cache/flip/data``."""
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if shared.is_dir():
        return shared
    return Path.home() / ".cache" / "flip" / "data"


__all__ = [
    "CONNECTION_FILE",
    "ENV_DATA_DIR",
    "ENV_HOME",
    "connection_path",
    "data_dir",
    "flip_home",
    "read_connection",
    "write_connection",
]
