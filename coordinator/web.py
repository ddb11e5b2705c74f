"""What the coordinator's three route groups share: the application's state, reading a bounded body
into a typed request (``flip_core.api``), an uploaded model's check, and the callers' tokens.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from coordinator.airlock import AirlockDesk
from coordinator.blobs import ACCEL_HEADER, ACCEL_PREFIX, Blob, BlobStore, spool, spool_path
from coordinator.config import CoordinatorConfig, TokenGrant
from coordinator.identity import HubIdentity, Refused
from coordinator.queries import QueryDesk
from coordinator.registry import SiteRegistry
from coordinator.service import RunManager
from flip_core.api import MAX_JSON_BYTES, parse
from flip_core.codec import ModelInvalid, check_model
from flip_core.errors import RequestInvalid

log = logging.getLogger(__name__)


class Notifier:
    """Wakes every waiting event stream when something new is stored (thread-safe)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def current(self) -> asyncio.Event:
        if self._event is None:
            self._loop = asyncio.get_running_loop()
            self._event = asyncio.Event()
        return self._event

    def notify(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        if self._event is not None:
            self._event.set()
        self._event = asyncio.Event()


@dataclass(frozen=True)
class Coordinator:
    """What every route reaches through ``request.app.state.flip``."""

    config: CoordinatorConfig
    manager: RunManager
    notifier: Notifier
    identity: HubIdentity | None
    headless: Callable[[], Mapping[str, TokenGrant]]
    registry: SiteRegistry
    queries: QueryDesk
    blobs: BlobStore
    airlock: AirlockDesk


def state(request: Request) -> Coordinator:
    flip: Coordinator = request.app.state.flip
    return flip


PAYLOAD_CHUNK = 4 << 20  # bytes read from disk and written to the socket at a time


def payload_response(blob: Blob, request: Request | None = None) -> Response:
    """A stored bulk payload as the answer, with its length, in large chunks read off the event loop; or, to
    the nginx front (which says so in ``ACCEL_HEADER``), only where the file is: nginx sends it itself."""
    if request is not None and request.headers.get(ACCEL_HEADER) == "1":
        where = f"{ACCEL_PREFIX}{blob.owner}/{blob.sha256}"
        return Response(headers={"X-Accel-Redirect": where}, media_type="application/octet-stream")

    async def chunks() -> AsyncIterator[bytes]:
        with open(blob.path, "rb") as source:
            while chunk := await asyncio.to_thread(source.read, PAYLOAD_CHUNK):
                yield chunk

    response = StreamingResponse(chunks(), media_type="application/octet-stream")
    response.headers["content-length"] = str(blob.size)
    return response


async def receive_payload(request: Request, owner: str, readers: frozenset[str]) -> Blob:
    """Store the request's body as the payload its path names (``sha``), streamed and checked as it comes."""
    length = request.headers.get("content-length")
    size = int(length) if length is not None and length.isdigit() else None
    try:
        return await state(request).blobs.receive(owner, request.path_params["sha"], size, request.stream(), readers)
    except ClientDisconnect:  # the sender went away mid-upload: nothing was kept, and nobody is left to tell
        raise Refused("the upload broke off before its last byte: nothing was stored", 400) from None


def error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def bearer(request: Request) -> str:
    """The token of ``Authorization: Bearer T`` (or JupyterHub's ``token T``)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() in ("bearer", "token") else ""


def holds(request: Request, secret: str) -> bool:
    token = bearer(request)
    return bool(token) and bool(secret) and hmac.compare_digest(token, secret)


def _declared(request: Request, limit: int, what: str) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestInvalid(f"{what} is {declared} bytes, more than the {limit} this route takes", status=413)


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The request's body, refused (413) once it passes ``limit`` bytes, before it is all read."""
    _declared(request, limit, what)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestInvalid(f"{what} is more than the {limit} bytes this route takes", status=413)
            chunks.append(chunk)
    except ClientDisconnect:  # the caller went away (or was dropped for its silence): nobody is left to answer
        raise RequestInvalid(f"{what} broke off before its last byte", status=400) from None
    return b"".join(chunks)


async def typed_body(request: Request, model: Any, what: str) -> Any:
    """The JSON body as ``model`` (``flip_core.api``), or a refusal whose sentence names the field."""
    body = await read_body(request, MAX_JSON_BYTES, what)
    if not body.strip():
        raise RequestInvalid(f"{what} is empty: send a JSON body")
    return parse(model, body, what)


UPLOAD_WINDOW = 24 * 3600.0  # the seconds a researcher's upload quota counts back
_uploading: set[str] = set()  # the researchers with an upload in flight (one at a time each: the event loop's own)


async def receive_model(request: Request, owner: str | None = None) -> str:
    """Store an uploaded model; its SHA-256. The body is written to a file as it arrives (never whole in memory),
    refused (413) once it passes the coordinator's largest model, and checked to be an ``.npz`` of numeric arrays
    (``flip_core.codec.check_model``, reading the file record by record) before it is kept: any other bytes are a
    400 sentence. A researcher's (``owner``) uploads of new models count against a quota a day and go one at a time,
    so that no researcher fills the hub's disk (the ServerApp's, ``owner`` None, are the run's own)."""
    flip = state(request)
    limit, store = flip.config.max_model_bytes, flip.manager.store
    _declared(request, limit, "the model")
    if owner is not None:
        if owner in _uploading:
            raise RequestInvalid("one model upload at a time: another of yours is still arriving", status=429)
        quota, now = flip.config.upload_quota, time.time()
        left = quota - await asyncio.to_thread(store.uploaded_since, owner, now - UPLOAD_WINDOW)
        if left < limit:  # the quota is the nearer bound: its sentence, before a byte is read where it can be
            over = RequestInvalid(
                f"the model passes what is left of your upload quota ({max(left, 0)} of {quota} bytes a day): "
                "nothing was stored",
                status=413,
            )
            declared = request.headers.get("content-length", "")
            if left <= 0 or (declared.isdigit() and int(declared) > left):
                raise over
            limit = left
    upload = spool_path(store.uploads, "model")
    if owner is not None:
        _uploading.add(owner)
    try:
        if owner is None or limit == flip.config.max_model_bytes:
            over = RequestInvalid(f"the model is more than the {limit} bytes this route takes", status=413)
        sha, size = await spool(request.stream(), upload, limit, over)
        await asyncio.to_thread(check_model, upload, limit)
        stored = store.model_path(sha).exists()  # the same bytes again take no more of the disk: not counted
        kept = store.adopt_model(upload, sha)
        if owner is not None and not stored:
            await asyncio.to_thread(store.record_upload, owner, sha, size, time.time())
        return kept
    except ModelInvalid as exc:
        raise RequestInvalid(str(exc), field="body") from None
    except ClientDisconnect:
        raise RequestInvalid("the model broke off before its last byte: nothing was stored", status=400) from None
    finally:
        upload.unlink(missing_ok=True)
        if owner is not None:
            _uploading.discard(owner)


def query_int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or len(raw) > 18:
        raise RequestInvalid(
            f"the query parameter {name!r} must be a whole number from 0, not {raw[:40]!r}", field=name
        )
    return int(raw)
