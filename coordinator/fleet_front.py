"""The fleet front: the only hub address that hospital sites reach.

Why it exists. ``flower-superlink`` (Flower 1.42) serves three HTTP APIs on one port: the
fleet API (``POST /v1/fleet/...``, what each site's SuperNode calls), the control API
(``/v1/control/...``: start and stop runs, register SuperNodes, with no user authentication
in open-source Flower) and the runtime API (``/v1/runtime/...``, the ServerApp's). A site
that can reach that port could therefore start runs or register nodes. FLIP binds the
SuperLink to 127.0.0.1 on the hub and puts this front on the site-facing address instead.

What it does. It is a small reverse proxy (an ASGI app run by uvicorn) with a fixed allow list:

- ``POST /v1/fleet/<name>`` goes to the SuperLink;
- any method on ``/site/<...>`` goes to FLIP's coordinator (``POST /site/announce``, and the
  long-lived ``GET /site/presence/{name}`` stream, whose ``wake`` lines reach the site as the
  coordinator writes them);
- ``GET /health`` is answered here with ``ok``;
- anything else (control, runtime, ``/docs``, ``/api``, ``/internal``, another method on a
  fleet path, a path with dot segments or an encoded slash) gets 403 and a plain sentence.

Before a byte is forwarded, ``coordinator.fleet_gate`` checks the caller's credential (a fleet call's signed
SuperNode headers, of a registered site's key; a site route's bearer token: 401 otherwise) and the body's size
against its route's limit (413 by the Content-Length, or as soon as a body without one passes it; a fleet body,
small, is read whole first). Every connection keeps ``coordinator.doors.FRONT``'s limits: the head within 10 s,
no silence of 30 s in a body, at most 1000 connections, 64 from one address.

Requests are forwarded unchanged: method, path and query bytes, body bytes, and every header
except the hop-by-hop ones (``connection`` and the headers it names, ``keep-alive``,
``transfer-encoding``, ``te``, ``trailer``, ``upgrade``, ``proxy-*``), ``host`` and ``expect``
(this front answers ``100-continue`` itself). So the SuperNode authentication headers
(``flwr-public-key``, ``flwr-signature``, ``flwr-timestamp``) arrive at the SuperLink as the
site signed them.

Responses come back with their status, headers (less hop-by-hop) and raw body bytes. A short
answer with a Content-Length (up to 256 KiB, as most fleet replies are) is relayed in one
piece; any other (the presence stream, large objects) chunk by chunk as it arrives, never held
back. An upstream that breaks off mid-answer breaks off the site's answer too, or gives 502 when
nothing was sent yet. An upstream that cannot be reached gives 502 naming it; Flower's SuperNode
retries on 502. Each upstream has one long-lived ``httpx.AsyncClient`` (an HTTP/1.1 keep-alive
pool), made when the app starts and closed when it stops.

Run it with ``python -m coordinator.fleet_front --host H --port P --superlink URL
--coordinator URL [--certfile F --keyfile F] [--superlink-ca F] [--registry SITES_JSON] [--max-payload-bytes N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.cookiejar
import importlib.util
import logging
import ssl
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from urllib.parse import quote

import httpcore._async.http11
import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount
from starlette.types import Message, Receive, Scope, Send

from coordinator.blobs import BLOB_HEADROOM
from coordinator.config import DEFAULT_MAX_MODEL_BYTES
from coordinator.doors import FRONT, Doors
from coordinator.fleet_gate import Gate

__all__ = ["FORBIDDEN", "build_front", "main", "serve"]

FORBIDDEN = "this address serves only Flower's fleet API and FLIP's site routes\n"

_FLEET = "/v1/fleet/"
_SITE = "/site/"
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade", b"host", b"expect"}
)

# Upstream timeouts. The SuperLink answers fleet calls promptly (a SuperNode gives up after 30 s);
# the coordinator's presence streams stay open for hours, so no read timeout there.
_SUPERLINK_TIMEOUT = httpx.Timeout(connect=5.0, read=120.0, write=120.0, pool=30.0)
_COORDINATOR_TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=120.0, pool=30.0)
# Idle upstream connections are dropped after 2 s, before uvicorn's 5 s keep-alive closes them
# on the other side (so a reused connection is never one the upstream is closing).
_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=2.0)


# httpcore reads an upstream answer 64 KiB at a time, and each read is one trip through the relay (an ASGI
# message, a TLS record batch): a 400 MB model would be 6,000 of them. Read up to 1 MiB at a time instead
# (measured: a 100 MB payload through the front in 0.22 s instead of 0.30 s, `bench.transfer`). An httpcore
# internal: tests/coordinator/test_fleet_front.py fails if it moves.
UPSTREAM_READ_BYTES = 1 << 20
httpcore._async.http11.AsyncHTTP11Connection.READ_NUM_BYTES = UPSTREAM_READ_BYTES

# The largest payload upload let through by default: the coordinator's default largest model and a step's header.
MAX_PAYLOAD_BYTES = DEFAULT_MAX_MODEL_BYTES + BLOB_HEADROOM

# Answers up to this size with a Content-Length are relayed whole; longer ones, and those without
# a length (the presence stream), are streamed chunk by chunk as they arrive.
_WHOLE_BODY_LIMIT = 256 * 1024


class _SiteGone(Exception):
    """The site disconnected while its request body was being relayed."""


class _TooLarge(Exception):
    """A body sent without a Content-Length passed its route's limit."""


class _UpstreamBroke(Exception):
    """The upstream failed after its response had started: the site's response is cut off."""


class _Upstream:
    def __init__(self, name: str, url: str, timeout: httpx.Timeout, ca: str | None) -> None:
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"{name} URL must be http(s)://host:port, not {url!r}")
        self.name = name
        self.base = url.rstrip("/")
        self.timeout = timeout
        self.ca = ca
        self.client: httpx.AsyncClient | None = None

    def open(self) -> httpx.AsyncClient:
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=self.ca) if self.ca else True
        # Cookies from the upstream belong to the site, not to this proxy: refuse to store any.
        no_cookies = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self.client = httpx.AsyncClient(
            verify=verify,
            http1=True,
            http2=False,
            timeout=self.timeout,
            limits=_LIMITS,
            follow_redirects=False,
            trust_env=False,  # never route hub-internal calls through an environment proxy
            cookies=no_cookies,
        )
        return self.client


def _request_headers(raw: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The site's headers less hop-by-hop ones, ``host``, ``expect`` and ``x-flip-accel`` (which only the nginx
    front sets, for the coordinator; uvicorn lower-cases names)."""
    named: set[bytes] = set()
    for key, value in raw:
        if key == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return [
        (key, value)
        for key, value in raw
        if key not in _HOP_BY_HOP and not key.startswith(b"proxy-") and key not in named and key != b"x-flip-accel"
    ]


def _response_headers(raw: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    named: set[bytes] = set()
    out = []
    for key, value in raw:
        key = key.lower()
        if key == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
        if key not in _HOP_BY_HOP and not key.startswith(b"proxy-"):
            out.append((key, value))
    return [(key, value) for key, value in out if key not in named] if named else out


def _clean_path(path: str, raw: bytes, prefix: str) -> bool:
    """Whether the path the upstream will route on is the one checked here.

    httpx removes ``.``/``..`` segments from the URL it sends (``/v1/fleet/../control/x``
    would reach ``/v1/control/x``), and the upstream routes on the percent-decoded path: so the
    raw path must carry the prefix too, and neither form may hold a dot segment, a backslash
    or an encoded slash.
    """
    if not raw.startswith(prefix.encode()):
        return False
    if b"%" in raw:
        lowered = raw.lower()
        if b"%2f" in lowered or b"%5c" in lowered:
            return False
    if "\\" in path or b"\\" in raw:
        return False
    if "/." in path or b"/." in raw:
        for segment in path.split("/"):
            if segment in (".", ".."):
                return False
        for raw_segment in raw.split(b"/"):
            if raw_segment in (b".", b".."):
                return False
    return True


async def _body_after(first: bytes, receive: Receive, limit: int) -> AsyncIterator[bytes]:
    size = len(first)
    if size > limit:
        raise _TooLarge()
    if first:
        yield first
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _SiteGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge()
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _whole_body(first: bytes, receive: Receive, limit: int) -> bytes:
    """The rest of a body read here, up to ``limit`` bytes (:class:`_TooLarge` past it), before a byte is forwarded."""
    return b"".join([chunk async for chunk in _body_after(first, receive, limit)])


async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        raise _UpstreamBroke() from exc


class _Front:
    """The ASGI app behind ``build_front``: route, check, forward, stream back."""

    def __init__(self, superlink: _Upstream, coordinator: _Upstream, gate: Gate) -> None:
        self.superlink = superlink
        self.coordinator = coordinator
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # websockets: nothing here speaks them
            await send({"type": "websocket.close", "code": 1008})
            return
        method: str = scope["method"]
        path: str = scope["path"]
        if method == "POST" and path.startswith(_FLEET):
            upstream, prefix = self.superlink, _FLEET
        elif path.startswith(_SITE):
            upstream, prefix = self.coordinator, _SITE
        elif path == "/health" and method == "GET":
            await PlainTextResponse("ok")(scope, receive, send)
            return
        else:
            await PlainTextResponse(FORBIDDEN, status_code=403)(scope, receive, send)
            return

        raw_path: bytes | None = scope.get("raw_path")
        if not raw_path:
            raw_path = quote(path).encode("ascii")
        elif b"?" in raw_path:  # some servers include the query in raw_path
            raw_path = raw_path.split(b"?", 1)[0]
        if not _clean_path(path, raw_path, prefix):
            await PlainTextResponse(FORBIDDEN, status_code=403)(scope, receive, send)
            return
        refusal = self.gate.refusal(method, path, scope["headers"])
        if refusal is not None:  # answered without reading the body: the connection closes after the answer
            await _fail(scope, receive, send, refusal.status, refusal.sentence, refusal.media_type)
            return
        try:
            await self._forward(upstream, raw_path, scope, receive, send, self.gate.body_limit(method, path))
        except _TooLarge:
            limit = self.gate.body_limit(method, path)
            sentence = f"this route takes a body of at most {limit} bytes; it was not forwarded whole\n"
            await _fail(scope, receive, send, 413, sentence)

    async def _content(
        self, upstream: _Upstream, headers: list[tuple[bytes, bytes]], receive: Receive, limit: int
    ) -> bytes | AsyncIterator[bytes] | None:
        """The body to forward: None when there is none; bytes when it came whole (a small body arrives in one
        message, and a fleet body, small, is read whole first); else a stream, counted against ``limit``
        (:class:`_TooLarge` past it). :class:`_SiteGone` when the site left first."""
        if not any(key in (b"content-length", b"transfer-encoding") for key, _ in headers):
            return None
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise _SiteGone()
        first, more = message.get("body", b""), message.get("more_body", False)
        if len(first) > limit:
            raise _TooLarge()
        if more and upstream is self.superlink:
            first, more = await _whole_body(first, receive, limit), False
        return _body_after(first, receive, limit) if more else first

    async def _forward(
        self, upstream: _Upstream, raw_path: bytes, scope: Scope, receive: Receive, send: Send, limit: int
    ) -> None:
        client = upstream.client
        if client is None:
            raise RuntimeError("the fleet front's upstream clients are made in its lifespan; run it under uvicorn")
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        try:
            content = await self._content(upstream, headers, receive, limit)
        except _SiteGone:
            return
        query: bytes = scope.get("query_string", b"")
        target = raw_path + b"?" + query if query else raw_path
        try:
            # ASCII only: httpx would re-encode other bytes, and HTTP allows none in a request target.
            url = upstream.base + target.decode("ascii")
            request = httpx.Request(scope["method"], url, headers=_request_headers(headers), content=content)
        except (UnicodeDecodeError, httpx.InvalidURL):
            await _fail(scope, receive, send, 400, "this request target cannot be forwarded\n")
            return
        try:
            response = await client.send(request, stream=True)
        except _SiteGone:
            return
        except httpx.LocalProtocolError:  # a header httpx will not send
            await _fail(scope, receive, send, 400, "this request cannot be forwarded as sent\n")
            return
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol):
            await _fail(scope, receive, send, 502, f"{upstream.name} is unreachable from this address\n")
            return
        except httpx.TimeoutException:
            await _fail(scope, receive, send, 504, f"{upstream.name} did not answer in time\n")
            return
        except httpx.HTTPError:
            await _fail(scope, receive, send, 502, f"{upstream.name} closed the connection without an answer\n")
            return

        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) <= _WHOLE_BODY_LIMIT:
            # A short answer of known length: read it whole and send it in one message, sparing the
            # disconnect watcher that streaming needs.
            try:
                body = await response.aread()
            except httpx.HTTPError:
                await _fail(scope, receive, send, 502, f"{upstream.name} broke off its answer\n")
                return
            finally:
                await response.aclose()
            headers = _response_headers(response.headers.raw)
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return

        try:
            relay = StreamingResponse(_relay(response), status_code=response.status_code)
            relay.raw_headers = _response_headers(response.headers.raw)
            await relay(scope, receive, send)
        except _UpstreamBroke:
            # Return without completing the response: uvicorn then closes the site's connection,
            # so the site sees a broken response rather than a clean, truncated one.
            return
        except BaseExceptionGroup as group:  # a task group may wrap it
            broke, rest = group.split(_UpstreamBroke)
            if broke is None or rest is not None:
                raise
        finally:
            await response.aclose()


async def _fail(
    scope: Scope, receive: Receive, send: Send, status: int, sentence: str, media_type: str = "text/plain"
) -> None:
    response: Response = PlainTextResponse(sentence, status_code=status, media_type=media_type)
    if status in (400, 401, 411, 412, 413):  # the body may not be read: the connection cannot carry another request
        response.headers["connection"] = "close"
    await response(scope, receive, send)


def _note_sniffio_absent() -> None:
    """httpcore runs ``import sniffio`` for each lock and event it makes (several per request).
    Without sniffio installed (anyio 4 no longer needs it), each is a failed import that searches
    all of sys.path: a third of this front's CPU per forwarded call. A ``None`` in sys.modules
    makes that import fail at once, as it would anyway."""
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


def build_front(
    superlink: str,
    coordinator: str,
    *,
    superlink_ca: str | None = None,
    registry: Path | None = None,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
) -> Starlette:
    """The fleet front as an ASGI app.

    ``superlink`` and ``coordinator`` are base URLs such as ``https://127.0.0.1:9092`` and
    ``http://127.0.0.1:9093``; ``superlink_ca`` is a PEM file trusted for the SuperLink's TLS
    certificate (which must then name the host in ``superlink``); ``registry``, the coordinator's site
    register (only registered sites' keys are let through); ``max_payload_bytes``, the largest payload
    upload the coordinator takes (``coordinator.fleet_gate``). The upstream clients are made
    in the app's lifespan, so run it under an ASGI server that runs lifespans (uvicorn does).
    """
    _note_sniffio_absent()
    front = _Front(
        _Upstream("the SuperLink", superlink, _SUPERLINK_TIMEOUT, superlink_ca),
        _Upstream("the coordinator", coordinator, _COORDINATOR_TIMEOUT, None),
        Gate(registry, max_payload_bytes),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with front.superlink.open(), front.coordinator.open():
            yield
        front.superlink.client = front.coordinator.client = None

    return Starlette(routes=[Mount("", app=front)], lifespan=lifespan)


def serve(
    listen_host: str,
    listen_port: int,
    superlink: str,
    coordinator: str,
    *,
    certfile: str | None,
    keyfile: str | None,
    superlink_ca: str | None,
    registry: Path | None = None,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    doors: Doors = FRONT,
) -> None:
    """Run the fleet front on ``listen_host:listen_port`` until interrupted (TLS with ``certfile``/``keyfile``),
    with ``doors``' limits on every connection (``coordinator.doors``)."""
    import uvicorn

    if (certfile is None) != (keyfile is None):
        raise ValueError("give both certfile and keyfile for TLS, or neither")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # httpx logs every request at INFO
    front = build_front(
        superlink, coordinator, superlink_ca=superlink_ca, registry=registry, max_payload_bytes=max_payload_bytes
    )
    uvicorn.run(
        front,
        host=listen_host,
        port=listen_port,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        access_log=False,
        log_level="warning",
        ws="none",  # nothing here speaks websockets
        proxy_headers=False,  # sites connect directly; no X-Forwarded-For to trust
        # The upstream's own Date and Server headers pass through; don't add a second pair.
        server_header=False,
        date_header=False,
        # a site's presence stream never ends by itself: on SIGTERM, stop waiting for it after 2 s
        timeout_graceful_shutdown=2,
        **doors.uvicorn_options(),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m coordinator.fleet_front",
        description="Serve Flower's fleet API and FLIP's site routes, and nothing else, on a site-facing address.",
    )
    parser.add_argument("--host", required=True, help="address to listen on (the one sites reach)")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--superlink", required=True, help="the SuperLink's base URL, e.g. https://127.0.0.1:9092")
    parser.add_argument("--coordinator", required=True, help="the coordinator's base URL, e.g. http://127.0.0.1:9093")
    parser.add_argument("--certfile", help="TLS certificate (PEM) presented to sites")
    parser.add_argument("--keyfile", help="its private key (PEM)")
    parser.add_argument("--superlink-ca", help="CA (PEM) trusted for the SuperLink's certificate")
    parser.add_argument(
        "--registry", type=Path, help="the coordinator's site register (sites.json): only its sites' keys pass"
    )
    parser.add_argument(
        "--max-payload-bytes",
        type=int,
        default=MAX_PAYLOAD_BYTES,
        help="the largest payload upload (PUT /site/blobs/SHA) let through to the coordinator",
    )
    args = parser.parse_args(argv)
    if (args.certfile is None) != (args.keyfile is None):
        parser.error("give both --certfile and --keyfile, or neither")
    serve(
        args.host,
        args.port,
        args.superlink,
        args.coordinator,
        certfile=args.certfile,
        keyfile=args.keyfile,
        superlink_ca=args.superlink_ca,
        registry=args.registry,
        max_payload_bytes=args.max_payload_bytes,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
