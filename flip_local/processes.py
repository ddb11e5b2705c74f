"""The local federation's processes: started detached, recorded in a state file, stopped by pid.

Each process runs in its own session with its log under the federation's ``logs/``, so that
``flip down`` (another process, later) can stop it and its children by process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.hubside import ProcessSpec
from flip_core.util import wait_until


@dataclass(frozen=True)
class Federation:
    """The local federation kept under ``home`` (``$FLIP_HOME``)."""

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
        data = json.loads(self.state_file.read_text())
        return data if isinstance(data, dict) else None

    def write_state(self, processes: list[dict[str, Any]]) -> None:
        """The federation's processes (their environment holds tokens: owner-only)."""
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"root": str(self.root), "processes": processes}, indent=2))
        tmp.chmod(0o600)
        tmp.replace(self.state_file)

    def running(self) -> bool:
        state = self.state()
        return bool(state) and any(alive(p["pid"]) for p in state["processes"])  # type: ignore[index]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def spawn(spec: ProcessSpec, logs: Path) -> dict[str, Any]:
    """Start ``spec`` detached (its own session, output to ``logs/NAME.log``); its record for the state file."""
    log_path = logs / f"{spec.name}.log"
    with open(log_path, "ab") as sink:
        process = subprocess.Popen(
            spec.command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=spec.env,
            start_new_session=True,
        )
    # what FLIP set on top of the caller's environment, so that `restart` can start it again as it was
    flip_env = {k: v for k, v in spec.env.items() if os.environ.get(k) != v}
    return {"name": spec.name, "pid": process.pid, "log": str(log_path), "command": spec.command, "env": flip_env}


def tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop(processes: list[dict[str, Any]], timeout: float) -> list[str]:
    """SIGTERM each process group (sites first, the SuperLink last), SIGKILL what is left after ``timeout``;
    the names in the order they were stopped."""
    ordered = sorted(processes, key=lambda p: (not p["name"].startswith("site-"), p["name"] == "superlink"))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in ordered:
            if alive(proc["pid"]):
                try:
                    os.killpg(proc["pid"], sig)
                except ProcessLookupError:
                    pass
        if wait_until(lambda: not any(alive(p["pid"]) for p in ordered), timeout, 0.1):
            break
    return [p["name"] for p in ordered]
