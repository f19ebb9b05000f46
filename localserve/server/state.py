"""What the app holds: the served model once it has loaded, or why it is not there yet."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from litestar import Request
from litestar.exceptions import HTTPException

from localserve.server.access import AccessPolicy
from localserve.server.metrics import ServerMetrics
from localserve.server.served_model import ServedModel

STATE_KEY = "localserve"


@dataclass
class ServerState:
    model_ref: str
    backend: str
    api_keys: tuple[str, ...] = ()
    access: AccessPolicy = field(default_factory=AccessPolicy)  # Host and Origin checks
    warnings: list[str] = field(default_factory=list)  # shown by /health and at start
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    served: ServedModel | None = None
    load_error: str | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def status(self) -> str:
        if self.load_error:
            return "failed"  # the model did not load, or the engine process died
        return "ready" if self.served is not None else "loading"


def server_state(request: Request) -> ServerState:
    return request.app.state[STATE_KEY]


def served_model(request: Request) -> ServedModel:
    state = server_state(request)
    if state.served is None or state.load_error:
        if state.load_error:
            raise HTTPException(status_code=503, detail=f"the model failed to load: {state.load_error}")
        raise HTTPException(status_code=503, detail="the model is still loading; retry shortly",
                            headers={"Retry-After": "2"})
    return state.served
