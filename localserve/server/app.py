"""The Litestar app factory: OpenAI routes, /health, /metrics, auth, CORS, body limit, errors.

The model loads on a background thread after the app starts, so /health answers 503 while it
loads and 200 once it serves; requests to /v1 before then get a 503 with Retry-After.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from litestar import Litestar, MediaType, Request, Response, get, head
from litestar.config.cors import CORSConfig
from litestar.openapi import OpenAPIConfig

from localserve import __version__
from localserve.server import metrics as prom
from localserve.server.access import access_guard, api_key_guard
from localserve.server.errors import EXCEPTION_HANDLERS
from localserve.server.anthropic_routes import ROUTES as ANTHROPIC_ROUTES
from localserve.server.openai_routes import ROUTES as OPENAI_ROUTES
from localserve.server.responses_routes import ROUTES as RESPONSES_ROUTES
from localserve.server.monitoring import ROUTES as MONITOR_ROUTES
from localserve.server.monitoring import Monitoring
from localserve.server.request_log import request_log_middleware
from localserve.server.state import STATE_KEY, ServerState, server_state

log = logging.getLogger("localserve.server")

@get("/", summary="Liveness: 200 while the server runs (the model may still be loading)", tags=["server"],
     media_type=MediaType.TEXT)
async def root() -> str:
    return "localserve is running"


@head("/", summary="Liveness without a body", tags=["server"])
async def root_head() -> None:
    return None


@get("/health", summary="Readiness: 200 when the model serves, 503 while it loads", tags=["server"])
async def health(request: Request) -> Response:
    state = server_state(request)
    body = {"status": state.status, "model": state.served.name if state.served else state.model_ref}
    if state.load_error:
        body["error"] = state.load_error
    if state.warnings:
        body["warnings"] = state.warnings
    return Response(body, status_code=200 if state.status == "ready" else 503, media_type=MediaType.JSON)


@get("/metrics", summary="Prometheus metrics", tags=["server"], media_type=prom.CONTENT_TYPE)
async def metrics(request: Request) -> Response:
    return Response(server_state(request).metrics.render(), media_type=prom.CONTENT_TYPE)


def create_app(state: ServerState, *, load: Callable[[ServerState], None] | None = None,
               max_body_bytes: int = 32 * 1024 * 1024) -> Litestar:
    """`load` fills state.served (or state.load_error) and runs on a thread once the app starts;
    state.access says which hosts and browser origins it answers."""
    monitoring = Monitoring(state)  # /api/status, /api/events, store routes; load/request events
    load = monitoring.wrap_load(load)

    def start_loading(app: Litestar) -> None:
        if load is not None and state.served is None:
            threading.Thread(target=_load_guarded, args=(load, state), name="localserve-load", daemon=True).start()

    def shutdown(app: Litestar) -> None:
        if state.served is not None:
            state.served.shutdown()

    cors = CORSConfig(allow_origins=list(state.access.cors_origins), allow_origin_regex=state.access.cors_regex(),
                      allow_methods=["*"], allow_headers=["*"])
    return Litestar(
        route_handlers=[*OPENAI_ROUTES, *ANTHROPIC_ROUTES, *RESPONSES_ROUTES, root, root_head, health, metrics, *MONITOR_ROUTES],
        state=_app_state(state, monitoring.app_state()),
        guards=[access_guard, api_key_guard],  # in this order: a foreign page gets 403, not 401
        middleware=[request_log_middleware],
        cors_config=cors,
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=max_body_bytes,
        openapi_config=OpenAPIConfig(title="localserve", version=__version__, path="/openapi"),
        logging_config=None,  # `localserve up` configures logging; Litestar's would replace it
        on_startup=[start_loading, monitoring.start],
        on_shutdown=[monitoring.stop, shutdown],
    )


def _app_state(state: ServerState, extra: dict):
    from litestar.datastructures import State

    return State({STATE_KEY: state, **extra})


def _load_guarded(load: Callable[[ServerState], None], state: ServerState) -> None:
    try:
        load(state)
    except Exception as exc:  # reported by /health and by every request, never a crash
        log.error("loading %s failed: %s", state.model_ref, exc)
        state.load_error = str(exc)
