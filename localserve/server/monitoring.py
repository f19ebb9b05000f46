"""The monitoring side of the app in one place: /api/status, /api/events, the store routes and
their jobs, the stats ticker, and the model load/unload and request events. create_app wires it
with four lines."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Callable

from localserve.server.events import EVENTS_KEY, EventBus, events
from localserve.server.jobs import JobManager
from localserve.server.state import ServerState
from localserve.server.status import StatsTicker, status
from localserve.server.store_routes import ROUTES as STORE_ROUTES
from localserve.server.store_routes import STORE_API_KEY, StoreService

ROUTES = [status, events, *STORE_ROUTES]


@dataclass
class Monitoring:
    state: ServerState
    bus: EventBus = field(default_factory=EventBus)
    _ticker: asyncio.Task | None = None
    _attached: object = None  # the ServedModel whose requests publish to the bus

    def app_state(self) -> dict:
        return {EVENTS_KEY: self.bus, STORE_API_KEY: StoreService(JobManager(self.bus))}

    def wrap_load(self, load: Callable[[ServerState], None] | None) -> Callable[[ServerState], None] | None:
        if load is None:
            return None

        def load_and_announce(state: ServerState) -> None:
            load(state)
            self.model_loaded()

        return load_and_announce

    def model_loaded(self) -> None:
        served = self.state.served
        if served is None or served is self._attached:
            return
        self._attached = served
        served.listeners.append(lambda type, data: self.bus.publish(type, **data))
        loaded = served.loaded
        self.bus.publish("model_load", name=served.name, source=loaded.source, backend=loaded.backend_name,
                         architecture=loaded.config.architecture, load_seconds=round(loaded.load_seconds, 3),
                         context=served.max_context)

    async def start(self, app) -> None:
        self.model_loaded()  # an app created around an already served model
        self._ticker = asyncio.get_running_loop().create_task(StatsTicker(self.state, self.bus).run())

    async def stop(self, app) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self.state.served is not None:
            self.bus.publish("model_unload", name=self.state.served.name)


def end_streams_on_exit(server, app) -> None:
    """uvicorn waits up to its graceful timeout for open responses before it shuts the app
    down; the /api/events streams never end by themselves, so a stop signal ends them first."""
    handle_exit = server.handle_exit

    def on_exit(sig, frame) -> None:
        app.state[EVENTS_KEY].close()
        handle_exit(sig, frame)

    server.handle_exit = on_exit
