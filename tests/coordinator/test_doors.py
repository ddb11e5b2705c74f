"""The limits every hub listener keeps (``coordinator.doors``), over real sockets: uvicorn in a thread on a free
port with short limits, a small ASGI app, and clients that misbehave (slow heads, silent bodies, unread answers,
too many connections) beside one that behaves and is served meanwhile."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from coordinator.doors import COORDINATOR, FRONT, Doors

QUICK = Doors(head_seconds=0.5, body_idle_seconds=0.5, send_idle_seconds=0.5, keep_alive_seconds=5)


class App:
    """``GET /`` answers ok; ``POST /`` reads the body (after ``pause`` seconds) and says its length; ``GET /flood``
    sends 1 MiB chunks until the client is gone. ``left`` is set when a request saw its client leave."""

    def __init__(self, pause: float = 0.0) -> None:
        self.pause = pause
        self.left = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/flood":
            await self._flood(receive, send)
            return
        body = b""
        if scope["method"] == "POST":
            await asyncio.sleep(self.pause)
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.left.set()
                    return
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
        answer = b"ok %d" % len(body)
        headers = [(b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    async def _flood(self, receive: Any, send: Any) -> None:
        gone = asyncio.ensure_future(receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        chunk = b"\x00" * (1 << 20)
        try:
            for _ in range(10_000):  # 10 GB: no client reads this by accident
                if gone.done():
                    self.left.set()
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await asyncio.sleep(0)
        finally:
            gone.cancel()


class Listener:
    def __init__(self, app: Any, doors: Doors) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", **doors.uvicorn_options())
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def served() -> Iterator[tuple[Listener, App]]:
    app = App()
    listener = Listener(app, QUICK)
    yield listener, app
    listener.stop()


def closed(sock: socket.socket) -> bool:
    """Whether the server has closed this connection (what it sent before, if anything, is read and dropped)."""
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, TimeoutError):
        return False
    return True


def dribble(sock: socket.socket, data: bytes, pace: float, beside: Any) -> int:
    """Send ``data`` one byte per ``pace`` seconds (a slow loris) until the server drops the connection, calling
    ``beside()`` after each byte; how many bytes went."""
    for sent, byte in enumerate(data):
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return sent
        beside()
        time.sleep(pace)  # the attacker's pace, not a synchronisation
    return len(data)


def test_a_head_sent_one_byte_at_a_time_is_dropped_while_others_are_served(served: tuple[Listener, App]) -> None:
    listener, _ = served
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 400 + b"\r\n\r\n"
    honest: list[int] = []
    with listener.connect() as slow, httpx.Client(timeout=5) as client:
        sent = dribble(slow, head, 0.05, lambda: honest.append(client.get(listener.url).status_code))
    assert sent < len(head)  # the head never finished: the server let go first
    assert honest and set(honest) == {200}


def test_a_connection_that_sends_nothing_is_dropped(served: tuple[Listener, App]) -> None:
    listener, _ = served
    with listener.connect() as idle:
        assert closed(idle)


def test_the_next_head_on_a_kept_alive_connection_is_timed_too(served: tuple[Listener, App]) -> None:
    listener, _ = served
    with listener.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sent = dribble(sock, b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 400, 0.05, lambda: None)
    assert sent < 400


def test_a_body_that_stops_coming_is_dropped_and_the_app_sees_its_client_leave(served: tuple[Listener, App]) -> None:
    listener, app = served
    with listener.connect() as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        assert closed(sock)
    assert app.left.wait(5)


def test_a_body_the_server_is_slow_to_read_is_not_the_clients_silence() -> None:
    app = App(pause=1.5)  # the application's work, three of the body's silences long
    listener = Listener(app, QUICK)
    try:
        with httpx.Client(timeout=10) as client:
            response = client.post(listener.url, content=b"x" * (4 << 20))
        assert response.text == f"ok {4 << 20}"
    finally:
        listener.stop()


def test_an_answer_nobody_reads_is_dropped(served: tuple[Listener, App]) -> None:
    listener, app = served
    with listener.connect() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
        assert app.left.wait(10)  # the server gave up on the reader, and the app was told


def test_connections_past_the_limit_are_closed_as_they_open() -> None:
    listener = Listener(App(), Doors(head_seconds=30, max_connections=3))
    try:
        held = [listener.connect() for _ in range(3)]
        for sock in held:  # each is served: the server has them all
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        with listener.connect() as fourth:
            assert closed(fourth)
        held.pop().close()
        with httpx.Client(timeout=5) as client:  # a place is free again
            assert _eventually(lambda: _status(client, listener.url) == 200)
        for sock in held:
            sock.close()
    finally:
        listener.stop()


def _local_address() -> str | None:
    """An address of this machine other than loopback (a site elsewhere, as the server sees it), if there is one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, only a route is chosen
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_one_address_may_hold_only_its_share() -> None:
    address = _local_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    app = App()
    sock = socket.socket()
    sock.bind((address, 0))
    sock.listen(16)
    config = uvicorn.Config(
        app, log_level="warning", lifespan="off", **Doors(head_seconds=30, per_peer=2).uvicorn_options()
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        held = [socket.create_connection(sock.getsockname(), timeout=10) for _ in range(2)]
        for conn in held:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        with socket.create_connection(sock.getsockname(), timeout=10) as third:
            assert closed(third)
        for conn in held:
            conn.close()
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_the_hubs_own_loopback_is_not_held_to_one_addresss_share() -> None:
    listener = Listener(App(), Doors(head_seconds=30, max_connections=100, per_peer=2))
    try:
        held = [listener.connect() for _ in range(4)]
        for conn in held:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
            conn.close()
    finally:
        listener.stop()


def test_a_head_growing_past_its_size_is_refused(served: tuple[Listener, App]) -> None:
    listener, _ = served
    with listener.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (QUICK.max_head_bytes + 1))
        assert sock.recv(65536).startswith(b"HTTP/1.1 400")
    with httpx.Client(timeout=5) as client:
        assert client.get(listener.url).status_code == 200


def test_the_hubs_listeners_have_limits() -> None:
    for doors in (FRONT, COORDINATOR):
        options = doors.uvicorn_options()
        assert options["limit_concurrency"] and options["h11_max_incomplete_event_size"]
        assert doors.head_seconds <= 30 and doors.body_idle_seconds <= 60
    assert FRONT.per_peer is not None


def _status(client: httpx.Client, url: str) -> int:
    try:
        return client.get(url).status_code
    except httpx.TransportError:
        return 0


def _eventually(check: Any, seconds: float = 5) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
    return True
