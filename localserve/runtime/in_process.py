"""The engine in the server's own process, stepping on a thread (AsyncEngine), behind the same
surface as EngineCoreClient (the engine in a process of its own): the served model's
metadata, `info`, `stats()`, `generate()` and `shutdown()`."""

from __future__ import annotations

import os
from typing import AsyncIterator, Sequence

from localserve.engine.async_engine import AsyncEngine
from localserve.engine.outputs import EngineStats, SeqDelta
from localserve.engine.sampling_params import SamplingParams
from localserve.runtime.loader import LoadedModel, engine_info


class InProcessEngine:
    def __init__(self, loaded: LoadedModel) -> None:
        self.engine = loaded.engine
        self.config, self.tokenizer, self.source = loaded.config, loaded.tokenizer, loaded.source
        self.backend_name, self.load_seconds = loaded.backend_name, loaded.load_seconds
        self.info = engine_info(loaded.engine)
        self.pid = os.getpid()  # the engine steps in this process
        self._async = AsyncEngine(loaded.engine)

    def generate(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                 request_id: str | None = None) -> AsyncIterator[SeqDelta]:
        return self._async.generate(prompt_token_ids, params, request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def shutdown(self) -> None:
        self._async.shutdown()
