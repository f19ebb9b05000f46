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
from localserve.engine.outputs import SeqDelta, coalesce
from localserve.engine.sampling_params import SamplingParams
from localserve.errors import EngineDeadError

log = logging.getLogger(__name__)


class RequestDeltas:
    """One request's deltas on their way to its consumer. A consumer that falls behind the
    engine takes what waits as one coalesced delta per choice, so under load a stream sends
    bigger chunks instead of falling further behind (vLLM's RequestOutputCollector)."""

    __slots__ = ("queue", "unfinished")

    def __init__(self, num_choices: int) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.unfinished = num_choices  # choices not finished yet

    def put(self, item: SeqDelta | BaseException) -> None:
        self.queue.put_nowait(item)

    async def __aiter__(self) -> AsyncIterator[SeqDelta]:
        """The deltas until every choice finished; an error put in their place raises (the
        engine has dropped the request by then)."""
        while self.unfinished:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            error = next((i for i in items if isinstance(i, BaseException)), None)
            for d in coalesce([i for i in items if not isinstance(i, BaseException)]):
                if d.finished:
                    self.unfinished -= 1
                yield d
            if error is not None and self.unfinished:  # an answer already whole stays whole
                self.unfinished = 0
                raise error


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._streams: dict[str, RequestDeltas] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # where the requests' consumers run
        self._wake = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="localserve-engine", daemon=True)
        self._thread.start()

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
    ) -> AsyncIterator[SeqDelta]:
        if self._error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._error!r}")
        self._loop = self._loop or asyncio.get_running_loop()
        request_id = request_id or uuid.uuid4().hex
        stream = RequestDeltas(params.n)
        # register before adding: the engine thread may produce the first delta at once
        self._streams[request_id] = stream
        try:
            self.engine.add_request(prompt_token_ids, params, request_id)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        self._wake.set()
        try:
            async for d in stream:
                yield d
        finally:
            self._streams.pop(request_id, None)
            if stream.unfinished:
                self.engine.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
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
            if deltas and self._loop is not None:
                # one wake-up of the event loop per step, whatever the number of rows
                self._loop.call_soon_threadsafe(self._deliver, deltas)

    def _deliver(self, deltas: list[SeqDelta]) -> None:
        """In the event loop: each delta to its request's stream."""
        streams = self._streams
        for d in deltas:
            stream = streams.get(d.request_id)
            if stream is not None:
                stream.put(d)

    def _fail_all(self, exc: BaseException) -> None:
        request_ids = list(self._streams)
        for request_id in request_ids:
            self.engine.abort(request_id)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail_streams, request_ids,
                                            EngineDeadError(f"engine step failed: {exc!r}"))

    def _fail_streams(self, request_ids: list[str], error: EngineDeadError) -> None:
        """The error to the requests the engine aborted (one added since goes on)."""
        for request_id in request_ids:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put(error)
