"""The engine core in a process of its own: scheduler, backend and KV, stepping without ever
waiting on HTTP or sharing a GIL with the server (vLLM V1's EngineCore, SGLang's scheduler
process).

The loop: take every message waiting on the input socket (requests, aborts), run one engine
step, send its deltas as one StepOutput. With nothing to run it blocks on the input socket.
The server process binds both sockets and starts this one (`EngineCoreClient`); this process
exits when told to, when the server process is gone, or after a Fatal message.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

from localserve.engine.backend import BackendConfig
from localserve.engine.llm_engine import EngineConfig
from localserve.errors import LocalServeError
from localserve.runtime import core_messages as msg

log = logging.getLogger("localserve.engine_core")

STATS_INTERVAL = 0.25  # seconds between the stats a StepOutput carries
IDLE_POLL_MS = 500  # an idle core checks this often that the server process is still there


@dataclass(slots=True)
class CoreSpec:
    """What the core loads: everything `runtime.loader.load_model` takes."""

    model: str | None
    backend: str
    backend_cfg: BackendConfig
    engine_cfg: EngineConfig
    name: str
    log_level: str = "info"


def run_engine_core(spec: CoreSpec, input_addr: str, output_addr: str, parent_pid: int) -> None:
    """The process's main function."""
    # Ctrl-C reaches the whole process group: the server process decides when this one stops
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    import zmq

    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(input_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(output_addr)
    try:
        Core(spec, inbox, outbox, parent_pid).run()
    finally:
        outbox.close(linger=1000)  # the last message (Fatal, a step) still goes out
        inbox.close(linger=0)
        ctx.term()


class Core:
    def __init__(self, spec: CoreSpec, inbox, outbox, parent_pid: int) -> None:
        self.spec = spec
        self.inbox = inbox
        self.outbox = outbox
        self.parent_pid = parent_pid
        self.engine = None
        self._stats_sent = 0.0
        self._stopping = False

    def run(self) -> None:
        if not self._load():
            return
        while not self._stopping and os.getppid() == self.parent_pid:
            busy = self.engine.has_unfinished()
            self._receive(0 if busy else IDLE_POLL_MS)
            if not self._stopping and self.engine.has_unfinished():
                self._step()
            elif not busy:
                self._send_stats(force=False)
        log.info("engine core stopping")

    def _load(self) -> bool:
        from localserve.runtime.loader import engine_info, load_model, warm_up

        try:
            loaded = load_model(self.spec.model, backend=self.spec.backend, backend_cfg=self.spec.backend_cfg,
                                engine_cfg=self.spec.engine_cfg, name=self.spec.name)
            warm_up(loaded.engine)
        except Exception as exc:  # reported to the server, which fails its start with it
            log.exception("loading the model failed")
            self._send(msg.Fatal(str(exc)))
            return False
        self.engine = loaded.engine
        self._send(msg.Ready(info=engine_info(loaded.engine), config=loaded.config, backend_name=loaded.backend_name,
                             source=loaded.source, load_seconds=loaded.load_seconds, stats=loaded.engine.stats()))
        return True

    def _receive(self, timeout_ms: int) -> None:
        """Every message waiting now; with nothing to run, waits up to timeout_ms for one."""
        while self.inbox.poll(timeout_ms):
            timeout_ms = 0
            m = msg.to_core_decoder.decode(self.inbox.recv())
            if isinstance(m, msg.AddRequest):
                self._add(m)
            elif isinstance(m, msg.Abort):
                for request_id in m.request_ids:
                    self.engine.abort(request_id)
            elif isinstance(m, msg.Shutdown):
                self._stopping = True
                return

    def _add(self, m: msg.AddRequest) -> None:
        try:
            self.engine.add_request(m.prompt_token_ids, m.params, m.request_id)
        except LocalServeError as exc:
            self._send(msg.RequestFailed(m.request_id, exc.status, exc.code, str(exc)))
        except Exception as exc:  # noqa: BLE001 - the request fails, the core goes on
            log.exception("adding request %s failed", m.request_id)
            self._send(msg.RequestFailed(m.request_id, 500, "internal_error", f"{type(exc).__name__}: {exc}"))

    def _step(self) -> None:
        try:
            deltas = self.engine.step()
        except Exception as exc:  # the device failed: fail every open request, stay alive
            log.exception("engine step failed")
            for request_id in self.engine.request_ids():
                self.engine.abort(request_id)
                self._send(msg.RequestFailed(request_id, 500, "engine_step_failed", f"engine step failed: {exc!r}"))
            return
        stats = self._stats_due()
        if deltas or stats is not None:
            self._send(msg.StepOutput(deltas, stats))

    def _stats_due(self):
        now = time.monotonic()
        if now - self._stats_sent < STATS_INTERVAL:
            return None
        self._stats_sent = now
        return self.engine.stats()

    def _send_stats(self, force: bool) -> None:
        stats = self.engine.stats() if force else self._stats_due()
        if stats is not None:
            self._send(msg.StepOutput([], stats))

    def _send(self, m) -> None:
        self.outbox.send(msg.from_core_encoder.encode(m), copy=False)
