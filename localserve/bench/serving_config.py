"""What a `localserve bench --serving` run is asked to do, checked, and the command line that asks
for it again. Light on purpose (no numpy, no asyncio): the CLI reads its defaults when it builds
its parser, for every `localserve` command."""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
DATASETS = ("random", "sharegpt-like", "prefix-repetition")
PROMPT_FORMATS = ("auto", "ids", "text")
HTTP_CLIENTS = ("builtin", "httpx")
STREAMS_PER_PROC = 512  # --client-procs auto: a client process for every this many streams in flight


def parse_length(text: str) -> tuple[int, int]:
    """`128` -> (128, 128); `64:256` -> (64, 256), both inclusive."""
    lo, sep, hi = str(text).partition(":")
    try:
        a, b = int(lo), int(hi) if sep else int(lo)
    except ValueError:
        raise ValueError(f"expected a length N or a range LO:HI, got {text!r}") from None
    if a < 1 or b < a:
        raise ValueError(f"a length must be >= 1 and a range LO:HI needs LO <= HI, got {text!r}")
    return a, b


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def auto_client_procs(num_requests: int, max_concurrency: int | None, cores: int | None = None) -> int:
    """A client process for every STREAMS_PER_PROC streams that can be in flight at once, and no
    more than a quarter of the cores (a server on the same machine needs the rest)."""
    streams = min(num_requests, max_concurrency or num_requests)
    return max(1, min(math.ceil(streams / STREAMS_PER_PROC), (cores or cpu_count()) // 4))


@dataclass(slots=True)
class ServingBenchConfig:
    url: str = "http://127.0.0.1:8000"
    endpoint: str = "completions"  # or "chat"
    dataset: str = "random"
    input_len: str = "1024"  # N or LO:HI
    output_len: str = "128"
    num_prompts: int = 100
    request_rate: float = math.inf  # requests per second; inf: all at once
    max_concurrency: int | None = None
    prefix_len: int = 2048  # prefix-repetition: tokens of each shared prefix
    num_prefixes: int = 64  # prefix-repetition: prompts are spread evenly over this many prefixes
    warmup: int = 1
    seed: int = 0
    prompt_format: str = "auto"  # ids: token-id lists (completions only); text; auto: text if the model has a tokenizer
    http_client: str = "builtin"  # or httpx (a check on the built-in client; far more CPU an event)
    client_procs: int | None = None  # None: auto_client_procs
    api_key: str | None = None
    vocab_size: int | None = None  # for token-id prompts when the server does not say
    in_process: bool = False
    model: str | None = None  # --in-process: the model to load (default: the server's)
    backend: str = "auto"  # --in-process: auto is the server's backend
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {self.endpoint!r}; choose from {', '.join(ENDPOINTS)}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"unknown prompt format {self.prompt_format!r}")
        if self.http_client not in HTTP_CLIENTS:
            raise ValueError(f"unknown HTTP client {self.http_client!r}; choose from {', '.join(HTTP_CLIENTS)}")
        if self.endpoint == "chat" and self.prompt_format == "ids":
            raise ValueError("the chat endpoint takes text prompts, not token ids")
        parse_length(self.input_len)
        parse_length(self.output_len)
        if self.num_prompts < 1 or (self.client_procs is not None and self.client_procs < 1) or self.warmup < 0:
            raise ValueError("--num-prompts and --client-procs must be >= 1, --warmup >= 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be >= 1")
        if self.dataset == "prefix-repetition" and not (self.prefix_len >= 1 and 1 <= self.num_prefixes <= self.num_prompts):
            raise ValueError("prefix-repetition needs --prefix-len >= 1 and 1 <= --num-prefixes <= --num-prompts")
        if not self.request_rate > 0:
            raise ValueError("--request-rate must be positive or inf")

    def procs(self) -> int:
        return self.client_procs or auto_client_procs(self.num_prompts, self.max_concurrency)


_FLAGS = {"url": "--url", "endpoint": "--endpoint", "dataset": "--dataset", "input_len": "--input-len",
          "output_len": "--output-len", "num_prompts": "--num-prompts", "request_rate": "--request-rate",
          "max_concurrency": "--max-concurrency", "prefix_len": "--prefix-len",
          "num_prefixes": "--num-prefixes", "warmup": "--warmup", "seed": "--seed",
          "prompt_format": "--prompt-format", "http_client": "--http-client", "client_procs": "--client-procs",
          "model": "--model", "backend": "--backend", "threads": "--threads"}


def command_line(cfg: ServingBenchConfig) -> str:
    """The command that runs this configuration (the settings that differ from the defaults)."""
    d = ServingBenchConfig()
    parts = ["localserve", "bench", "--serving"]
    for name, flag in _FLAGS.items():
        v = getattr(cfg, name)
        if name in ("prefix_len", "num_prefixes") and cfg.dataset != "prefix-repetition":
            continue
        if v != getattr(d, name) or name in ("num_prompts", "input_len", "output_len"):
            parts += [flag, "inf" if v == math.inf else f"{v:g}" if isinstance(v, float) else str(v)]
    if cfg.api_key:
        parts += ["--api-key", "..."]
    if cfg.in_process:
        parts.append("--in-process")
    return shlex.join(parts)
