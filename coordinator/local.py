"""Where a local FLIP installation keeps its state, and the connection file notebooks read.

``$FLIP_HOME`` (default ``~/.flip``) holds ``connection.json`` (written by ``flip up``) and
the local federation's state. Tests point ``FLIP_HOME`` at a temporary directory.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

ENV_HOME = "FLIP_HOME"
CONNECTION_FILE = "connection.json"


def flip_home() -> Path:
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".flip").expanduser()


def connection_path(home: Path | None = None) -> Path:
    return (home or flip_home()) / CONNECTION_FILE


def read_connection(home: Path | None = None) -> dict[str, Any] | None:
    path = connection_path(home)
    if not path.exists():
        return None
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def write_connection(data: dict[str, Any], home: Path | None = None) -> Path:
    path = connection_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller binds it right away)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout`` seconds pass; True if it held."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def package_versions(*names: str) -> dict[str, str]:
    """Python's and the named distributions' versions, for run records."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


SUPEREXEC_POLL_SECONDS = "0.2"  # Flower's documented FLWR_SUPEREXEC_TASK_POLL_INTERVAL (default 1 s)


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """The environment for a Flower process FLIP starts: this venv first on PATH (Flower starts
    flower-superexec and flwr-* apps from PATH), its own FLWR_HOME, FLIP's SuperExec poll."""
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "FLWR_HOME": str(flwr_home),
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": SUPEREXEC_POLL_SECONDS, **extra}
