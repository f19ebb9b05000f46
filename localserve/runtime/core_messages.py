"""What crosses between the server process and the engine core process, and nothing else.

Server → core: AddRequest, Abort, Shutdown. Core → server: Ready once the model is loaded,
then one StepOutput per engine step (every row's new tokens and text, and now and then the
engine's stats), RequestFailed for a request the engine refused or lost, and Fatal when the
core cannot go on. Encoded with msgspec's MessagePack; the payload types are the engine's own
dataclasses (SamplingParams, SeqDelta, EngineStats), which msgspec encodes as they are.
"""

from __future__ import annotations

import msgspec

from localserve.engine.outputs import EngineStats, SeqDelta
from localserve.engine.sampling_params import SamplingParams
from localserve.models.config import ModelConfig

# -- server → core -------------------------------------------------------------------------


class AddRequest(msgspec.Struct, tag="add", array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class Abort(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


ToCore = AddRequest | Abort | Shutdown

# -- core → server -------------------------------------------------------------------------


class EngineInfo(msgspec.Struct, kw_only=True):
    """What the server needs to know of the loaded engine: limits, the KV pool, the device."""

    max_context: int
    max_num_seqs: int
    block_size: int
    num_blocks: int
    kv_bytes_per_token: int
    device: str  # the accelerator's name (or the backend's, where it has none)


class Ready(msgspec.Struct, tag="ready", kw_only=True, array_like=True):
    info: EngineInfo
    config: ModelConfig
    backend_name: str
    source: str
    load_seconds: float
    stats: EngineStats


class StepOutput(msgspec.Struct, tag="step", array_like=True):
    deltas: list[SeqDelta]
    stats: EngineStats | None = None  # sent at most a few times a second


class RequestFailed(msgspec.Struct, tag="failed", array_like=True):
    """A request the engine refused when it was added (status: the HTTP status of its
    LocalServeError) or lost when a step failed (status 500)."""

    request_id: str
    status: int
    code: str
    message: str


class Fatal(msgspec.Struct, tag="fatal", array_like=True):
    """The core cannot go on (the model did not load); it exits after sending this."""

    message: str


FromCore = Ready | StepOutput | RequestFailed | Fatal

to_core_encoder = msgspec.msgpack.Encoder()
to_core_decoder = msgspec.msgpack.Decoder(ToCore)
from_core_encoder = msgspec.msgpack.Encoder()
from_core_decoder = msgspec.msgpack.Decoder(FromCore)
