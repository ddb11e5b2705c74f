"""The fleet front over real sockets: two fake upstreams (``FakeSuperLink`` and ``FakeCoordinator`` of tests/fakes,
small ASGI apps, each under uvicorn) and the front itself under uvicorn, all on free ports."""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import uvicorn
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.fleet_front import FORBIDDEN, MAX_PAYLOAD_BYTES, build_front
from coordinator.fleet_gate import ANNOUNCE_BODY_LIMIT, FLEET_BODY_LIMIT

from fakes import FakeCoordinator, FakeSuperLink

SENTENCE = FORBIDDEN.strip()


# -- servers in threads -----------------------------------------------------------------------------


def _listening_socket() -> socket.socket:
    """A socket bound to a free port and already listening: a client that connects before the
    server's loop runs simply waits in the backlog, so readiness is one request with a deadline."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def _dead_url() -> str:
    """An http URL on which nothing listens (a free port, bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def _tracebacks_logged() -> Iterator[list[logging.LogRecord]]:
    """Records that uvicorn logs with a traceback (an exception escaping an app) meanwhile."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record) if record.exc_info else None  # type: ignore[method-assign]
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


class Served:
    """``app`` served by uvicorn in a daemon thread on a free port of 127.0.0.1."""

    def __init__(
        self, app: Any, *, certfile: str | None = None, keyfile: str | None = None, ca: str | None = None
    ) -> None:
        self.sock = _listening_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"{'https' if certfile else 'http'}://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="auto",
            ws="none",
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        verify: Any = ssl.create_default_context(cafile=ca) if ca else True
        with httpx.Client(verify=verify, timeout=10) as client:  # waits in the backlog until ready
            _until(lambda: _healthy(client, self.url + "/health"), 10, f"{self.url}/health")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def _healthy(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.TransportError:
        return False


# -- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeSuperLink, FakeCoordinator, Served, Served]]:
    superlink, coordinator = FakeSuperLink(), FakeCoordinator()
    served_superlink, served_coordinator = Served(superlink), Served(coordinator)
    yield superlink, coordinator, served_superlink, served_coordinator
    served_superlink.stop()
    served_coordinator.stop()


@pytest.fixture(scope="module")
def front(fakes: tuple[FakeSuperLink, FakeCoordinator, Served, Served]) -> Iterator[str]:
    _, _, superlink, coordinator = fakes
    served = Served(build_front(superlink.url, coordinator.url))
    yield served.url
    served.stop()


@pytest.fixture
def superlink(fakes: tuple[FakeSuperLink, FakeCoordinator, Served, Served]) -> FakeSuperLink:
    fakes[0].calls.clear()
    return fakes[0]


@pytest.fixture
def coordinator(fakes: tuple[FakeSuperLink, FakeCoordinator, Served, Served]) -> FakeCoordinator:
    fakes[1].calls.clear()
    fakes[1].received.clear()
    return fakes[1]


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as c:
        yield c


SITE_KEY = ec.generate_private_key(ec.SECP384R1())


def signed(
    key: ec.EllipticCurvePrivateKey = SITE_KEY, at: datetime.datetime | None = None
) -> list[tuple[bytes, bytes]]:
    """A SuperNode's credential headers, as Flower's NodeAuthHttpInterceptor signs them."""
    stamp = (at or datetime.datetime.now(datetime.UTC)).isoformat()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signature = key.sign(stamp.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    return [
        (b"flwr-public-key", base64.b64encode(pem)),
        (b"flwr-timestamp", stamp.encode()),
        (b"flwr-signature", base64.b64encode(signature)),
    ]


SITE_TOKEN = {"authorization": "Bearer site-token"}


def auth_headers() -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"application/protobuf"),
        (b"accept", b"application/protobuf"),
        *signed(),
        (b"x-signature", b"first"),
        (b"x-signature", b"second"),
    ]


# -- the tests ----------------------------------------------------------------------------------------


def test_fleet_post_is_forwarded_byte_exact(front: str, superlink: FakeSuperLink, client: httpx.Client) -> None:
    body = bytes(range(256)) + b"\x00\x00proto\x00" * 50
    hop = [
        (b"connection", b"keep-alive, x-hop"),
        (b"x-hop", b"private"),
        (b"keep-alive", b"timeout=5"),
        (b"proxy-authorization", b"Basic eA=="),
    ]
    credential = auth_headers()
    response = client.post(front + "/v1/fleet/push-messages?run=7&tag=a%2Fb", content=body, headers=credential + hop)

    assert response.status_code == 201
    assert response.content == b"\x00echo:" + body
    assert response.headers["x-flwr-answer"] == "yes"
    assert response.headers["content-type"] == "application/protobuf"
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]

    [call] = superlink.calls
    assert call["method"] == "POST"
    assert call["raw_path"] == b"/v1/fleet/push-messages"
    assert call["query"] == b"run=7&tag=a%2Fb"
    assert call["body"] == body
    seen = call["headers"]
    for header in credential:
        assert header in seen, header
    assert [v for k, v in seen if k == b"x-signature"] == [b"first", b"second"]  # order and duplicates kept
    assert not {k for k, _ in seen} & {b"connection", b"x-hop", b"keep-alive", b"proxy-authorization"}
    # exactly what the site sent, in its order, less hop-by-hop headers and host (the upstream's own)
    dropped = {b"connection", b"x-hop", b"keep-alive", b"proxy-authorization", b"host"}
    sent = [(k.lower(), v) for k, v in response.request.headers.raw if k.lower() not in dropped]
    assert [(k, v) for k, v in seen if k != b"host"] == sent
    assert dict(seen)[b"host"] != front.removeprefix("http://").encode()


def test_a_large_chunked_upload_streams_through(front: str, superlink: FakeSuperLink, client: httpx.Client) -> None:
    chunk = bytes(range(256)) * 256  # 64 KiB
    chunks = [chunk] * 48  # 3 MiB, sent chunked (no content-length)
    response = client.post(front + "/v1/fleet/push-object", content=iter(chunks), headers=auth_headers())
    assert response.status_code == 201
    assert response.content == b"\x00echo:" + b"".join(chunks)
    assert superlink.calls[0]["body"] == b"".join(chunks)


FORBIDDEN_REQUESTS = [
    ("POST", "/v1/control/start-run"),
    ("POST", "/v1/control/register-node"),
    ("POST", "/v1/runtime/pull-messages"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/fleet/pull-messages"),
    ("PUT", "/v1/fleet/push-messages"),
    ("POST", "/v1/fleet"),
    ("GET", "/internal/sites"),
    ("POST", "/internal/ring"),
    ("GET", "/api/runs"),
    ("POST", "/health"),
    ("GET", "/"),
]


@pytest.mark.parametrize(("method", "path"), FORBIDDEN_REQUESTS)
def test_everything_else_is_refused(
    front: str, superlink: FakeSuperLink, coordinator: FakeCoordinator, client: httpx.Client, method: str, path: str
) -> None:
    response = client.request(method, front + path, content=b"{}")
    assert response.status_code == 403
    assert response.text.strip() == SENTENCE
    assert superlink.calls == [] and coordinator.calls == []


def _raw_status(url: str, target: bytes) -> tuple[int, bytes]:
    """Send ``POST target`` exactly as written (clients would normalise dot segments away)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize(
    "target",
    [
        b"/v1/fleet/../control/start-run",
        b"/v1/fleet/%2e%2e/control/start-run",
        b"/v1/fleet/%2E%2E%2Fcontrol%2Fstart-run",
        b"/v1/fleet/..%2fruntime/pull-messages",
        b"/v1/fleet/.%2e/runtime/pull-messages",
        b"/v1/fleet/..\\control\\start-run",
        b"/site/../internal/ring",
        b"/site/presence/..%2F..%2Finternal%2Fsites",
        b"/v1/fleet/caf\xc3\xa9",
    ],
)
def test_paths_that_could_escape_the_allow_list_are_refused(
    front: str, superlink: FakeSuperLink, coordinator: FakeCoordinator, target: bytes
) -> None:
    status, body = _raw_status(front, target)
    assert status in (400, 403), (status, body)
    if status == 403:
        assert body.decode().strip() == SENTENCE
    assert superlink.calls == [] and coordinator.calls == []


def test_control_and_runtime_are_never_reached(
    fakes: tuple[FakeSuperLink, FakeCoordinator, Served, Served], front: str, client: httpx.Client
) -> None:
    for method, path in FORBIDDEN_REQUESTS:
        client.request(method, front + path)
    paths = fakes[0].paths()
    assert not [p for p in paths if p.startswith(("/v1/control", "/v1/runtime", "/docs"))]
    assert not [p for p in fakes[1].calls if not p.startswith("/site/")]


def test_health_is_answered_by_the_front(front: str, superlink: FakeSuperLink, client: httpx.Client) -> None:
    response = client.get(front + "/health")
    assert (response.status_code, response.text) == (200, "ok")
    assert superlink.calls == []


def test_site_announce_is_forwarded(front: str, coordinator: FakeCoordinator, client: httpx.Client) -> None:
    response = client.post(front + "/site/announce", json={"site": "VA", "node_id": 3}, headers=SITE_TOKEN)
    assert response.status_code == 200
    assert response.json() == {"ok": True}
    assert coordinator.announced[-1] == {"site": "VA", "node_id": 3}
    assert coordinator.calls == ["/site/announce"]


def test_presence_lines_arrive_one_at_a_time(front: str, coordinator: FakeCoordinator) -> None:
    with httpx.Client(timeout=httpx.Timeout(5.0)) as client:
        with client.stream("GET", front + "/site/presence/VA", headers=SITE_TOKEN) as response:
            assert response.status_code == 200
            assert coordinator.streaming.wait(5)
            raw = response.iter_raw()
            for n in (1, 2, 3):
                coordinator.ring()
                # the line is here while the fake has produced exactly n lines: nothing waits for more
                assert next(raw) == b"wake\n"
                assert coordinator.produced == n
    # the site let go: the front lets go of the coordinator too
    assert coordinator.closed.wait(5)


def test_an_upstream_answer_broken_off_is_not_passed_on_as_whole(front: str, client: httpx.Client) -> None:
    with _tracebacks_logged() as tracebacks:
        short = client.get(front + "/site/broken", headers=SITE_TOKEN)  # nothing had reached the site yet: a 502
        assert short.status_code == 502
        assert "the coordinator" in short.text
        with pytest.raises(httpx.RemoteProtocolError):  # mid-stream: the site's stream breaks off too
            client.get(front + "/site/broken-stream", headers=SITE_TOKEN)
    assert tracebacks == []


def _head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: x", *(k + b": " + v for k, v in headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def test_a_site_leaving_mid_upload_is_let_go(
    front: str, superlink: FakeSuperLink, coordinator: FakeCoordinator, client: httpx.Client
) -> None:
    host, port = front.removeprefix("http://").split(":")
    payload = b"/site/blobs/" + b"a" * 64
    with _tracebacks_logged() as tracebacks:
        with socket.create_connection((host, int(port)), timeout=5) as sock:  # a payload streams through ...
            sock.sendall(_head(b"PUT", payload, [(b"Authorization", b"Bearer t"), (b"Content-Length", b"10000000")]))
            sock.sendall(b"\x00" * 200_000)
        # ... so the front drops its upstream request too: the fake coordinator sees a body cut short
        _until(lambda: bool(coordinator.received), 5, "the cut-short payload at the coordinator")
        assert 0 < coordinator.received[0] < 10_000_000
        with socket.create_connection((host, int(port)), timeout=5) as sock:  # a fleet body is read whole first ...
            sock.sendall(_head(b"POST", b"/v1/fleet/push-object", [*signed(), (b"Content-Length", b"3000000")]))
            sock.sendall(b"\x00" * 200_000)
        assert client.post(front + "/v1/fleet/get-run", content=b"\x01", headers=signed()).status_code == 201
        assert superlink.paths() == ["/v1/fleet/get-run"]  # ... so nothing of one cut short reached the SuperLink
    assert tracebacks == []


def test_unreachable_upstreams_give_502_naming_them() -> None:
    served = Served(build_front(_dead_url(), _dead_url()))
    try:
        with _tracebacks_logged() as tracebacks, httpx.Client(timeout=5) as client:
            fleet = client.post(served.url + "/v1/fleet/pull-messages", content=b"\x00", headers=signed())
            site = client.get(served.url + "/site/presence/VA", headers=SITE_TOKEN)
        assert tracebacks == []
        assert fleet.status_code == 502
        assert "the SuperLink" in fleet.text and "unreachable" in fleet.text
        assert "Traceback" not in fleet.text
        assert site.status_code == 502
        assert "the coordinator" in site.text and "unreachable" in site.text
    finally:
        served.stop()


# -- what is refused before a byte is forwarded ----------------------------------------------------------


def _answer_to(url: str, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send ``head`` and ``body`` on a raw connection and read the answer to its end (the front closes it)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head)
        try:
            sock.sendall(body)
        except OSError:  # the front answered and closed before reading it all: what the test wants
            pass
        data = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                data += chunk
    status, _, rest = data.partition(b"\r\n\r\n")
    return int(status.split(b" ", 2)[1]), rest


def test_a_fleet_call_without_a_valid_credential_is_refused_before_forwarding(
    front: str, superlink: FakeSuperLink, client: httpx.Client
) -> None:
    stale = signed(at=datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=10))
    for headers in ([], [(b"flwr-public-key", b"cGs="), (b"flwr-signature", b"c2ln")], stale):
        response = client.post(front + "/v1/fleet/push-object", content=b"\x00" * 1000, headers=headers)
        assert response.status_code == 401 and "SuperNode" in response.text
        assert response.headers["connection"] == "close"
    assert superlink.calls == []


def test_an_oversize_fleet_body_is_refused_without_forwarding_a_byte(front: str, superlink: FakeSuperLink) -> None:
    declared = _head(
        b"POST", b"/v1/fleet/push-object", [*signed(), (b"Content-Length", str(FLEET_BODY_LIMIT + 1).encode())]
    )
    status, body = _answer_to(front, declared, b"\x00" * 65536)
    assert status == 413 and str(FLEET_BODY_LIMIT).encode() in body
    chunk = b"\x00" * 65536
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(FLEET_BODY_LIMIT // len(chunk) + 1))
    status, _ = _answer_to(
        front, _head(b"POST", b"/v1/fleet/push-object", [*signed(), (b"Transfer-Encoding", b"chunked")]), chunked
    )
    assert status == 413
    assert superlink.calls == []


def test_site_routes_are_refused_without_a_token_or_over_their_limit(
    front: str, coordinator: FakeCoordinator, client: httpx.Client
) -> None:
    payload = front + "/site/blobs/" + "a" * 64
    assert client.get(front + "/site/presence/VA").status_code == 401
    assert client.put(payload, content=iter([b"x"]), headers=SITE_TOKEN).status_code == 411  # chunked: no length
    over = {**SITE_TOKEN, "content-length": str(MAX_PAYLOAD_BYTES + 1)}
    status, _ = _answer_to(
        front, _head(b"PUT", payload[len(front) :].encode(), [(k.encode(), v.encode()) for k, v in over.items()])
    )
    assert status == 413
    big = client.post(front + "/site/announce", content=b"{" * (ANNOUNCE_BODY_LIMIT + 1), headers=SITE_TOKEN)
    assert big.status_code == 413
    assert coordinator.calls == []


# -- TLS on both sides ----------------------------------------------------------------------------------


def _self_signed(folder: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = folder / "front.pem", folder / "front.key"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(certfile), str(keyfile)


def test_tls_front_and_tls_superlink(
    tmp_path: Path, fakes: tuple[FakeSuperLink, FakeCoordinator, Served, Served]
) -> None:
    certfile, keyfile = _self_signed(tmp_path)
    tls_superlink = FakeSuperLink()
    upstream = Served(tls_superlink, certfile=certfile, keyfile=keyfile, ca=certfile)
    served = Served(
        build_front(upstream.url, fakes[3].url, superlink_ca=certfile), certfile=certfile, keyfile=keyfile, ca=certfile
    )
    try:
        assert served.url.startswith("https://")
        # connection: close, because uvicorn's TLS shutdown waits on a kept-alive requests connection
        close = {"connection": "close"}
        response = requests.post(
            served.url + "/v1/fleet/get-run",
            data=b"\x00\x01tls",
            verify=certfile,
            headers={k.decode(): v.decode() for k, v in signed()} | close,
            timeout=5,
        )
        assert response.status_code == 201
        assert response.content == b"\x00echo:\x00\x01tls"
        [call] = tls_superlink.calls
        assert dict(call["headers"])[b"flwr-signature"] == dict(signed_by_site := call["headers"])[b"flwr-signature"]
        assert b"flwr-public-key" in dict(signed_by_site)
        refused = requests.post(served.url + "/v1/control/start-run", verify=certfile, headers=close, timeout=5)
        assert refused.status_code == 403
        assert tls_superlink.paths() == ["/v1/fleet/get-run"]
    finally:
        served.stop()
        upstream.stop()


def test_the_front_reads_its_upstreams_in_large_pieces() -> None:
    """Contract: httpcore's HTTP/1.1 connection reads ``READ_NUM_BYTES`` per socket read (an internal the front
    raises to 1 MiB so that a large payload is a few hundred relay trips, not thousands)."""
    import inspect

    import httpcore._async.http11 as http11

    from coordinator.fleet_front import UPSTREAM_READ_BYTES

    assert http11.AsyncHTTP11Connection.READ_NUM_BYTES == UPSTREAM_READ_BYTES
    assert "self.READ_NUM_BYTES" in inspect.getsource(http11.AsyncHTTP11Connection._receive_event)
