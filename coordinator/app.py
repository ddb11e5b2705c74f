"""The coordinator's HTTP API (Starlette): researchers, site agents and the ServerApp.

Three audiences, three tokens: ``/api`` for researchers (their JupyterHub token, checked with the
hub, with hub groups ``project-<name>`` as projects; or a static headless token for one project:
``coordinator.identity``), ``/site`` for site agents (each site's own token from ``flip site register``,
which also binds it to its Flower node; a shared join token only in an ``--insecure`` development
federation), ``/internal`` for FLIP's ServerApp on the hub host. Run events stream to notebooks as server-sent events.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from coordinator.config import CoordinatorConfig, TokenGrant
from coordinator.identity import PROJECT_HEADER, Caller, HubIdentity, Refused, choose_project, static_caller
from coordinator.registry import RegisteredSite, SiteRegistry
from coordinator.service import Principal, RunManager, TaskRejected
from coordinator.store import TERMINAL

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 10.0
PRESENCE_BEAT_SECONDS = 1.0


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


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _bearer(request: Request) -> str:
    """The token of ``Authorization: Bearer T`` (or JupyterHub's ``token T``)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() in ("bearer", "token") else ""


def build_app(config: CoordinatorConfig, manager: RunManager, notifier: Notifier,
              identity: HubIdentity | None = None, prefix: str = "",
              tokens: Callable[[], Mapping[str, TokenGrant]] | None = None) -> Starlette:
    """``identity``: the hub this coordinator is a service of (researchers' hub tokens are accepted);
    ``prefix``: the hub proxy's path for the service (``/services/coordinator``), served as well as ``/``;
    ``tokens``: the current headless tokens (default: the config's, as loaded)."""
    headless = tokens or (lambda: config.tokens)

    async def principal(request: Request) -> Principal:
        token = _bearer(request)
        caller: Caller | None = static_caller(token, headless())
        if caller is None and identity is not None and token:
            caller = await asyncio.to_thread(identity.caller, token)
        if caller is None:
            raise Refused("a valid identity is required: a JupyterHub token of a user of this hub, or a FLIP "
                          "token (Authorization: Bearer ...)", 401)
        wanted = request.headers.get(PROJECT_HEADER) or None
        known: list[str] = []
        if wanted is None and not caller.projects and identity is not None:  # the refusal names this hub's projects
            known = await asyncio.to_thread(identity.hub_projects)
        return Principal(caller.researcher, choose_project(caller, wanted, known))

    def has(request: Request, secret: str) -> bool:
        token = _bearer(request)
        return bool(token) and hmac.compare_digest(token, secret)

    def researcher_route(handler: Any) -> Any:
        async def wrapped(request: Request) -> Response:
            try:
                who = await principal(request)
            except Refused as refused:
                return _error(str(refused), refused.status)
            except Exception as exc:  # the hub did not answer: say so, not a bare 500
                log.warning("identity check failed: %r", exc)
                return _error(f"the coordinator could not check this identity with the hub ({type(exc).__name__})",
                              503)
            try:
                return await handler(request, who)
            except TaskRejected as rejected:
                return _error(str(rejected), rejected.status)
        return wrapped

    def secret_route(secret: str, handler: Any) -> Any:
        async def wrapped(request: Request) -> Response:
            if not has(request, secret):
                return _error("not authorised", 401)
            try:
                return await handler(request)
            except TaskRejected as rejected:
                return _error(str(rejected), rejected.status)
        return wrapped

    registry = SiteRegistry(config.registry_path)

    def site_route(handler: Any) -> Any:
        """A site agent's call: its own token (coordinator.registry) names it; the federation's shared
        token (an insecure development federation only) may speak for any site."""
        async def wrapped(request: Request) -> Response:
            token = _bearer(request)
            who = registry.identify(token)
            if who is None and not (config.site_token and has(request, config.site_token)):
                return _error("not authorised: this site's token is not registered here (flip site register)", 401)
            return await handler(request, who)
        return wrapped

    def own_run(run_id: str, who: Principal) -> dict[str, Any]:
        view = manager.view(run_id)
        if view["project"] != who.project:
            raise TaskRejected(f"no run {run_id!r} in project {who.project!r}", 404)
        return view

    # -- researchers ----------------------------------------------------------------
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def whoami(request: Request, who: Principal) -> Response:
        return JSONResponse({"researcher": who.researcher, "project": who.project})

    async def sites(request: Request, who: Principal) -> Response:
        return JSONResponse(manager.sites())

    async def upload_model(request: Request, who: Principal) -> Response:
        sha = manager.store.put_model(await request.body())
        return JSONResponse({"sha256": sha}, status_code=201)

    async def check_task(request: Request, who: Principal) -> Response:
        try:
            spec = await request.json()
        except json.JSONDecodeError:
            return _error("the task must be a JSON object", 400)
        return JSONResponse(await asyncio.to_thread(manager.check, who, spec))

    async def create_run(request: Request, who: Principal) -> Response:
        try:
            spec = await request.json()
        except json.JSONDecodeError:
            return _error("the task must be a JSON object", 400)
        view = await asyncio.to_thread(manager.create_run, who, spec)
        return JSONResponse(view, status_code=201)

    async def list_runs(request: Request, who: Principal) -> Response:
        runs = [manager.view(r["run_id"]) for r in manager.store.runs(project=who.project)]
        return JSONResponse([{k: v for k, v in r.items() if k not in ("source", "record")} for r in runs])

    async def get_run(request: Request, who: Principal) -> Response:
        return JSONResponse(own_run(request.path_params["run_id"], who))

    async def stop_run(request: Request, who: Principal) -> Response:
        own_run(request.path_params["run_id"], who)
        return JSONResponse(await asyncio.to_thread(manager.stop, request.path_params["run_id"]))

    async def get_model(request: Request, who: Principal) -> Response:
        view = own_run(request.path_params["run_id"], who)
        sha = view["record"].get("model_sha256")
        if not sha:
            return _error(f"run {view['run_id']} has no final model ({view['status']})", 404)
        return FileResponse(manager.store.model_path(sha), media_type="application/octet-stream")

    async def events(request: Request, who: Principal) -> Response:
        run_id = request.path_params["run_id"]
        own_run(run_id, who)
        after = int(request.query_params.get("after", "0"))
        if request.query_params.get("stream", "1") == "0":
            return JSONResponse(manager.store.events(run_id, after))
        return StreamingResponse(_stream(run_id, after), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _stream(run_id: str, after: int) -> AsyncIterator[str]:
        yield ": flip event stream\n\n"
        while True:
            wake = notifier.current()
            run = manager.store.run(run_id)
            finished = run is None or run["status"] in TERMINAL
            for event in manager.store.events(run_id, after):
                after = event["seq"]
                yield f"id: {after}\ndata: {json.dumps(event)}\n\n"
            if finished:
                return
            try:
                await asyncio.wait_for(wake.wait(), KEEPALIVE_SECONDS)
            except TimeoutError:
                yield ": keepalive\n\n"

    # -- site agents ----------------------------------------------------------------
    async def announce(request: Request, who: RegisteredSite | None) -> Response:
        body = await request.json()
        node_id = body.get("node_id")
        if who is not None and str(body.get("site")) != who.name:
            return _error(f"this token belongs to site {who.name!r}, not {body.get('site')!r}", 403)
        if who is not None and node_id is not None and int(node_id) != who.node_id:
            return _error(f"Flower node {node_id} is not the node registered for site {who.name!r}", 403)
        manager.announce(str(body["site"]), None if node_id is None else int(node_id),
                         dict(body.get("info", {})), str(body.get("state", "online")))
        return JSONResponse({"ok": True})

    async def presence(request: Request, who: RegisteredSite | None) -> Response:
        site = request.path_params["site"]
        if who is not None and site != who.name:
            return _error(f"this token belongs to site {who.name!r}, not {site!r}", 403)

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

    # -- the ServerApp --------------------------------------------------------------
    async def internal_task(request: Request) -> Response:
        run = manager.store.run(request.path_params["run_id"])
        if run is None:
            return _error("no such run", 404)
        return JSONResponse(run["task"])

    async def internal_model(request: Request) -> Response:
        try:
            path = manager.store.model_path(request.path_params["sha"])
        except KeyError:
            return _error("no such model", 404)
        if not path.exists():
            return _error("no such model", 404)
        return FileResponse(path, media_type="application/octet-stream")

    async def internal_put_model(request: Request) -> Response:
        sha = manager.store.put_model(await request.body())
        return JSONResponse({"sha256": sha})

    async def internal_events(request: Request) -> Response:
        manager.ingest(request.path_params["run_id"], list(await request.json()))
        return JSONResponse({"ok": True})

    async def internal_sites(request: Request) -> Response:
        return JSONResponse(manager.sites())

    async def internal_ring(request: Request) -> Response:
        for name in list((await request.json()).get("sites", [])):
            manager.presence.ring(str(name))  # a message for it is on the SuperLink again (no new event)
        return JSONResponse({"ok": True})

    internal = config.internal_token
    routes = [
        Route("/api/health", health),
        Route("/api/whoami", researcher_route(whoami)),
        Route("/api/sites", researcher_route(sites)),
        Route("/api/models", researcher_route(upload_model), methods=["POST"]),
        Route("/api/runs", researcher_route(create_run), methods=["POST"]),
        Route("/api/runs/check", researcher_route(check_task), methods=["POST"]),
        Route("/api/runs", researcher_route(list_runs), methods=["GET"]),
        Route("/api/runs/{run_id}", researcher_route(get_run)),
        Route("/api/runs/{run_id}/stop", researcher_route(stop_run), methods=["POST"]),
        Route("/api/runs/{run_id}/model", researcher_route(get_model)),
        Route("/api/runs/{run_id}/events", researcher_route(events)),
        Route("/site/announce", site_route(announce), methods=["POST"]),
        Route("/site/presence/{site}", site_route(presence)),
        Route("/internal/runs/{run_id}/task", secret_route(internal, internal_task)),
        Route("/internal/models/{sha}", secret_route(internal, internal_model)),
        Route("/internal/runs/{run_id}/model", secret_route(internal, internal_put_model), methods=["PUT"]),
        Route("/internal/runs/{run_id}/events", secret_route(internal, internal_events), methods=["POST"]),
        Route("/internal/sites", secret_route(internal, internal_sites)),
        Route("/internal/ring", secret_route(internal, internal_ring), methods=["POST"]),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        notifier.current()
        manager.resume()
        yield

    if prefix.strip("/"):
        routes = [Mount("/" + prefix.strip("/"), routes=list(routes)), *routes]
    return Starlette(routes=routes, lifespan=lifespan)
