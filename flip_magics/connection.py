"""The notebook's HTTP connection to a FLIP coordinator: one authenticated session whose failures are sentences,
and the calls that following a run needs (its view, its event stream, its final model).

No IPython here. :class:`flip_magics.client.FlipClient` asks the coordinator through it, and a
:class:`flip_magics.run_handle.RunHandle` follows its run through it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import requests

from flip_core.api import PROJECT_HEADER
from flip_core.codec import unpack_arrays
from flip_core.errors import NotConnected, Rejected


class Connection:
    """An authenticated session with a coordinator's researcher API, in ``project`` (a hub user in several) or
    the caller's only one. A coordinator that cannot be reached or refuses the token is :class:`NotConnected`;
    a refused request is :class:`Rejected` with the coordinator's own sentence."""

    def __init__(self, url: str, token: str, *, project: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.project = project
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        if project:
            self.session.headers[PROJECT_HEADER] = project

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One request to ``path`` under the coordinator's URL (``requests``' keywords; ``timeout`` in seconds)."""
        try:
            response = self.session.request(
                method, self.url + path, timeout=kwargs.pop("timeout", self.timeout), **kwargs
            )
        except requests.ConnectionError:
            raise NotConnected(f"cannot reach the FLIP coordinator at {self.url}") from None
        except requests.Timeout:
            raise NotConnected(f"the FLIP coordinator at {self.url} did not answer in time") from None
        if not response.ok:
            try:
                message = response.json()["error"]
            except (ValueError, KeyError):
                message = f"HTTP {response.status_code}: {response.text[:200]}"
            if response.status_code == 401:
                raise NotConnected(f"the coordinator at {self.url} refused this token: {message}")
            raise Rejected(message, response.status_code)
        return response

    def run(self, run_id: str) -> dict[str, Any]:
        """The coordinator's view of one run: its options, status, source and record."""
        return self.call("GET", f"/api/runs/{run_id}").json()  # type: ignore[no-any-return]

    def events(self, run_id: str, after: int) -> Iterator[dict[str, Any]]:
        """One connection's worth of the run's server-sent events, from the one after sequence number ``after``."""
        response = self.call(
            "GET",
            f"/api/runs/{run_id}/events",
            params={"after": after},
            stream=True,
            timeout=(5, 30),
            headers={"Accept": "text/event-stream"},
        )
        with response:
            data: list[str] = []
            for line in response.iter_lines(decode_unicode=True):
                if line is None:
                    continue
                if line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line == "" and data:
                    yield json.loads("\n".join(data))
                    data = []

    def model_params(self, run_id: str) -> dict[str, np.ndarray]:
        """The run's final model as arrays by name."""
        # a bytearray: the arrays are writable views of it (the researcher may change them), not read-only
        return unpack_arrays(bytearray(self.call("GET", f"/api/runs/{run_id}/model", timeout=300).content))


__all__ = ["Connection"]
