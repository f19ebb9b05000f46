"""`localserve up`: serve a model on localhost behind the OpenAI-compatible API."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_NAME = "gemma3:270m"


def add_up_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up",
        help="serve a model on localhost (OpenAI-compatible API)",
        description=(
            "Serves MODEL (a .gguf file, a Hugging Face folder, random:NAME; default: the embedded "
            "Gemma 3 270M) behind an OpenAI-compatible API at http://HOST:PORT/v1. Settings come from "
            "flags, then LOCALSERVE_* environment variables (LOCALSERVE_PORT, LOCALSERVE_API_KEY=k1,k2, "
            "...), then the [up] table of the config file (LOCALSERVE_CONFIG, else config.toml in the "
            "user config dir)."
        ),
    )
    p.add_argument("model", nargs="?", default=None, help="model reference (default: the embedded Gemma 3 270M)")
    p.add_argument("--host", default=None, help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: 8000)")
    p.add_argument("--backend", default=None, help="auto|cpu|cuda|rocm|mlx|tpu (default: auto)")
    p.add_argument("--ctx", type=int, default=None, help="context length (default: the model's, capped by KV memory)")
    p.add_argument("--max-running", type=int, default=None,
                   help="sequences decoded at once (default: the backend's recommendation, GPU 1024, CPU 32)")
    p.add_argument("--max-queued", type=int, default=None,
                   help="sequences waiting beyond those; more get 429 + Retry-After (default: 4096)")
    p.add_argument("--max-tokens-default", type=int, default=None,
                   help="tokens generated for a request that sets no max_tokens (OpenAI chat, Responses); "
                        "a looping model then stops with finish_reason 'length' (like Ollama's num_predict; "
                        "0: up to the context; default: 4096)")
    p.add_argument("--api-key", dest="api_keys", action="append", default=None,
                   help="require this key on /v1 and the store's routes (Authorization: Bearer KEY); "
                        "repeatable")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: from MODEL)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all physical cores)")
    p.add_argument("--kv-memory", type=float, default=None,
                   help="GPU: the share of its total memory this server may hold, for weights, graphs and "
                        "KV pages together (as vLLM's --gpu-memory-utilization; default 0.9); CPU: the share "
                        "of free RAM the KV pages take (default 0.25)")
    p.add_argument("--weights", default=None,
                   help="auto|fp8: fp8 runs the layers' weights in e4m3 on NVIDIA GPUs with FP8 "
                        "tensor cores (default: auto, the backend's own)")
    p.add_argument("--kv-dtype", default=None,
                   help="auto|fp8: fp8 keeps the KV cache in e4m3 on NVIDIA GPUs with FP8 "
                        "(twice the tokens, half the attention reads; default: auto, the "
                        "compute dtype)")
    p.add_argument("--engine-process", default=None, choices=("auto", "on", "off"),
                   help="run the engine core (scheduler, backend, KV) in a process of its own (on) or on a "
                        "thread of the server process (off); auto: on with an accelerator, off on the CPU "
                        "(default: auto)")
    p.add_argument("--cors-origin", dest="cors_origins", action="append", default=None,
                   help="allow this browser origin (scheme://host[:port], or *); pages on localhost and "
                        "editor webviews are always allowed, others get 403; repeatable")
    p.add_argument("--allowed-hosts", dest="allowed_hosts", action="append", default=None,
                   help="answer requests for this Host name too (or *: any); bound to 127.0.0.1 the "
                        "server answers only localhost names and addresses, which stops DNS-rebinding "
                        "pages; repeatable")
    p.add_argument("--max-body-mb", type=int, default=None, help="request body limit in MiB (default: 32)")
    p.add_argument("--log-level", default=None, help="debug|info|warning|error (default: info)")
    p.set_defaults(func=run_up)


def served_name(model: str | None, explicit: str | None) -> str:
    if explicit:
        return explicit
    if model is None:
        return DEFAULT_MODEL_NAME
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else model.rstrip("/")


def run_up(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from localserve.server.settings import ServeSettings, SettingsError, resolve_settings

    # every setting a flag sets (argparse's dest is the field's name)
    flags = {f.name: getattr(args, f.name, None) for f in fields(ServeSettings)}
    try:
        settings = resolve_settings(flags)
    except SettingsError as exc:
        print(f"localserve up: {exc}", file=sys.stderr)
        return 2
    return serve(settings)


def serve(settings) -> int:
    import uvicorn

    from localserve.server.access import AccessPolicy, is_loopback
    from localserve.server.app import create_app
    from localserve.server.monitoring import end_streams_on_exit
    from localserve.server.state import ServerState

    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    name = served_name(settings.model, settings.served_model_name)
    access = AccessPolicy.for_bind(settings.host, settings.allowed_hosts, settings.cors_origins)
    state = ServerState(model_ref=name, backend=settings.backend, api_keys=settings.api_keys, access=access)
    url = f"http://{_url_host(settings.host)}:{settings.port}"
    say(f"localserve: serving {name} at {url}/v1 (loading the model...)")
    if not is_loopback(settings.host) and not settings.api_keys:
        state.warnings.append(f"listening on {settings.host} without an API key: anyone who can reach this "
                              "address can use the server and its model store (set --api-key)")
        say(f"localserve: warning: {state.warnings[-1]}")
    app = create_app(state, load=lambda st: _load_or_stop(st, settings, name, url),
                     max_body_bytes=settings.max_body_mb * 1024 * 1024)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            access_log=settings.log_level.lower() == "debug", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    end_streams_on_exit(server, app)  # open /api/events streams must not hold up a stop
    _exit_cleanly_on_signals()
    server.run()  # returns after SIGINT/SIGTERM, once open requests are done or cancelled
    if not server.started:
        say(f"localserve: could not listen on {settings.host}:{settings.port}")
        return 1
    return _EXIT_STATUS


def _exit_cleanly_on_signals() -> None:
    """uvicorn handles SIGINT/SIGTERM itself, then restores the previous handlers and raises the
    signal again once it has shut down; with the default handler that would end the process by
    the signal (exit status -15) after a clean shutdown. A stop asked for is a success: exit 0
    (1 when the engine process died)."""
    import signal

    def stop(signum, frame):
        raise SystemExit(_EXIT_STATUS)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


def _load_or_stop(state, settings, name: str, url: str) -> None:
    """A model that cannot load ends the server: the reason printed, exit status 1, within
    moments (a server answering 503 forever would hide it from whoever started it)."""
    try:
        _load(state, settings, name, url)
    except Exception as exc:
        _stop_failed(state, f"loading {name} failed: {exc}")


def _load(state, settings, name: str, url: str) -> None:
    from localserve.server.served_model import ServedModel

    model = _start_engine(settings, name)
    info = model.info
    say(f"localserve: model {name} ({model.config.architecture}, {model.source}) on backend {model.backend_name}"
        f" ({f'engine process {model.pid}' if hasattr(model, 'process') else 'engine in the server process'})")
    capped = (f" (the model's is {model.config.max_context}; the KV pool caps it: --kv-memory gives it more)"
              if info.max_context < model.config.max_context and settings.ctx is None else "")
    say(f"localserve: context {info.max_context} tokens{capped}; KV capacity {info.num_blocks * info.block_size} "
        f"tokens ({info.num_blocks} pages); loaded in {model.load_seconds:.1f} s")
    state.served = ServedModel(model, [name], _limits(settings, info.max_num_seqs), state.metrics)
    if hasattr(model, "process"):
        model.on_death = lambda why: _stop_failed(state, why)
    say(f"localserve: ready at {url}/v1")


def _start_engine(settings, name: str):
    """The engine, loaded and warmed up: in a process of its own (EngineCoreClient) or on a
    thread of this one (InProcessEngine), as --engine-process says."""
    from localserve.backends import select_backend
    from localserve.engine.backend import BackendConfig
    from localserve.engine.llm_engine import EngineConfig
    from localserve.runtime.default_model import resolve_model_ref

    backend_cls = select_backend(settings.backend)
    shape = serving_shape(settings, backend_cls.serving_defaults())
    say(f"localserve: {shape.describe()}")
    backend_cfg = BackendConfig(num_threads=settings.threads, memory_utilization=shape.memory_utilization,
                                max_num_seqs=shape.max_num_seqs, max_num_batched_tokens=shape.max_num_batched_tokens,
                                weight_format=settings.weights, kv_dtype=settings.kv_dtype)
    engine_cfg = EngineConfig(max_num_seqs=shape.max_num_seqs, max_num_batched_tokens=shape.max_num_batched_tokens,
                              max_context=settings.ctx)
    own_process = settings.engine_process == "on" or (settings.engine_process == "auto" and backend_cls.name != "cpu")
    if not own_process:
        from localserve.runtime.in_process import InProcessEngine
        from localserve.runtime.loader import load_model, warm_up

        loaded = load_model(settings.model, backend=settings.backend, backend_cfg=backend_cfg, engine_cfg=engine_cfg,
                            name=name)
        warm_up(loaded.engine)
        return InProcessEngine(loaded)
    from localserve.runtime.engine_client import EngineCoreClient
    from localserve.runtime.engine_core import CoreSpec
    from localserve.runtime.loader import load_tokenizer

    source = resolve_model_ref(settings.model)  # the default model is assembled once, here
    client = EngineCoreClient(CoreSpec(source, settings.backend, backend_cfg, engine_cfg, name, settings.log_level))
    client.tokenizer = load_tokenizer(client.source)
    return client


@dataclass(slots=True, frozen=True)
class ServingShape:
    """The batch shape and memory share a server runs with: each the user's setting, else the
    backend's recommendation."""

    max_num_seqs: int
    max_num_batched_tokens: int
    memory_utilization: float
    chosen: tuple[str, ...]  # the settings the user gave

    def describe(self) -> str:
        def how(name: str) -> str:
            return "set" if name in self.chosen else "the backend's default"

        return (f"up to {self.max_num_seqs} sequences at once ({how('max_running')}), {self.max_num_batched_tokens} "
                f"tokens a step; memory share {self.memory_utilization:g} ({how('kv_memory')}, --kv-memory)")


def serving_shape(settings, defaults) -> ServingShape:
    chosen = tuple(k for k in ("max_running", "kv_memory") if getattr(settings, k) is not None)
    seqs = settings.max_running or defaults.max_num_seqs
    return ServingShape(max_num_seqs=seqs, max_num_batched_tokens=max(defaults.max_num_batched_tokens, seqs),
                        memory_utilization=settings.kv_memory or defaults.memory_utilization, chosen=chosen)


def _stop_failed(state, why: str) -> None:
    """The model did not load, or the engine process is gone (its open requests have failed):
    /health says so until the server has stopped, with status 1, so that a supervisor
    (systemd, launchd) starts it again."""
    import os
    import signal

    state.load_error = why  # /health: 503 "failed", with this message
    say(f"localserve: {why}; stopping (exit status 1)")
    global _EXIT_STATUS
    _EXIT_STATUS = 1
    os.kill(os.getpid(), signal.SIGTERM)


_EXIT_STATUS = 0


def _limits(settings, max_running: int):
    from localserve.server.served_model import Limits

    return Limits(max_running=max_running, max_queued=settings.max_queued,
                  max_tokens_default=settings.max_tokens_default)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def say(msg: str) -> None:
    print(msg, flush=True)
