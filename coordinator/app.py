"""The coordinator's HTTP API (Starlette): researchers, site agents and the ServerApp.

Three audiences, three tokens, three route groups: ``/api`` for researchers (``researcher_api``:
their JupyterHub token, checked with the hub, with hub groups ``project-<name>`` as projects; or a
static headless token for one project: ``coordinator.identity``), ``/site`` for site agents
(``site_api``: each site's own token from ``flip site register``, which also binds it to its Flower
node; a shared join token only in an ``--insecure`` development federation), ``/internal`` for FLIP's
ServerApp on the hub host (``internal_api``); what they share is ``coordinator.web``. This module
builds the application: the route groups, and every refusal turned into a JSON sentence with its status.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount

from coordinator import internal_api, researcher_api, site_api
from coordinator.airlock import AirlockDesk
from coordinator.blobs import BLOB_HEADROOM, BlobStore
from coordinator.blobs import FOLDER as BLOBS
from coordinator.config import CoordinatorConfig, TokenGrant
from coordinator.identity import HubIdentity
from coordinator.queries import QueryDesk
from coordinator.registry import SiteRegistry
from coordinator.service import RunManager
from coordinator.web import Coordinator, Notifier, error
from flip_core.errors import Rejected

__all__ = ["Notifier", "build_app"]

log = logging.getLogger(__name__)


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Rejected)
    return error(str(exc), exc.status)


async def _broken_json(request: Request, exc: Exception) -> Response:  # a body read with request.json()
    return error(f"the body is not valid JSON ({exc})", 400)


async def _bug(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return error(f"internal error in the coordinator ({type(exc).__name__}); its log has the details", 500)


def build_app(
    config: CoordinatorConfig,
    manager: RunManager,
    notifier: Notifier,
    identity: HubIdentity | None = None,
    prefix: str = "",
    tokens: Callable[[], Mapping[str, TokenGrant]] | None = None,
) -> Starlette:
    """``identity``: the hub this coordinator is a service of (researchers' hub tokens are accepted);
    ``prefix``: the hub proxy's path for the service (``/services/coordinator``), served as well as ``/``;
    ``tokens``: the current headless tokens (default: the config's, as loaded)."""
    routes: list[BaseRoute] = [*researcher_api.routes(), *site_api.routes(), *internal_api.routes()]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        notifier.current()
        manager.resume()
        yield

    if prefix.strip("/"):
        routes = [Mount("/" + prefix.strip("/"), routes=list(routes)), *routes]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={Rejected: _refused, json.JSONDecodeError: _broken_json, Exception: _bug},
    )
    registry, desk = SiteRegistry(config.registry_path), QueryDesk(manager)
    app.state.flip = Coordinator(
        config,
        manager,
        notifier,
        identity,
        tokens or (lambda: config.tokens),
        registry,
        desk,
        BlobStore(config.state_dir / BLOBS, config.max_model_bytes + BLOB_HEADROOM),
        AirlockDesk(desk, registry, config.state_dir),
    )
    return app
