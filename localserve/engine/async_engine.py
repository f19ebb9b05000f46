"""AsyncEngine: the LLMEngine stepping on its own thread, with `async for` deltas per request.

The device work runs on a dedicated thread (torch releases the GIL), so the event loop that
serves HTTP stays responsive. Leaving the `async for` early (a client that disconnects, a
task that is cancelled) aborts the request, which releases its pages at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from typing import AsyncIterator, Sequence

from localserve.engine.llm_engine import LLMEngine
from localserve.engine.outputs import SeqDelta
from localserve.engine.sampling_params import SamplingParams
from localserve.errors import EngineDeadError

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="localserve-engine", daemon=True)
        self._thread.start()

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
    ) -> AsyncIterator[SeqDelta]:
        if self._error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._error!r}")
        request_id = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        # register before adding: the engine thread may produce the first delta at once
        self._queues[request_id] = (asyncio.get_running_loop(), queue)
        try:
            self.engine.add_request(prompt_token_ids, params, request_id)
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        self._wake.set()
        remaining = params.n
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            self._queues.pop(request_id, None)
            if remaining:
                self.engine.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping:
            if not self.engine.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                deltas = self.engine.step()
            except BaseException as exc:  # the device failed: fail every open request, stay alive
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            for d in deltas:
                entry = self._queues.get(d.request_id)
                if entry is not None:
                    loop, queue = entry
                    loop.call_soon_threadsafe(queue.put_nowait, d)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, (loop, queue) in list(self._queues.items()):
            self.engine.abort(request_id)
            loop.call_soon_threadsafe(queue.put_nowait, EngineDeadError(f"engine step failed: {exc!r}"))
