"""Fakes of the fleet front's two upstreams, small ASGI apps a test serves over real sockets: a SuperLink and a
coordinator that record what reaches them."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


async def _answer(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = headers or [(b"content-type", b"text/plain")]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class FakeSuperLink:
    """Fake SuperLink: records every request (method, raw path, query, raw headers, body) and echoes
    fleet calls; it also has control and runtime handlers, which the front must never let through."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.recorded = threading.Condition()

    def paths(self) -> list[str]:
        return [call["path"] for call in self.calls]

    def wait_calls(self, n: int, seconds: float = 5) -> bool:
        with self.recorded:
            return self.recorded.wait_for(lambda: len(self.calls) >= n, seconds)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        path = scope["path"]
        if path == "/health":
            await _answer(send, 200, b"ok")
            return
        with self.recorded:
            self.calls.append(
                {
                    "method": scope["method"],
                    "path": path,
                    "raw_path": scope.get("raw_path"),
                    "query": scope["query_string"],
                    "headers": list(scope["headers"]),
                    "body": body,
                }
            )
            self.recorded.notify_all()
        if path.startswith("/v1/fleet/"):
            await _answer(
                send,
                201,
                b"\x00echo:" + body,
                [
                    (b"content-type", b"application/protobuf"),
                    (b"x-flwr-answer", b"yes"),
                    (b"set-cookie", b"a=1; Path=/"),
                    (b"set-cookie", b"b=2; Path=/"),
                ],
            )
        elif path in ("/v1/control/start-run", "/v1/runtime/pull-messages"):
            await _answer(send, 200, b"reached " + path.encode())
        else:
            await _answer(send, 404, b"no such path")


class FakeCoordinator:
    """Fake coordinator: ``POST /site/announce`` (JSON), ``GET /site/presence/{name}`` (a ``wake``
    line each time the test calls ``ring()``), two answers broken off midway (``/site/broken``,
    ``/site/broken-stream``) and an ``/internal`` handler the front must never let through."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.received: list[int] = []  # each call's body length, as it reached this fake
        self.announced: list[Any] = []
        self.produced = 0
        self.streaming = threading.Event()
        self.closed = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bell: asyncio.Event | None = None

    def ring(self) -> None:
        assert self._loop is not None and self._bell is not None
        self._loop.call_soon_threadsafe(self._bell.set)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        body = await _read_body(receive)
        if path == "/health":
            await _answer(send, 200, b"ok")
            return
        self.calls.append(path)
        self.received.append(len(body))
        if path == "/site/announce" and scope["method"] == "POST":
            self.announced.append(json.loads(body))
            await _answer(send, 200, b'{"ok": true}', [(b"content-type", b"application/json")])
        elif path.startswith("/site/presence/"):
            await self._presence(receive, send)
        elif path == "/site/broken":  # promises 100 bytes, sends 10, stops: uvicorn drops the connection
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
            await send({"type": "http.response.body", "body": b"0123456789", "more_body": True})
        elif path == "/site/broken-stream":  # the same without a length (chunked): no final chunk
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"wake\n", "more_body": True})
        else:
            await _answer(send, 200, b"reached " + path.encode())

    async def _presence(self, receive: Any, send: Any) -> None:
        self._loop, self._bell = asyncio.get_running_loop(), asyncio.Event()
        self.produced = 0
        self.closed.clear()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        self.streaming.set()
        gone = asyncio.ensure_future(receive())  # http.disconnect once the front lets go
        try:
            while True:
                ring = asyncio.ensure_future(self._bell.wait())
                await asyncio.wait({ring, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone.done():
                    ring.cancel()
                    return
                self._bell.clear()
                self.produced += 1
                await send({"type": "http.response.body", "body": b"wake\n", "more_body": True})
        finally:
            gone.cancel()
            self.streaming.clear()
            self.closed.set()
