"""Fakes of the coordinator as its parts see it: the hub link the server loop calls, the hub's payload store
and the payload client over HTTP, and JupyterHub's identity service."""

from __future__ import annotations

from typing import Any

from flip_core.bulk import BulkError, BulkUnreachable


class FakeHub:
    """Stands in for coordinator.hublink.HubLink (the server loop's link to the coordinator): the sites it
    holds, a payload store in dicts, and a log of the events and rings it was sent."""

    def __init__(self, nodes: dict[str, int]) -> None:
        self.nodes = dict(nodes)
        self.log: list[dict[str, Any]] = []
        self.published: dict[str, bytes] = {}  # a fake payload store: what the round loop published ...
        self.uploaded: dict[tuple[str, str], bytes] = {}  # ... and what each site uploaded
        self.tamper: set[str] = set()  # sites whose uploaded payload changes on the way

    def publish(self, blob: bytes, sha: str, readers: list[str]) -> None:
        self.published[sha] = bytes(blob)

    def unpublish(self, sha: str) -> None:
        self.published.pop(sha, None)

    def fetch(self, sha: str, size: int) -> bytes:
        return self.published[sha]

    def take(self, site: str, sha: str, size: int) -> bytes:
        blob = self.uploaded.pop((site, sha))
        return blob[:-1] + bytes([blob[-1] ^ 1]) if site in self.tamper else blob

    def sites(self) -> dict[str, dict[str, Any]]:
        return {
            s: {"site": s, "status": "online", "node_id": n, "datasets": [{"name": "heart"}]}
            for s, n in self.nodes.items()
        }

    def events(self, run_id: str, events: list[dict[str, Any]]) -> None:
        self.log.extend(events)

    def ring(self, sites: list[str]) -> None:
        self.log.append({"type": "ring", "sites": sites})


class FakeBulkStore:
    """Stands in for the hub's payload store (a dict): what was published, and what a fetch hands back."""

    def __init__(self) -> None:
        self.held: dict[str, bytes] = {}

    def publish(self, blob: bytes | bytearray, sha: str) -> None:
        self.held[sha] = bytes(blob)

    def fetch(self, sha: str, size: int) -> bytes:
        return self.held[sha]


class FakeFlakyBulk:
    """Stands in for flip_core.bulk.BulkClient: unreachable for the first ``down`` calls, then it answers
    (or, with ``refuse``, refuses every call)."""

    def __init__(self, down: int, refuse: bool = False) -> None:
        self.down, self.refuse, self.calls = down, refuse, 0

    def put(self, path: str, blob: bytes | bytearray) -> None:
        self.calls += 1
        if self.refuse:
            raise BulkError(f"PUT {path} was refused (413): the payload is too large")
        if self.calls <= self.down:
            raise BulkUnreachable(f"PUT {path} failed: ConnectionRefusedError")


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
