"""``/site``: the site agents' routes. A site's own token (``coordinator.registry``) names it; the
federation's shared token (an insecure development federation only) may speak for any site.

A site announces itself (its node and its datasets' metadata) and holds a presence stream open:
while it is open the site counts as online, and down it the coordinator rings the site's doorbell
("wake") when a message for it is on the SuperLink.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from coordinator.blobs import HUB
from coordinator.identity import Refused
from coordinator.registry import RegisteredSite
from coordinator.web import bearer, holds, payload_response, receive_payload, state, typed_body
from flip_core.api import SITE_NAME, SiteAnnouncement

log = logging.getLogger(__name__)

PRESENCE_BEAT_SECONDS = 1.0


def calling_site(request: Request) -> RegisteredSite | None:
    """The registered site whose token this is (None: the insecure federation's shared token); 401 otherwise."""
    flip = state(request)
    who = flip.registry.identify(bearer(request))
    if who is None and not holds(request, flip.config.site_token):
        raise Refused("not authorised: this site's token is not registered here (flip site register)", 401)
    return who


def speaks_for(who: RegisteredSite | None, site: str) -> None:
    if who is not None and site != who.name:
        raise Refused(f"this token belongs to site {who.name!r}, not {site[:70]!r}", 403)


async def announce(request: Request) -> Response:
    who = calling_site(request)
    body: SiteAnnouncement = await typed_body(request, SiteAnnouncement, "the announcement")
    speaks_for(who, body.site)
    if who is not None and body.node_id is not None and body.node_id != who.node_id:
        raise Refused(f"Flower node {body.node_id} is not the node registered for site {who.name!r}", 403)
    state(request).manager.announce(body.site, body.node_id, body.info.model_dump(mode="json"), str(body.state))
    return JSONResponse({"ok": True})


async def presence(request: Request) -> Response:
    who = calling_site(request)
    site = request.path_params["site"]
    speaks_for(who, site)
    if not SITE_NAME.fullmatch(site):
        raise Refused(f"{site[:70]!r} is not a site name", 404)
    manager = state(request).manager

    async def beats() -> AsyncIterator[str]:
        bell = manager.presence.hold(site)
        try:
            yield "beat\n"
            while True:
                try:
                    await asyncio.wait_for(bell.wait(), PRESENCE_BEAT_SECONDS)
                except TimeoutError:
                    yield "beat\n"
                    continue
                bell.clear()
                yield "wake\n"
        finally:
            manager.presence.release(site, bell)
            log.info("site %s: presence stream closed", site)

    return StreamingResponse(beats(), media_type="text/plain")


def _payload_site(request: Request, who: RegisteredSite | None) -> str:
    """The site a payload call is for: the token's own, or (the shared token) the ``site`` it names."""
    if who is not None:
        return who.name
    site = request.query_params.get("site", "")
    if not SITE_NAME.fullmatch(site):
        raise Refused("with the federation's shared token, a payload call names its site (?site=NAME)", 400)
    return site


async def payload(request: Request) -> Response:
    """GET: a payload the round loop published to this site. PUT: this site's reply payload, for the round loop."""
    who = calling_site(request)
    site = _payload_site(request, who)
    blobs = state(request).blobs
    if request.method == "GET":
        return payload_response(blobs.find(HUB, request.path_params["sha"], reader=site), request)
    blob = await receive_payload(request, site, frozenset({HUB}))
    return JSONResponse({"sha256": blob.sha256, "size": blob.size})


def routes() -> list[BaseRoute]:
    return [
        Route("/site/announce", announce, methods=["POST"]),
        Route("/site/presence/{site}", presence),
        Route("/site/blobs/{sha}", payload, methods=["GET", "PUT"]),
    ]
