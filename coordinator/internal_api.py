"""``/internal``: the routes of FLIP's ServerApp on the hub host (the internal token only).

The round loop reads its run's task and initial model here, streams the run's events, rings the
sites whose message is waiting on the SuperLink, and stores the final model.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from coordinator.identity import Refused
from coordinator.web import error, holds, model_body, state, typed_body
from flip_core.api import Event, Events, Ring


def _internal(request: Request) -> None:
    if not holds(request, state(request).config.internal_token):
        raise Refused("not authorised", 401)


async def task(request: Request) -> Response:
    _internal(request)
    run = state(request).manager.store.run(request.path_params["run_id"])
    if run is None:
        return error("no such run", 404)
    return JSONResponse(run["task"])


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
    sha = state(request).manager.store.put_model(await model_body(request))
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


def routes() -> list[BaseRoute]:
    return [
        Route("/internal/runs/{run_id}/task", task),
        Route("/internal/models/{sha}", model),
        Route("/internal/runs/{run_id}/model", put_model, methods=["PUT"]),
        Route("/internal/runs/{run_id}/events", events, methods=["POST"]),
        Route("/internal/sites", sites),
        Route("/internal/ring", ring, methods=["POST"]),
    ]
