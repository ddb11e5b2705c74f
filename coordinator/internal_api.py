"""``/internal``: the routes of FLIP's ServerApp on the hub host (the internal token only).

The round loop reads its run's task and initial model here, streams the run's events, rings the
sites whose message is waiting on the SuperLink, and stores the final model. The query line takes
researchers' queries here and hands back the sites' replies.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from coordinator.blobs import HUB
from coordinator.identity import Refused
from coordinator.web import error, holds, payload_response, query_int, receive_model, receive_payload, state, typed_body
from flip_core.api import Event, Events, QueryReplies, Ring
from flip_core.errors import RequestInvalid


def _internal(request: Request) -> None:
    if not holds(request, state(request).config.internal_token):
        raise Refused("not authorised", 401)


async def task(request: Request) -> Response:
    _internal(request)
    run = state(request).manager.store.run(request.path_params["run_id"])
    if run is None:
        return error("no such run", 404)
    return Response(run.task.model_dump_json(exclude_unset=True), media_type="application/json")


async def model(request: Request) -> Response:
    _internal(request)
    try:
        path = state(request).manager.store.model_path(request.path_params["sha"])
    except KeyError:
        return error("no such model", 404)
    if not path.exists():
        return error("no such model", 404)
    return FileResponse(path, media_type="application/octet-stream")


async def put_model(request: Request) -> Response:
    _internal(request)
    sha = await receive_model(request)
    return JSONResponse({"sha256": sha})


async def events(request: Request) -> Response:
    _internal(request)
    parsed: list[Event] = await typed_body(request, Events, "the events")
    state(request).manager.ingest(
        request.path_params["run_id"], [e.model_dump(mode="json", exclude_unset=True) for e in parsed]
    )
    return JSONResponse({"ok": True})


async def sites(request: Request) -> Response:
    _internal(request)
    return JSONResponse(state(request).manager.sites())


async def ring(request: Request) -> Response:
    _internal(request)
    body: Ring = await typed_body(request, Ring, "the ring")
    for name in body.sites:
        state(request).manager.presence.ring(name)  # a message for it is on the SuperLink again (no new event)
    return JSONResponse({"ok": True})


async def next_query(request: Request) -> Response:
    """The query line's next query (200), or nothing within ``wait`` seconds (204)."""
    _internal(request)
    raw = request.query_params.get("line", "")
    if not raw.isdigit() or len(raw) > 20:  # a Flower run id: unsigned 64-bit
        raise RequestInvalid(f"the query parameter 'line' must be a Flower run id, not {raw[:40]!r}", field="line")
    line, wait = int(raw), min(query_int(request, "wait", 10), 30)
    found = await asyncio.to_thread(state(request).queries.next, line, float(wait))
    return Response(status_code=204) if found is None else JSONResponse(found)


async def query_replies(request: Request) -> Response:
    _internal(request)
    body: QueryReplies = await typed_body(request, QueryReplies, "the replies")
    state(request).queries.answer(request.path_params["query_id"], [r.model_dump(mode="json") for r in body])
    return JSONResponse({"ok": True})


async def publish_payload(request: Request) -> Response:
    """The round loop publishes a step's payload for the sites named in ``readers`` (comma-separated)."""
    _internal(request)
    readers = frozenset(r for r in request.query_params.get("readers", "").split(",") if r)
    blob = await receive_payload(request, HUB, readers)
    return JSONResponse({"sha256": blob.sha256, "size": blob.size})


async def payload(request: Request) -> Response:
    """A payload a site uploaded (owner: its name) or the hub published; DELETE drops it once read."""
    _internal(request)
    owner, sha = request.path_params["owner"], request.path_params["sha"]
    if request.method == "DELETE":
        return JSONResponse({"deleted": state(request).blobs.delete(owner, sha)})
    return payload_response(state(request).blobs.find(owner, sha))


def routes() -> list[BaseRoute]:
    return [
        Route("/internal/runs/{run_id}/task", task),
        Route("/internal/models/{sha}", model),
        Route("/internal/runs/{run_id}/model", put_model, methods=["PUT"]),
        Route("/internal/runs/{run_id}/events", events, methods=["POST"]),
        Route("/internal/sites", sites),
        Route("/internal/blobs/{sha}", publish_payload, methods=["PUT"]),
        Route("/internal/blobs/{owner}/{sha}", payload, methods=["GET", "DELETE"]),
        Route("/internal/ring", ring, methods=["POST"]),
        Route("/internal/queries/next", next_query),
        Route("/internal/queries/{query_id}/replies", query_replies, methods=["POST"]),
    ]
