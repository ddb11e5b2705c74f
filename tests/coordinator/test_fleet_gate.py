"""The fleet front's gate (``coordinator.fleet_gate``): which credentials and body sizes pass before a byte is
forwarded. Pure checks over headers; Flower's own signer and constants are the contract."""

from __future__ import annotations

import base64
import datetime
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from coordinator.fleet_gate import (
    ANNOUNCE_BODY_LIMIT,
    FLEET_BODY_LIMIT,
    SIGNED_ABOVE,
    SITE_BODY_LIMIT,
    SYSTEM_TIME_TOLERANCE,
    TIMESTAMP_TOLERANCE,
    Gate,
    key_fingerprint,
)
from coordinator.registry import SiteRegistry
from flip_core.certs import fingerprint, make_site_keys

NOW = datetime.datetime(2026, 12, 1, 12, 0, 0, tzinfo=datetime.UTC)
KEY = ec.generate_private_key(ec.SECP384R1())
Headers = list[tuple[bytes, bytes]]


def signed(key: ec.EllipticCurvePrivateKey = KEY, stamp: str | None = None, message: str | None = None) -> Headers:
    stamp = NOW.isoformat() if stamp is None else stamp
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signature = key.sign((message or stamp).encode("ascii"), ec.ECDSA(hashes.SHA256()))
    return [
        (b"flwr-public-key", base64.b64encode(pem)),
        (b"flwr-timestamp", stamp.encode()),
        (b"flwr-signature", base64.b64encode(signature)),
    ]


def gate(registry: Path | None = None) -> Gate:
    return Gate(registry, 1 << 30, clock=lambda: NOW)


def replaced(headers: Headers, name: bytes, value: bytes | None) -> Headers:
    kept = [(k, v) for k, v in headers if k != name]
    return kept if value is None else [*kept, (name, value)]


def test_a_signed_fleet_call_passes() -> None:
    assert gate().credential_problem(signed()) == ""
    assert gate().refusal("POST", "/v1/fleet/pull-messages", [*signed(), (b"content-length", b"10")]) is None


def test_flowers_own_signer_passes_the_gate() -> None:
    """Contract: the headers Flower 1.42's SuperNode interceptor attaches are what the gate checks."""
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    request = httpx.Request("POST", "https://hub/v1/fleet/pull-messages", content=b"x")
    context = type("Context", (), {"request": request, "rpc_method": "x", "message": None})()
    NodeAuthHttpInterceptor(KEY, KEY.public_key()).intercept(context, lambda ctx: httpx.Response(200))  # type: ignore[arg-type]
    headers = [(k.lower(), v) for k, v in request.headers.raw]
    assert Gate(None, 1).credential_problem(headers) == ""


def test_the_window_is_flowers() -> None:
    from flwr.common.constant import SYSTEM_TIME_TOLERANCE as DRIFT
    from flwr.common.constant import TIMESTAMP_TOLERANCE as WINDOW

    assert (TIMESTAMP_TOLERANCE, SYSTEM_TIME_TOLERANCE) == (WINDOW, DRIFT)


OTHER = ec.generate_private_key(ec.SECP256R1())


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ([], "one flwr-public-key"),
        (replaced(signed(), b"flwr-signature", None), "one flwr-signature"),
        (replaced(signed(), b"flwr-timestamp", None), "one flwr-timestamp"),
        ([*signed(), (b"flwr-signature", b"AAAA")], "one flwr-signature"),
        (replaced(signed(), b"flwr-public-key", b"not base64!"), "malformed"),
        (replaced(signed(), b"flwr-public-key", b"A" * 5000), "one flwr-public-key"),
        (replaced(signed(), b"flwr-signature", b"***"), "malformed"),
        (signed(stamp="yesterday"), "malformed"),
        (signed(stamp="2026-12-01T12:00:00"), "malformed"),  # no UTC offset: Flower cannot compare it either
        (signed(stamp=(NOW - datetime.timedelta(seconds=306)).isoformat()), "window"),
        (signed(stamp=(NOW + datetime.timedelta(seconds=6)).isoformat()), "window"),
        (signed(message="another time"), "signature"),
        (replaced(signed(), b"flwr-public-key", signed(OTHER)[0][1]), "signature"),
        (replaced(signed(), b"flwr-public-key", base64.b64encode(b"-----BEGIN PUBLIC KEY-----\nAAAA\n")), "EC public"),
    ],
)
def test_a_credential_the_superlink_would_refuse_is_refused(headers: Headers, why: str) -> None:
    problem = gate().credential_problem(headers)
    assert why in problem, problem
    large = str(SIGNED_ABOVE + 1).encode()  # a body the SuperLink would read whole before checking the signature
    refusal = gate().refusal("POST", "/v1/fleet/push-object", [*headers, (b"content-length", large)])
    assert refusal is not None and refusal.status == 401


def test_a_small_calls_signature_is_left_to_the_superlink_and_everything_else_is_checked() -> None:
    forged = signed(message="another time")  # well-formed, in the window, but signed over another text
    small = [*forged, (b"content-length", str(SIGNED_ABOVE).encode())]
    assert gate().refusal("POST", "/v1/fleet/push-object", small) is None  # the SuperLink refuses it (64 KiB read)
    chunked = [*forged, (b"transfer-encoding", b"chunked")]
    refused = gate().refusal("POST", "/v1/fleet/push-object", chunked)
    assert refused is not None and refused.status == 401  # a body of unknown size is never forwarded unsigned
    activation = gate().refusal("POST", "/v1/fleet/activate-node", small)
    assert activation is not None and activation.status == 401
    unsigned = replaced(forged, b"flwr-signature", None)
    refused = gate().refusal("POST", "/v1/fleet/push-object", [*unsigned, (b"content-length", b"1")])
    assert refused is not None and refused.status == 401  # no credential at all: refused whatever the size


def test_an_rsa_key_is_refused() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    headers = replaced(signed(), b"flwr-public-key", base64.b64encode(pem))
    assert "EC public key" in gate().credential_problem(headers)


def test_with_the_register_only_registered_keys_pass(tmp_path: Path) -> None:
    keys = make_site_keys(tmp_path / "keys", "VA")
    registry = SiteRegistry(tmp_path / "sites.json")
    registry.register("VA", 7, fingerprint(keys.public))
    private = serialization.load_ssh_private_key(keys.private.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert key_fingerprint(private.public_key()) == fingerprint(keys.public)
    checked = gate(tmp_path / "sites.json")
    assert checked.credential_problem(signed(private)) == ""
    assert "not a registered site's" in checked.credential_problem(signed())  # a key of its own, well signed
    assert "not a registered site's" in gate(tmp_path / "none.json").credential_problem(signed(private))


@pytest.mark.parametrize(
    ("method", "path", "limit"),
    [
        ("POST", "/v1/fleet/push-object", FLEET_BODY_LIMIT),
        ("PUT", "/site/blobs/" + "a" * 64, 1 << 30),
        ("GET", "/site/blobs/" + "a" * 64, SITE_BODY_LIMIT),
        ("POST", "/site/announce", ANNOUNCE_BODY_LIMIT),
        ("GET", "/site/presence/VA", SITE_BODY_LIMIT),
    ],
)
def test_each_route_has_its_body_limit(method: str, path: str, limit: int) -> None:
    credential = signed() if path.startswith("/v1/") else [(b"authorization", b"Bearer t")]
    assert gate().body_limit(method, path) == limit
    assert gate().refusal(method, path, [*credential, (b"content-length", str(limit).encode())]) is None
    over = gate().refusal(method, path, [*credential, (b"content-length", str(limit + 1).encode())])
    assert over is not None and over.status == 413 and str(limit) in over.sentence


def test_declared_lengths_must_be_one_whole_number() -> None:
    for lengths in ([b"1", b"1"], [b"-1"], [b"1e3"], [b" 5"]):
        headers = [*signed(), *((b"content-length", n) for n in lengths)]
        refusal = gate().refusal("POST", "/v1/fleet/x", headers)
        assert refusal is not None and refusal.status in (400, 413)


def test_a_site_route_needs_a_token_and_a_payload_its_length() -> None:
    assert gate().refusal("GET", "/site/presence/VA", [])
    assert gate().refusal("GET", "/site/presence/VA", [(b"authorization", b"Bearer ")])
    assert gate().refusal("GET", "/site/presence/VA", [(b"authorization", b"Basic eA==")])
    refusal = gate().refusal("PUT", "/site/blobs/" + "a" * 64, [(b"authorization", b"Bearer t")])
    assert refusal is not None and refusal.status == 411


def test_the_fleet_limit_leaves_room_above_flips_largest_fleet_body() -> None:
    """The largest fleet body FLIP sends: a PushObject holding a step inline (flip_core.wire.INLINE_LIMIT)."""
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.proto.node_pb2 import Node

    from flip_core.wire import INLINE_LIMIT, RECORD, blob_to_content

    record = blob_to_content(b"\xff" * INLINE_LIMIT)[RECORD]
    request = PushObjectRequest(
        node=Node(node_id=2**63), run_id=2**63, object_id="a" * 64, object_content=record.deflate()
    )
    largest = len(request.SerializeToString())
    assert INLINE_LIMIT < largest < INLINE_LIMIT + 1024
    assert FLEET_BODY_LIMIT >= 3 * largest


def test_an_unregistered_keys_activation_is_refused_as_the_superlink_refuses_it(tmp_path: Path) -> None:
    """Contract: a SuperNode told 412 with Flower's JSON error stops with the reason (FLIP's agent then says
    which key to register); a 401 would make Flower's client interrupt its own process without one."""
    from flwr.supercore.error.base import ApiErrorCode, FlowerError

    checked = gate(tmp_path / "sites.json")
    refusal = checked.refusal("POST", "/v1/fleet/activate-node", [*signed(), (b"content-length", b"10")])
    assert refusal is not None and refusal.status == 412 and refusal.media_type == "application/json"
    error = FlowerError.from_json(refusal.sentence)
    assert error is not None and error.code == ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED
    assert error.public_details is not None and "not a registered site's" in error.public_details
    other = checked.refusal("POST", "/v1/fleet/pull-messages", [*signed(), (b"content-length", b"10")])
    assert other is not None and other.status == 401  # any other call: the SuperLink's 401
