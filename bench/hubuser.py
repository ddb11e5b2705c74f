"""One hub user's session, driven over HTTP as JupyterLab would: token, server, kernel, code.

For checks of a running hub (the real-hub tests, ``bench.hub_spawn``): get the user's API token
from the hub (``POST /hub/api/users/NAME/tokens`` with the login's username and password), start
their server and follow its spawn progress, start a kernel on it, and run code in that kernel
over the kernel's websocket (Jupyter's JSON message protocol), collecting what it printed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests


class HubError(Exception):
    """The hub or the user's server answered something other than expected; the message says what."""


@dataclass
class Execution:
    """What one code cell did in the kernel."""

    status: str  # "ok" or "error"
    stdout: str = ""
    stderr: str = ""
    results: list[dict[str, Any]] = field(default_factory=list)  # execute_result / display_data bundles
    error: str = ""  # ename: evalue, when the cell raised

    @property
    def text(self) -> str:
        plain = "".join(str(r.get("text/plain", "")) + "\n" for r in self.results)
        return self.stdout + self.stderr + plain + self.error


class HubUser:
    def __init__(self, hub_url: str, name: str, password: str) -> None:
        self.hub_url = hub_url.rstrip("/")
        self.name = name
        response = requests.post(
            f"{self.hub_url}/hub/api/users/{name}/tokens",
            timeout=30,
            json={"auth": {"username": name, "password": password}, "note": "flip hubuser"},
        )
        if response.status_code not in (200, 201):
            raise HubError(f"the hub gave {name} no token: HTTP {response.status_code} {response.text[:200]}")
        self.token = str(response.json()["token"])
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"token {self.token}"

    @property
    def server_url(self) -> str:
        return f"{self.hub_url}/user/{self.name}"

    def _api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        response = self.session.request(
            method, f"{self.hub_url}/hub/api{path}", timeout=kwargs.pop("timeout", 30), **kwargs
        )
        if not response.ok:
            raise HubError(f"{method} /hub/api{path}: HTTP {response.status_code} {response.text[:300]}")
        return response

    def start_server(self, on_progress: Callable[[dict[str, Any]], None] | None = None) -> float:
        """Start the user's server and wait until it is ready (the hub's progress stream); seconds taken."""
        started = time.monotonic()
        self._api("POST", f"/users/{self.name}/server")
        with self.session.get(
            f"{self.hub_url}/hub/api/users/{self.name}/server/progress", stream=True, timeout=(10, 180)
        ) as stream:
            for line in stream.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if on_progress:
                    on_progress(event)
                if event.get("ready"):
                    return time.monotonic() - started
                if event.get("failed"):
                    raise HubError(f"{self.name}'s server failed to start: {event.get('message')}")
        raise HubError(f"{self.name}'s server: the hub's progress stream ended before the server was ready")

    def stop_server(self) -> None:
        self._api("DELETE", f"/users/{self.name}/server")

    def kernel(self, name: str = "python3") -> Kernel:
        response = self.session.post(f"{self.server_url}/api/kernels", json={"name": name}, timeout=60)
        if not response.ok:
            specs = self.session.get(f"{self.server_url}/api/kernelspecs", timeout=30).json().get("kernelspecs", {})
            raise HubError(
                f"{self.name}'s server started no {name!r} kernel (it has: {', '.join(sorted(specs))}): "
                f"HTTP {response.status_code} {response.text[:300]}"
            )
        return Kernel(self, str(response.json()["id"]))


class Kernel:
    """A kernel on the user's server, reached through the hub's proxy."""

    def __init__(self, user: HubUser, kernel_id: str) -> None:
        import websocket  # websocket-client (a jupyter_server dependency)

        self.user = user
        self.id = kernel_id
        url = user.server_url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels"
        self.ws = websocket.create_connection(url, header=[f"Authorization: token {user.token}"], timeout=600)
        self.session = uuid.uuid4().hex

    def execute(self, code: str, timeout: float = 600) -> Execution:
        msg_id = uuid.uuid4().hex
        self.ws.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "username": self.user.name,
                        "session": self.session,
                        "msg_type": "execute_request",
                        "version": "5.3",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "channel": "shell",
                    "buffers": [],
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": True,
                        "user_expressions": {},
                        "allow_stdin": False,
                        "stop_on_error": True,
                    },
                }
            )
        )
        result = Execution("ok")
        replied = idle = False
        deadline = time.monotonic() + timeout
        while not (replied and idle):
            if time.monotonic() > deadline:
                raise HubError(f"the kernel did not finish the cell within {timeout:.0f} s")
            message = json.loads(self.ws.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "stream":
                if content["name"] == "stdout":
                    result.stdout += content["text"]
                else:
                    result.stderr += content["text"]
            elif kind in ("execute_result", "display_data"):
                result.results.append(content["data"])
            elif kind == "error":
                result.status, result.error = "error", f"{content['ename']}: {content['evalue']}"
            elif kind == "execute_reply":
                replied = True
                if content["status"] != "ok":
                    result.status = "error"
            elif kind == "status" and content["execution_state"] == "idle":
                idle = True
        return result

    def close(self) -> None:
        self.ws.close()
        self.user.session.delete(f"{self.user.server_url}/api/kernels/{self.id}", timeout=30)
