"""The server's side of the engine core process (runtime.engine_core): starts it, waits until
the model is loaded, sends requests and aborts, and hands each request's deltas to its async
iterator — the same `generate` as the in-process AsyncEngine.

One reader thread receives the core's messages and passes each to the event loop in one call,
so a step of a thousand rows costs the loop one wake-up, not a thousand. If the core process
dies, every open request fails with EngineDeadError and `on_death` is called (the server then
exits non-zero; a supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import uuid
from typing import AsyncIterator, Callable, Sequence

from localserve.engine.async_engine import RequestDeltas
from localserve.engine.outputs import EngineStats, SeqDelta
from localserve.engine.sampling_params import SamplingParams
from localserve.errors import EngineDeadError, EngineRequestError, ModelLoadError
from localserve.runtime import core_messages as msg
from localserve.runtime.engine_core import CoreSpec, run_engine_core

log = logging.getLogger("localserve.engine_client")

SHUTDOWN_SECONDS = 10.0


class EngineCoreClient:
    def __init__(self, spec: CoreSpec) -> None:
        """Starts the core process and blocks until its model is loaded; raises what the load
        raised (as ModelLoadError), or EngineDeadError if the process died first."""
        import zmq

        self._dir = tempfile.mkdtemp(prefix="localserve-core-")
        self._zmq = zmq.Context()
        self._to_core = self._zmq.socket(zmq.PUSH)
        self._to_core.bind(f"ipc://{self._dir}/in")
        self._from_core = self._zmq.socket(zmq.PULL)
        self._from_core.bind(f"ipc://{self._dir}/out")
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked threads or CUDA state
        self.process = spawn.Process(target=run_engine_core, name="localserve-engine-core", daemon=False,
                                     args=(spec, f"ipc://{self._dir}/in", f"ipc://{self._dir}/out", os.getpid()))
        self.process.start()
        self.pid = self.process.pid
        self._streams: dict[str, RequestDeltas] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.dead: str | None = None  # why the core is gone, once it is
        self.on_death: Callable[[str], None] | None = None
        try:
            ready = self._wait_ready(spec.model or spec.name)
        except BaseException:
            self.shutdown()
            raise
        self.info, self.config, self._stats = ready.info, ready.config, ready.stats
        self.backend_name, self.source, self.load_seconds = ready.backend_name, ready.source, ready.load_seconds
        threading.Thread(target=self._read, name="localserve-core-reader", daemon=True).start()
        threading.Thread(target=self._watch, name="localserve-core-watch", daemon=True).start()

    # -- requests -------------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[SeqDelta]:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        self._loop = self._loop or asyncio.get_running_loop()
        request_id = request_id or uuid.uuid4().hex
        stream = RequestDeltas(params.n)
        self._streams[request_id] = stream
        self._send(msg.AddRequest(request_id, list(prompt_token_ids), params))
        try:
            async for d in stream:
                yield d
        finally:
            self._streams.pop(request_id, None)
            if stream.unfinished and self.dead is None:
                self._send(msg.Abort([request_id]))

    def stats(self) -> EngineStats:
        return self._stats

    def shutdown(self, timeout: float = SHUTDOWN_SECONDS) -> None:
        """Stops the core (asks, then terminates, then kills) and releases the sockets."""
        if self._closing:
            return
        self._closing = True
        if self.process.is_alive():
            try:
                self._send(msg.Shutdown())
            except Exception:  # noqa: BLE001 - the process is stopped below either way
                pass
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._to_core.close(linger=0)
        self._from_core.close(linger=0)
        self._zmq.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- the core's messages --------------------------------------------------------------------
    def _send(self, m) -> None:
        self._to_core.send(msg.to_core_encoder.encode(m), copy=False)

    def _wait_ready(self, what: str) -> msg.Ready:
        while True:
            if self._from_core.poll(500):
                m = msg.from_core_decoder.decode(self._from_core.recv())
                if isinstance(m, msg.Ready):
                    return m
                if isinstance(m, msg.Fatal):
                    raise _load_error(what, m.message)
            elif not self.process.is_alive():
                raise EngineDeadError(f"the engine process exited with status {self.process.exitcode} while "
                                      "loading the model (see the log above)")

    def _read(self) -> None:
        import zmq

        while not self._closing:
            try:
                if not self._from_core.poll(500):
                    continue
                m = msg.from_core_decoder.decode(self._from_core.recv())
            except zmq.ZMQError:
                return  # closed by shutdown
            if isinstance(m, msg.StepOutput) and m.stats is not None:
                self._stats = m.stats
            if self._loop is not None and not isinstance(m, msg.Fatal):
                self._loop.call_soon_threadsafe(self._dispatch, m)
            elif isinstance(m, msg.Fatal):
                log.error("the engine core stopped: %s", m.message)

    def _dispatch(self, m) -> None:
        """In the event loop: each delta to its request's queue."""
        if isinstance(m, msg.StepOutput):
            streams = self._streams
            for d in m.deltas:
                stream = streams.get(d.request_id)
                if stream is not None:
                    stream.put(d)
        elif isinstance(m, msg.RequestFailed):
            stream = self._streams.get(m.request_id)
            if stream is not None:
                stream.put(EngineRequestError(m.status, m.code, m.message))

    def _watch(self) -> None:
        self.process.join()
        if self._closing:
            return
        self.dead = f"the engine process exited unexpectedly (status {self.process.exitcode})"
        log.error("%s; failing the open requests", self.dead)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail_all)
        if self.on_death is not None:
            self.on_death(self.dead)

    def _fail_all(self) -> None:
        for stream in self._streams.values():
            stream.put(EngineDeadError(self.dead or "the engine stopped"))


def _load_error(what: str, message: str) -> ModelLoadError:
    """The core's load error as the server reports it: its message as the core wrote it."""
    err = ModelLoadError(what, message)
    err.args = (message,)
    return err
