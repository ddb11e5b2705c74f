"""The limits every listener of the hub keeps: how long a client may take over its request's head and body, how
long an answer may wait on a client that does not read it, how many connections may be open at once (in all, and
from one address), and how large a request's head may be.

Why it exists. uvicorn (0.49, as pinned) times only the idle wait between two requests on a kept-alive connection
(``timeout_keep_alive``) and answers 503 past ``limit_concurrency``; nothing times a request's head or body. A client
that sends its headers one byte a minute (a slow loris), or declares a body and never sends it, holds its connection
for as long as it likes, and the 503 is only given once a head is complete. :class:`Doors` says the limits;
:meth:`Doors.uvicorn_options` gives them to ``uvicorn.run`` or ``uvicorn.Config``, with uvicorn's own HTTP/1.1
protocol (h11) under a guard that keeps them:

- the head (request line and headers) must be complete ``head_seconds`` after its first byte (or after the
  connection opened, for its first request), and may not grow past ``max_head_bytes`` while it is incomplete
  (h11's limit: 400; a head that arrives whole in one read, at most 256 KiB, is parsed as it is);
- while a body is arriving, no silence may last ``body_idle_seconds`` (a wait the server causes, by not reading
  what came, or by not yet asking for a body sent on ``Expect: 100-continue``, does not count); the rest of a body
  the answer did not wait for is let in for as long (2 s when the answer closes the connection, as a refusal
  does), then the connection is dropped;
- an answer may not wait ``send_idle_seconds`` for a client that has stopped reading it;
- a connection over ``max_connections`` in all, or over ``per_peer`` from one address (other than the hub's own
  loopback, where a local federation's sites all are), is closed as it opens.

A connection past a limit is dropped (aborted, not flushed): the application sees the client leave
(``http.disconnect``). The TLS handshake before all this is asyncio's, bounded at 60 s by its default.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["COORDINATOR", "FRONT", "Doors", "guarded_protocol"]

LOOPBACK = frozenset({"::1", "localhost"})
LINGER_SECONDS = 2.0  # a refused body still arriving after its answer: dropped after this


@dataclass(frozen=True)
class Doors:
    """The limits of one listener (see the module's docstring)."""

    head_seconds: float = 10.0
    body_idle_seconds: float = 30.0
    send_idle_seconds: float = 60.0
    keep_alive_seconds: int = 5
    max_connections: int = 1000
    per_peer: int | None = None
    max_head_bytes: int = 16 * 1024

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments for ``uvicorn.run``/``uvicorn.Config`` that keep these limits."""
        return {
            "http": guarded_protocol(self),
            "timeout_keep_alive": self.keep_alive_seconds,
            # connections past max_connections are closed as they open (below); uvicorn's own 503 remains for
            # request tasks piling up past that on the connections kept
            "limit_concurrency": self.max_connections + 1,
            "h11_max_incomplete_event_size": self.max_head_bytes,
            "backlog": min(2048, self.max_connections),
        }


# The fleet front: the sites' one address, on the open network. Longer keep-alive than a SuperNode's 5 s idle
# expiry (the site, not the front, drops idle connections); each site holds a few connections (its presence
# stream, fleet calls, a payload), so one address may hold at most 64.
FRONT = Doors(keep_alive_seconds=15, max_connections=1000, per_peer=64)
# The coordinator: researchers (through JupyterHub's proxy, so one address for all of them), the fleet front and
# the ServerApp, all on the hub. Notebooks' event streams and sites' presence streams stay open while they last.
COORDINATOR = Doors(keep_alive_seconds=5, max_connections=2000, max_head_bytes=64 * 1024)


def guarded_protocol(doors: Doors) -> type[H11Protocol]:
    """uvicorn's h11 protocol keeping ``doors``' limits: a class of its own for each listener."""
    return type("GuardedH11Protocol", (_Guarded,), {"doors": doors})


class _Guarded(H11Protocol):
    doors: ClassVar[Doors]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._timer: asyncio.TimerHandle | None = None  # the head's deadline, or the body's silence
        self._phase = ""
        self._send_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        if self._over_limit():
            transport.abort()
            return
        self._watch("head", self.doors.head_seconds)

    def _over_limit(self) -> bool:
        if len(self.connections) > self.doors.max_connections:
            return True
        if self.doors.per_peer is None or self.client is None:
            return False
        peer = self.client[0]
        if peer in LOOPBACK or peer.startswith("127."):  # the hub's own (a local federation's sites): not shared out
            return False
        same = [c for c in self.connections if isinstance(c, H11Protocol) and c.client and c.client[0] == peer]
        return len(same) > self.doors.per_peer

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._rewatch()

    def on_response_complete(self) -> None:
        self._unwatch()
        super().on_response_complete()  # the keep-alive wait (uvicorn's) until the next request's first byte
        if self.conn.their_state is h11.SEND_BODY and self.transport.is_closing():
            # answered before the body was read (a refusal) and closing: what still comes is discarded while the
            # answer drains (TLS's closing handshake reads on), for LINGER_SECONDS at most
            self._watch("rest", LINGER_SECONDS)

    def _rewatch(self) -> None:
        """After bytes came: time the head from its first byte, and a body's silence from its last."""
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE:  # a head on its way (uvicorn's keep-alive wait ended with its first byte)
            if self._phase != "head" and self.timeout_keep_alive_task is None:
                self._watch("head", self.doors.head_seconds)
        elif state is h11.SEND_BODY and self.conn.our_state is h11.DONE:  # answered already: the rest is let in
            if self._phase != "rest":  # for a while only, however steadily it comes
                self._watch("rest", self.doors.body_idle_seconds)
        elif state is h11.SEND_BODY:
            self._watch("body", self.doors.body_idle_seconds)
        elif self._phase:
            self._unwatch()

    def _watch(self, phase: str, seconds: float) -> None:
        self._unwatch()
        self._phase = phase
        self._timer = self.loop.call_later(seconds, self._expired)

    def _unwatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, ""

    def _expired(self) -> None:
        phase, self._timer = self._phase, None
        if phase == "body" and (self.flow.read_paused or getattr(self.cycle, "waiting_for_100_continue", False)):
            self._watch("body", self.doors.body_idle_seconds)  # the server is not reading yet: not the client's silence
            return
        self._phase = ""
        if phase == "rest" or not self.transport.is_closing():
            self.logger.info("dropped %s: its request's %s took too long", _peer(self.client), phase)
            self.transport.abort()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.doors.send_idle_seconds, self._unread)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _unread(self) -> None:
        self._send_timer = None
        if not self.transport.is_closing():
            self.logger.info("dropped %s: it stopped reading its answer", _peer(self.client))
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._unwatch()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().connection_lost(exc)


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"
