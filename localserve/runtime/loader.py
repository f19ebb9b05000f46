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
