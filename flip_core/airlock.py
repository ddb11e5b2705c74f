"""The airlock: an item the site's rules hold back, asked for by a researcher, reviewed by a person at the site.

A researcher asks one site to release one item (:class:`ItemKind`: a failed step's traceback, or a per-site query
result with the cells the rules withheld) and says why in a sentence (``%flip_request``). The site holds the item
exactly as it would leave, with automatic checks beside it (``site_agent.disclosure.checks``), until its admin
releases or refuses it (``flip-site airlock``); nothing of it leaves before. A released item leaves with a
:class:`Release`: who asked, why, what it is and its SHA-256, signed with the site's key (ECDSA over SHA-256, the key
the site registered with the hub). The hub only relays it; the notebook checks the signature and the hash
(:func:`verify`) before it shows a byte.

The request and its state travel as federated queries of kinds ``release`` and ``releases``
(``flip_core.query``); this module says what their ``airlock`` field holds. Nothing here does I/O.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flip_core.errors import FlipError

MAX_PURPOSE_CHARS = 500
MIN_PURPOSE_WORDS = 4  # "a sentence": what the item is for, in words a checker can weigh
MAX_ITEM_BYTES = 256 << 10  # the largest item a site holds for review (a traceback is cut to its last part)
MAX_LISTED = 200  # the most requests one listing asks a site about
MAX_PENDING = 20  # the most requests of one researcher a site holds for review at once


class ItemKind(StrEnum):
    TRACEBACK = "traceback"  # the full traceback of a run's failed step at one site, as the task process wrote it
    QUERY = "query"  # a per-site query result, exact, with the cells the disclosure rules withheld
    EVALUATION = "evaluation"  # the report of a run's final evaluation at one site, by the cell's own report()


class ReleaseState(StrEnum):
    PENDING = "pending"  # held at the site for its admin
    RELEASED = "released"
    REFUSED = "refused"  # by the admin (with a reason) or by the site's policy outright


MEDIA_TYPES = {
    ItemKind.TRACEBACK: "text/plain; charset=utf-8",
    ItemKind.QUERY: "text/csv; charset=utf-8",
    ItemKind.EVALUATION: "application/json",
}
REPORT_FUNCTION = "report"  # report(model, data, config): what a cell's final evaluation holds for the airlock


class ReleaseInvalid(FlipError):
    """A released item whose signature or hash does not hold: it is not shown."""


@dataclass(frozen=True)
class ReleaseAsk:
    """What a researcher asks one site to release (the ``airlock`` field of a query of kind ``release``)."""

    request_id: str
    item: ItemKind
    purpose: str
    run: str = ""  # TRACEBACK, EVALUATION: the run whose failed step's traceback, or final report, is asked for
    statistic: str = ""  # QUERY: the query's kind; its dataset, columns, filter and edges are the query's own fields

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ReleaseAsk:
        return cls(**_fields_of(cls, raw))


@dataclass(frozen=True)
class Release:
    """What a site signs when its admin releases an item: the item itself travels beside it, as bytes."""

    request_id: str
    site: str
    item: ItemKind
    media_type: str
    sha256: str  # of the item's bytes
    size: int
    researcher: str
    project: str
    purpose: str
    released_at: float  # seconds since the epoch, at the site
    checker: str  # the person at the site who released it (their login there)
    public_key: str  # the site's public key, OpenSSH text (its fingerprint is the one the hub registered)
    signature: str = ""  # base64 of the ECDSA signature over :func:`signed_bytes`

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Release:
        return cls(**_fields_of(cls, raw))


@dataclass
class RequestState:
    """One request as the researcher sees it: its state, the reason of a refusal, and a released item."""

    request_id: str
    site: str
    item: ItemKind
    purpose: str
    state: ReleaseState
    reason: str = ""  # a refusal's, the admin's or the policy's words
    asked_at: float = 0.0
    decided_at: float = 0.0
    release: dict[str, Any] = field(default_factory=dict)  # Release.to_dict() once released and fetched
    content: str = ""  # base64 of the item's bytes, once released and fetched


def _fields_of(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    """``raw``'s entries that are fields of the dataclass ``cls`` (others are ignored), its ``item`` typed."""
    head = {k: v for k, v in raw.items() if k in {f.name for f in fields(cls)}}
    head["item"] = ItemKind(head["item"])
    return head


def signed_bytes(release: Release) -> bytes:
    """The bytes a release's signature covers: every field but the signature, canonical JSON."""
    head = {k: v for k, v in release.to_dict().items() if k != "signature"}
    return json.dumps(head, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sign(release: Release, key: ec.EllipticCurvePrivateKey) -> Release:
    """``release`` with its signature by the site's private key."""
    signature = key.sign(signed_bytes(release), ec.ECDSA(hashes.SHA256()))
    return Release(**{**release.to_dict(), "signature": base64.b64encode(signature).decode()})


def public_key_text(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def key_fingerprint(public_key: str) -> str:
    """``sha256:<hex>`` of an OpenSSH public key's blob: the fingerprint ``flip site register`` recorded."""
    blob = base64.b64decode(public_key.split()[1])
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def verify(release: Release, content: bytes, registered: str = "") -> None:
    """Raise :class:`ReleaseInvalid` unless ``content`` is the item ``release`` names and its signature holds
    (and, given ``registered``, the key is the one the hub registered for the site)."""
    what = f"the item {release.site} released for request {release.request_id}"
    if sha256(content) != release.sha256 or len(content) != release.size:
        raise ReleaseInvalid(f"{what} is not the item its site signed (its hash differs): it is not shown")
    try:
        key = serialization.load_ssh_public_key(release.public_key.encode())
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError("not an ECDSA key")
        key.verify(base64.b64decode(release.signature), signed_bytes(release), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, IndexError) as exc:
        raise ReleaseInvalid(
            f"{what} carries no valid signature of its site ({type(exc).__name__}): not shown"
        ) from None
    if registered and key_fingerprint(release.public_key) != registered:
        raise ReleaseInvalid(f"{what} is signed by a key the hub did not register for {release.site}: not shown")


def cut_text(text: str) -> str:
    """``text`` in at most :data:`MAX_ITEM_BYTES` of UTF-8: its end (a traceback's end says what failed), with a
    first line saying how much of its start was cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= MAX_ITEM_BYTES:
        return text
    kept = data[-(MAX_ITEM_BYTES - 200) :].decode("utf-8", "ignore")
    return (
        f"[... the start of this text was cut: its last {len(kept.encode())} of {len(data)} bytes follow ...]\n{kept}"
    )


def purpose_problem(purpose: str) -> str:
    """Why ``purpose`` does not say what the item is for ("" when it does)."""
    if any(not (c.isprintable() or c == " ") for c in purpose):
        return "plain text only, in one line (no control characters: they could hide what it says on a terminal)"
    words = purpose.split()
    if len(words) < MIN_PURPOSE_WORDS:
        return f"say in a sentence (at least {MIN_PURPOSE_WORDS} words) what the item is for and why you need it"
    if len(purpose) > MAX_PURPOSE_CHARS:
        return f"a purpose of at most {MAX_PURPOSE_CHARS} characters, please"
    return ""


__all__ = [
    "MAX_ITEM_BYTES",
    "MAX_LISTED",
    "MAX_PENDING",
    "MEDIA_TYPES",
    "REPORT_FUNCTION",
    "ItemKind",
    "Release",
    "ReleaseAsk",
    "ReleaseInvalid",
    "ReleaseState",
    "RequestState",
    "cut_text",
    "key_fingerprint",
    "public_key_text",
    "purpose_problem",
    "sha256",
    "sign",
    "signed_bytes",
    "verify",
]
