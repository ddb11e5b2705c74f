"""``/api``: the researchers' routes. Every one but ``/api/health`` names its caller first
(:func:`caller`): a hub token of a hub user, or a headless token, and the project it acts in.

Run events reach notebooks as server-sent events; a notebook that reconnects asks for those
after the last sequence number it saw.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from coordinator.identity import Caller, Refused, choose_project, static_caller
from coordinator.models import fit_glm
from coordinator.service import Principal, TaskRejected
from coordinator.survival import survival
from coordinator.web import bearer, error, query_int, receive_model, state, typed_body
from flip_core.api import PROJECT_HEADER, CohortSpec, QuerySpec, ReleaseSpec, TaskSpec
from flip_core.errors import RequestInvalid
from flip_core.models import GlmSpec, SurvivalSpec
from flip_core.runs import record_of
from flip_core.status import TERMINAL

KEEPALIVE_SECONDS = 10.0


async def caller(request: Request) -> Principal:
    """Who is asking and in which project; :class:`Refused` (401, 403, 503) with the reason otherwise."""
    flip, token = state(request), bearer(request)
    found: Caller | None = static_caller(token, flip.headless())
    try:
        if found is None and flip.identity is not None and token:
            found = await asyncio.to_thread(flip.identity.caller, token)
        if found is None:
            raise Refused(
                "a valid identity is required: a JupyterHub token of a user of this hub, or a FLIP "
                "token (Authorization: Bearer ...)",
                401,
            )
        wanted = request.headers.get(PROJECT_HEADER) or None
        known: list[str] = []
        if wanted is None and not found.projects and flip.identity is not None:  # the refusal names the projects
            known = await asyncio.to_thread(flip.identity.hub_projects)
    except Refused:
        raise
    except Exception as exc:  # the hub did not answer: say so, not a bare 500
        raise Refused(
            f"the coordinator could not check this identity with the hub ({type(exc).__name__})", 503
        ) from exc
    return Principal(found.researcher, choose_project(found, wanted, known))


def own_run(request: Request, who: Principal) -> dict[str, Any]:
    """The run named in the path, if it is in the caller's project. Another project's run is answered exactly as
    one that does not exist: the same 404 and sentence, after the same one lookup that finds no row (the store
    looks for the id in the caller's project), so neither the answer nor its time tells one from the other."""
    run_id: str = request.path_params["run_id"]
    manager = state(request).manager
    if manager.store.run(run_id, project=who.project) is None:
        raise TaskRejected(f"no run {run_id[:70]!r} in project {who.project!r}", 404)
    return manager.view(run_id)


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def whoami(request: Request) -> Response:
    who = await caller(request)
    return JSONResponse({"researcher": who.researcher, "project": who.project})


async def sites(request: Request) -> Response:
    """Every site, with the datasets it admits the caller's project to (and no others, by name or count)."""
    who = await caller(request)
    return JSONResponse(state(request).manager.sites(who.project))


async def upload_model(request: Request) -> Response:
    who = await caller(request)
    sha = await receive_model(request, owner=f"{who.project}/{who.researcher}")
    return JSONResponse({"sha256": sha}, status_code=201)


async def check_task(request: Request) -> Response:
    who = await caller(request)
    spec: TaskSpec = await typed_body(request, TaskSpec, "the task")
    return JSONResponse(await asyncio.to_thread(state(request).manager.check, who, spec))


async def create_run(request: Request) -> Response:
    who = await caller(request)
    spec: TaskSpec = await typed_body(request, TaskSpec, "the task")
    view = await asyncio.to_thread(state(request).manager.create_run, who, spec)
    return JSONResponse(view, status_code=201)


async def query(request: Request) -> Response:
    who = await caller(request)
    spec: QuerySpec = await typed_body(request, QuerySpec, "the query")
    return JSONResponse(await asyncio.to_thread(state(request).queries.ask, who, spec))


async def glm(request: Request) -> Response:
    who = await caller(request)
    spec: GlmSpec = await typed_body(request, GlmSpec, "the model")
    return JSONResponse(await asyncio.to_thread(fit_glm, state(request).queries, who, spec))


async def survival_analysis(request: Request) -> Response:
    who = await caller(request)
    spec: SurvivalSpec = await typed_body(request, SurvivalSpec, "the analysis")
    return JSONResponse(await asyncio.to_thread(survival, state(request).queries, who, spec))


async def cohort(request: Request) -> Response:
    who = await caller(request)
    spec: CohortSpec = await typed_body(request, CohortSpec, "the cohort")
    return JSONResponse(await asyncio.to_thread(state(request).queries.freeze, who, spec))


async def ask_release(request: Request) -> Response:
    who = await caller(request)
    spec: ReleaseSpec = await typed_body(request, ReleaseSpec, "the request")
    return JSONResponse(await asyncio.to_thread(state(request).airlock.ask, who, spec), status_code=201)


async def list_releases(request: Request) -> Response:
    who = await caller(request)
    return JSONResponse(await asyncio.to_thread(state(request).airlock.requests, who))


async def get_release(request: Request) -> Response:
    who = await caller(request)
    request_id: str = request.path_params["request_id"]
    return JSONResponse(await asyncio.to_thread(state(request).airlock.get, who, request_id))


async def list_runs(request: Request) -> Response:
    who, manager = await caller(request), state(request).manager
    runs = [manager.view(r.run_id) for r in manager.store.runs(project=who.project)]
    return JSONResponse([{k: v for k, v in r.items() if k not in ("source", "record")} for r in runs])


async def get_run(request: Request) -> Response:
    return JSONResponse(own_run(request, await caller(request)))


async def stop_run(request: Request) -> Response:
    run_id = own_run(request, await caller(request))["run_id"]
    return JSONResponse(await asyncio.to_thread(state(request).manager.stop, run_id))


async def get_model(request: Request) -> Response:
    view = own_run(request, await caller(request))
    sha = record_of(view).model_sha256
    if not sha:
        return error(f"run {view['run_id']} has no final model ({view['status']})", 404)
    return FileResponse(state(request).manager.store.model_path(sha), media_type="application/octet-stream")


async def events(request: Request) -> Response:
    run_id = own_run(request, await caller(request))["run_id"]
    after = query_int(request, "after", 0)
    stream = request.query_params.get("stream", "1")
    if stream not in ("0", "1"):
        raise RequestInvalid(f"the query parameter 'stream' must be 0 or 1, not {stream[:40]!r}", field="stream")
    if stream == "0":
        return JSONResponse(state(request).manager.store.events(run_id, after))
    return StreamingResponse(
        _stream(request, run_id, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(request: Request, run_id: str, after: int) -> AsyncIterator[str]:
    flip = state(request)
    yield ": flip event stream\n\n"
    while True:
        wake = flip.notifier.current()
        run = flip.manager.store.run(run_id)
        finished = run is None or run.status in TERMINAL
        for event in flip.manager.store.events(run_id, after):
            after = event["seq"]
            yield f"id: {after}\ndata: {json.dumps(event)}\n\n"
        if finished:
            return
        try:
            await asyncio.wait_for(wake.wait(), KEEPALIVE_SECONDS)
        except TimeoutError:
            yield ": keepalive\n\n"


def routes() -> list[BaseRoute]:
    return [
        Route("/api/health", health),
        Route("/api/whoami", whoami),
        Route("/api/sites", sites),
        Route("/api/models", upload_model, methods=["POST"]),
        Route("/api/runs", create_run, methods=["POST"]),
        Route("/api/runs/check", check_task, methods=["POST"]),
        Route("/api/runs", list_runs, methods=["GET"]),
        Route("/api/queries", query, methods=["POST"]),
        Route("/api/cohorts", cohort, methods=["POST"]),
        Route("/api/glm", glm, methods=["POST"]),
        Route("/api/survival", survival_analysis, methods=["POST"]),
        Route("/api/airlock", ask_release, methods=["POST"]),
        Route("/api/airlock", list_releases, methods=["GET"]),
        Route("/api/airlock/{request_id}", get_release),
        Route("/api/runs/{run_id}", get_run),
        Route("/api/runs/{run_id}/stop", stop_run, methods=["POST"]),
        Route("/api/runs/{run_id}/model", get_model),
        Route("/api/runs/{run_id}/events", events),
    ]
