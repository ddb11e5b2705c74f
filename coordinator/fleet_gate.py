"""What the fleet front checks of a request before it forwards a byte: that the caller carries a credential its
upstream could accept, and that the body fits its route.

Credentials. Flower 1.42's SuperLink reads a fleet call's whole body and parses it before it checks who sent it
(``flwr/superlink/routers/fleet/node_auth.py`` runs after the protobuf route has read the request), so a body of
any size from anyone was held in its memory (measured: 300 MB unauthenticated took it from 142 MB to 727 MB, kept
after its 400). A SuperNode signs each call: ``flwr-public-key`` (base64 of its PEM SubjectPublicKeyInfo),
``flwr-timestamp`` (ISO 8601 with a UTC offset) and ``flwr-signature`` (base64 of an ECDSA/SHA-256 signature of the
timestamp's ASCII bytes); the SuperLink takes a timestamp less than 305 s old and at most 5 s ahead, a key it has
registered, and a body naming that key's node. This front checks the same headers the same way (about 0.3 ms a
call) and, given the hub's site register (``coordinator.registry``), that the key is a registered site's (by its
fingerprint, as ``flip site register`` recorded it). Only the node id inside the body is left to the SuperLink. A
site route (``/site/...``) must carry a bearer token; the coordinator checks whose it is before it reads a body.

Sizes (a body over its route's limit is refused with 413, by its Content-Length before anything is read, or, sent
without one, as soon as it passes the limit; a fleet body is read whole before it is forwarded):

- ``POST /v1/fleet/*``: 4 MiB. The largest fleet body FLIP sends is a ``PushObject`` holding a step's reply inline
  (``flip_core.wire.INLINE_LIMIT``, 1 MiB, plus 134 bytes of framing, measured); a larger payload travels beside
  its message through ``/site/blobs`` (``flip_core.bulk``). Flower's own largest object, an array chunk, is 5 MiB
  (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``), which FLIP's messages never hold.
- ``PUT /site/blobs/SHA``: the coordinator's largest payload (its largest model and a step's header), and a
  Content-Length is required (411), as the coordinator requires it;
- ``POST /site/announce``: the coordinator's JSON limit (``flip_core.api.MAX_JSON_BYTES``);
- any other site route: 64 KiB.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.registry import SiteRegistry
from flip_core.api import MAX_JSON_BYTES

__all__ = [
    "ANNOUNCE_BODY_LIMIT",
    "FLEET_BODY_LIMIT",
    "SIGNED_ABOVE",
    "SITE_BODY_LIMIT",
    "Gate",
    "Refusal",
    "key_fingerprint",
]

FLEET_BODY_LIMIT = 4 << 20
SITE_BODY_LIMIT = 64 << 10
SIGNED_ABOVE = 64 << 10  # a fleet body that may be larger is forwarded only once its signature holds
ANNOUNCE_BODY_LIMIT = MAX_JSON_BYTES
PUBLIC_KEY, SIGNATURE, TIMESTAMP = b"flwr-public-key", b"flwr-signature", b"flwr-timestamp"
# flwr.common.constant's TIMESTAMP_TOLERANCE and SYSTEM_TIME_TOLERANCE (tests/coordinator/test_fleet_gate.py
# fails if they move)
TIMESTAMP_TOLERANCE = 300
SYSTEM_TIME_TOLERANCE = 5
_LONGEST = {PUBLIC_KEY: 4096, SIGNATURE: 1024, TIMESTAMP: 64}  # far above a P-521 key's and signature's sizes
_KEYS_KEPT = 1024  # parsed keys remembered (each site sends its one key with every call)

FLEET = "/v1/fleet/"
ACTIVATE = "/v1/fleet/activate-node"
NOT_REGISTERED = "its SuperNode key is not a registered site's"
# What the SuperLink answers a well-signed activation of a key it has not registered (flwr's ApiErrorCode
# FLEET_NODE_ACTIVATION_FAILED, HTTP 412, in its JSON error shape): a SuperNode then stops with that reason, where
# a 401 would make it interrupt itself (flwr/supercore/retry/http_retry.py) without one.
_ACTIVATION_FAILED = 2004
SITE = "/site/"
BLOBS = "/site/blobs/"
ANNOUNCE = "/site/announce"


@dataclass(frozen=True)
class Refusal:
    """An answer the front gives instead of forwarding: its status, its sentence and the sentence's type."""

    status: int
    sentence: str
    media_type: str = "text/plain"


def key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """``sha256:<hex>`` of the key's OpenSSH blob: what ``flip_core.certs.fingerprint`` records of its public file."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return "sha256:" + hashlib.sha256(base64.b64decode(line.split()[1])).hexdigest()


class Gate:
    """The front's checks. ``registry``: the coordinator's site register (None: any key whose signature holds is
    let through to the SuperLink, which checks that it is registered); ``max_payload_bytes``: the largest payload
    the coordinator takes; ``clock``: the time now (UTC)."""

    def __init__(
        self,
        registry: Path | None,
        max_payload_bytes: int,
        clock: Callable[[], datetime.datetime] | None = None,
    ) -> None:
        self.registry = SiteRegistry(registry) if registry is not None else None
        self.max_payload_bytes = max_payload_bytes
        self.clock = clock or (lambda: datetime.datetime.now(tz=datetime.UTC))
        self._keys: dict[bytes, tuple[ec.EllipticCurvePublicKey, str]] = {}

    def body_limit(self, method: str, path: str) -> int:
        if path.startswith(FLEET):
            return FLEET_BODY_LIMIT
        if path.startswith(BLOBS) and method == "PUT":
            return self.max_payload_bytes
        if path == ANNOUNCE:
            return ANNOUNCE_BODY_LIMIT
        return SITE_BODY_LIMIT

    def refusal(self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]]) -> Refusal | None:
        """Why this request is not forwarded (None: forward it): its credential first, then its declared size."""
        if path.startswith(FLEET):
            why = self.credential_problem(headers, signed=path == ACTIVATE or not _declared_small(headers))
            if why == NOT_REGISTERED and path == ACTIVATE:
                return _activation_refused(why)
            if why:
                return Refusal(401, f"refused before forwarding: {why}\n")
        elif not _has_bearer(headers):
            return Refusal(401, "refused before forwarding: a site route needs the site's token (Authorization)\n")
        limit = self.body_limit(method, path)
        lengths = [value for key, value in headers if key == b"content-length"]
        if len(lengths) > 1:
            return Refusal(400, "a request may declare one Content-Length\n")
        if lengths and (not lengths[0].isdigit() or int(lengths[0]) > limit):
            return Refusal(413, f"this route takes a body of at most {limit} bytes; nothing was forwarded\n")
        if not lengths and path.startswith(BLOBS) and method == "PUT":
            return Refusal(411, "a payload upload needs a Content-Length\n")
        return None

    def credential_problem(self, headers: Sequence[tuple[bytes, bytes]], signed: bool = True) -> str:
        """What is wrong with a fleet call's SuperNode credential, as Flower's SuperLink would find it ("": nothing).

        ``signed``: check the signature too. The front checks it for a call whose body may pass
        :data:`SIGNED_ABOVE` (the SuperLink reads a whole body before it checks who sent it); a smaller call's
        signature is the SuperLink's to check, as every call's is, which spares the front an ECDSA verification on
        each of the many small calls of a round (a tenth of its time, profiled)."""
        found: dict[bytes, list[bytes]] = {PUBLIC_KEY: [], SIGNATURE: [], TIMESTAMP: []}
        for name, value in headers:
            if name in found:
                found[name].append(value)
        for name, values in found.items():
            if len(values) != 1 or not 0 < len(values[0]) <= _LONGEST[name]:
                return f"a fleet call carries one {name.decode()} header (SuperNode authentication)"
        try:
            pem = base64.b64decode(found[PUBLIC_KEY][0], validate=True)
            signature = base64.b64decode(found[SIGNATURE][0], validate=True)
            stamp = found[TIMESTAMP][0].decode("ascii")
            age = (self.clock() - datetime.datetime.fromisoformat(stamp)).total_seconds()
        except (binascii.Error, ValueError, TypeError):  # TypeError: a timestamp without its UTC offset
            return "its SuperNode credential is malformed"
        if not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
            return "its SuperNode credential's timestamp is outside the allowed window"
        known = self._key(pem)
        if known is None:
            return "its SuperNode credential does not hold an EC public key"
        key, fingerprint = known
        try:
            if signed:
                key.verify(signature, stamp.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return "its SuperNode credential's signature does not hold"
        if self.registry is not None and fingerprint not in {s.key_fingerprint for s in self.registry.sites()}:
            return NOT_REGISTERED
        return ""

    def _key(self, pem: bytes) -> tuple[ec.EllipticCurvePublicKey, str] | None:
        known = self._keys.get(pem)
        if known is not None:
            return known
        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            return None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return None
        if len(self._keys) >= _KEYS_KEPT:
            self._keys.clear()
        self._keys[pem] = known = (key, key_fingerprint(key))
        return known


def _activation_refused(why: str) -> Refusal:
    """The refusal of an unregistered key's activation, as the SuperLink gives it, with the front's reason."""
    body = {
        "code": _ACTIVATION_FAILED,
        "detail": "Failed to activate SuperNode.",
        "extra": f"the hub's fleet front: {why}",
    }
    return Refusal(412, json.dumps(body), "application/json")


def _declared_small(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """The call declares a body of at most :data:`SIGNED_ABOVE` bytes (one Content-Length; chunked is not small)."""
    lengths = [value for key, value in headers if key == b"content-length"]
    return len(lengths) == 1 and lengths[0].isdigit() and int(lengths[0]) <= SIGNED_ABOVE


def _has_bearer(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    for key, value in headers:
        if key == b"authorization":
            scheme, _, token = value.partition(b" ")
            return scheme.lower() in (b"bearer", b"token") and bool(token.strip())
    return False
