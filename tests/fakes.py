"""Fakes for unit tests of pure logic, named as fakes. Integration tests use the real parts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FakeFlowerStatus:
    status: str
    sub_status: str = ""
    details: str = ""


@dataclass
class FakeControl:
    """Stands in for coordinator.flower_control.FlowerControl: records calls, starts nothing."""

    fab_hash: str = "fakefab"
    started: list[str] = field(default_factory=list)
    stopped: list[int] = field(default_factory=list)
    statuses: dict[int, FakeFlowerStatus] = field(default_factory=dict)
    refuse: bool = False

    def start_run(self, flip_run_id: str) -> int:
        if self.refuse:
            raise ConnectionError("SuperLink unreachable")
        self.started.append(flip_run_id)
        run = 1000 + len(self.started)
        self.statuses[run] = FakeFlowerStatus("running")
        return run

    def status(self, flower_run_id: int) -> Any:
        return self.statuses.get(flower_run_id)

    def stop_run(self, flower_run_id: int) -> bool:
        self.stopped.append(flower_run_id)
        self.statuses[flower_run_id] = FakeFlowerStatus("finished", "stopped")
        return True

    def logs(self, flower_run_id: int, limit: int = 4000) -> str:
        return "ServerApp crashed: boom\n"


class FakeHubIdentity:
    """Stands in for coordinator.identity.HubIdentity: hub tokens and group memberships from a table."""

    def __init__(self, users: dict[str, tuple[str, tuple[str, ...]]], hub_projects: list[str]) -> None:
        self.users = users  # token -> (user, projects)
        self.projects = hub_projects

    def caller(self, token: str) -> Any:
        from coordinator.identity import Caller

        if token not in self.users:
            return None
        name, projects = self.users[token]
        return Caller(name, projects, "hub")

    def hub_projects(self) -> list[str]:
        return self.projects
