"""Loading a model for serving: weights + tokenizer + a backend + an engine, in that order.

Every failure of the model files (unsupported architecture, truncated GGUF, missing tensor)
surfaces here as a typed ModelLoadError before any serving starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from localserve.backends import select_backend
from localserve.engine.backend import BackendConfig
from localserve.engine.llm_engine import EngineConfig, LLMEngine
from localserve.models.config import ModelConfig
from localserve.models.loader import load_weights
from localserve.paths import cache_dir
from localserve.runtime.default_model import resolve_model_ref
from localserve.runtime.gc_tuning import tune_gc


@dataclass(slots=True)
class LoadedModel:
    name: str
    source: str
    config: ModelConfig
    tokenizer: object | None
    engine: LLMEngine
    backend_name: str
    load_seconds: float
    info: dict = field(default_factory=dict)


def load_tokenizer(source: str):
    from localserve.models.tokenizer import Tokenizer

    if source.startswith("random:"):
        return None
    path = Path(source)
    if path.is_dir():
        return Tokenizer.from_hf_folder(path)
    return Tokenizer.from_gguf(path, cache_dir=cache_dir() / "tokenizers")


def load_model(
    ref: str | None = None,
    backend: str = "auto",
    backend_cfg: BackendConfig | None = None,
    engine_cfg: EngineConfig | None = None,
    name: str | None = None,
) -> LoadedModel:
    t0 = time.perf_counter()
    source = resolve_model_ref(ref)
    weights = load_weights(source)
    tokenizer = load_tokenizer(source)
    backend_cls = select_backend(backend)
    dev = backend_cls()
    dev.load(weights, backend_cfg or BackendConfig())
    engine = LLMEngine(dev, weights.config, tokenizer, engine_cfg or EngineConfig())
    gc_info = tune_gc()  # the serving loop's allocations no longer rescan the loaded model
    return LoadedModel(
        name=name or ref or "default",
        source=source,
        config=weights.config,
        tokenizer=tokenizer,
        engine=engine,
        backend_name=backend_cls.name,
        load_seconds=time.perf_counter() - t0,
        info={"gc": gc_info},
    )


def warm_up(engine: LLMEngine) -> None:
    """One short request before serving, so the first client does not pay for first-call
    initialisation (kernel dispatch, allocator, thread pools); its pages are then evicted."""
    from localserve.engine.sampling_params import SamplingParams

    bos = engine.model_config.bos_token_id
    engine.generate([[bos if bos is not None else 0] * 2], SamplingParams(max_tokens=2, temperature=0.0))
    engine.reset_prefix_cache()


def engine_info(engine: LLMEngine):
    """The EngineInfo the server reports (and, with the engine in its own process, receives)."""
    from localserve.runtime.core_messages import EngineInfo

    return EngineInfo(max_context=engine.max_context, max_num_seqs=engine.cfg.max_num_seqs,
                      block_size=engine.scheduler.kv.block_size,
                      num_blocks=engine.scheduler.kv.num_blocks, kv_bytes_per_token=_kv_bytes_per_token(engine),
                      device=_device_name(type(engine.backend)))


def _kv_bytes_per_token(engine: LLMEngine) -> int:
    # backends hold the pool as [layers, 2, tokens, kv_heads, head_dim]; torch pools expose it
    kv = getattr(engine.backend, "kv", None)
    if kv:
        k, v = kv[0]
        per_layer = (k.nbytes + v.nbytes) // max(1, k.shape[0])
        return per_layer * len(kv)
    return engine.model_config.kv_bytes_per_token(4)


def _device_name(backend_cls) -> str:
    try:
        devices = backend_cls.probe()
    except Exception:  # a probe that fails now still served the model; say what we know
        return backend_cls.name
    return devices[0].name if devices else backend_cls.name
