"""The ServerApp's line back to the coordinator (loopback HTTP, internal token).

The ServerApp runs on the hub host, started by the SuperLink, and inherits the coordinator's
address and internal token from the environment that ``flip up`` gave the SuperLink. Sites
never see either: they are not in the run config.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import requests

from coordinator.blobs import HUB
from flip_core.bulk import BulkClient, BulkUnreachable
from flip_core.codec import pack_arrays, unpack_arrays
from flip_core.parsing import parse
from flip_core.runs import Task

log = logging.getLogger(__name__)

ENV_URL = "FLIP_COORDINATOR_URL"
ENV_TOKEN = "FLIP_INTERNAL_TOKEN"
RETRY_SECONDS = 120.0  # how long the server loop waits for a restarting coordinator
T = TypeVar("T")


class HubLink:
    """Calls to the coordinator's internal routes."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.bulk = BulkClient(self.url, token)

    @classmethod
    def from_env(cls) -> HubLink:
        url, token = os.environ.get(ENV_URL), os.environ.get(ENV_TOKEN)
        if not url or not token:
            raise RuntimeError(
                f"the FLIP ServerApp needs {ENV_URL} and {ENV_TOKEN}: start the SuperLink with `flip up`"
            )
        return cls(url, token)

    def _retrying(self, call: Callable[[], T], unreachable: type[Exception]) -> T:
        """``call()``, tried again while it raises ``unreachable`` (the coordinator may be restarting)."""
        deadline = time.monotonic() + RETRY_SECONDS
        delay = 0.1
        while True:
            try:
                return call()
            except unreachable:
                if time.monotonic() >= deadline:
                    raise
                log.warning("the coordinator at %s is unreachable; retrying", self.url)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One call, retried while the coordinator is unreachable (it may be restarting)."""
        timeout = kwargs.pop("timeout", 30)
        response = self._retrying(
            lambda: self.session.request(method, self.url + path, timeout=timeout, **kwargs), requests.ConnectionError
        )
        response.raise_for_status()
        return response

    def _get(self, path: str) -> requests.Response:
        return self._request("GET", path)

    def task(self, run_id: str) -> Task:
        """The run's task as the coordinator validated it (a malformed one refused in a sentence naming the field)."""
        task: Task = parse(Task, self._get(f"/internal/runs/{run_id}/task").content, "the run's task")
        return task

    def model(self, sha: str) -> dict[str, np.ndarray]:
        return unpack_arrays(self._get(f"/internal/models/{sha}").content)

    def sites(self) -> dict[str, dict[str, Any]]:
        return {s["site"]: s for s in self._get("/internal/sites").json()}

    def events(self, run_id: str, events: list[dict[str, Any]]) -> None:
        self._request("POST", f"/internal/runs/{run_id}/events", json=events)

    def ring(self, sites: list[str]) -> None:
        """Ring these sites' doorbells: a message for them is on the SuperLink (asked again, no new event)."""
        self._request("POST", "/internal/ring", json={"sites": sites})

    def next_query(self, line: int, wait: float) -> dict[str, Any] | None:
        """The query line's next query, or None when none came within ``wait`` seconds."""
        response = self._request("GET", f"/internal/queries/next?line={line}&wait={int(wait)}", timeout=wait + 30)
        if response.status_code == 204:
            return None
        work: dict[str, Any] = response.json()
        return work

    def query_replies(self, query_id: str, replies: list[dict[str, Any]]) -> None:
        self._request("POST", f"/internal/queries/{query_id}/replies", json=replies)

    def put_model(self, run_id: str, params: dict[str, np.ndarray]) -> str:
        response = self._request("PUT", f"/internal/runs/{run_id}/model", data=pack_arrays(params), timeout=300)
        return str(response.json()["sha256"])

    # -- bulk payloads (flip_core.bulk): what is too large for a Flower message ------------------
    def _bulk(self, call: Callable[[], T]) -> T:
        """A payload call, tried again while the coordinator is unreachable (a refusal is an answer: not)."""
        return self._retrying(call, BulkUnreachable)

    def publish(self, blob: bytes | bytearray, sha: str, readers: list[str]) -> None:
        """Make a step's payload fetchable by these sites (``GET /site/blobs/SHA``)."""
        self._bulk(lambda: self.bulk.put(f"/internal/blobs/{sha}?readers={','.join(readers)}", blob))

    def take(self, site: str, sha: str, size: int) -> bytearray:
        """A site's reply payload, deleted from the hub once read."""
        blob = self._bulk(lambda: self.bulk.get(f"/internal/blobs/{site}/{sha}", size))
        self._bulk(lambda: self.bulk.delete(f"/internal/blobs/{site}/{sha}"))
        return blob

    def unpublish(self, sha: str) -> None:
        self._bulk(lambda: self.bulk.delete(f"/internal/blobs/{HUB}/{sha}"))
