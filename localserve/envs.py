"""Every LOCALSERVE_* environment variable, declared once: name, type, default and one line of
doc (vLLM's envs.py, mini-sglang's env.py). `localserve envs` prints this table.

Code reads a knob where it uses it, `envs.CASCADE.get()`, not at import (the one exception,
LOCALSERVE_MAX_GRAPH_BATCH, says so), so a test's `monkeypatch.setenv` applies to the next read.
An unset variable reads as the knob's `default` text, parsed like a set one; a parser that
answers None for a set text (an empty LOCALSERVE_HOME, ...) also means the default. Each parser
keeps the meaning the variable had where it was read before this module existed; a text that
does not parse raises EnvError (a ValueError) naming the variable.

The `localserve up` settings are knobs too (`setting` names the ServeSettings field, whose
default is the knob's): `localserve up` resolves flags > these variables > the config file >
the defaults in localserve/server/settings.py; `get()` reads only the variable.

Imports nothing but the standard library: engine/, models/ and store/ read it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class EnvError(ValueError):
    """A LOCALSERVE_* variable holds a text its knob cannot parse."""


@dataclass(frozen=True, slots=True)
class Knob(Generic[T]):
    name: str  # the variable, LOCALSERVE_...
    type: str  # as `localserve envs` shows it: int, 0|1, auto|0|1, path, ...
    default: str | None  # the text an unset variable stands for; None: no value
    parse: Callable[[str], T | None]  # raises ValueError(what it expected) on a bad text
    group: str  # the heading `localserve envs` lists it under
    doc: str  # one line
    setting: str | None = None  # the `localserve up` setting (ServeSettings field) it sets

    def get(self) -> T | None:
        """The variable's value now (the default when unset)."""
        text = os.environ.get(self.name)
        value = None if text is None else self.parse_text(text)
        return self.default_value if value is None else value

    @property
    def default_value(self) -> T | None:
        return None if self.default is None else self.parse_text(self.default)

    def parse_text(self, text: str) -> T | None:
        try:
            return self.parse(text)
        except ValueError as exc:
            raise EnvError(f"{self.name}={text!r}: {exc}") from None


# -- parsers ---------------------------------------------------------------------------------

def _text(text: str) -> str:
    return text


def _text_or_none(text: str) -> str | None:
    """An empty value counts as unset."""
    return text or None


def _on_unless_0(text: str) -> bool:
    """The "1"/"0" flags: anything but "0" is on."""
    return text != "0"


def _auto_bool(text: str) -> bool | None:
    """0/false/off/no, 1/true/on/yes, anything else (auto): None."""
    text = text.strip().lower()
    if text in ("0", "false", "off", "no"):
        return False
    if text in ("1", "true", "on", "yes"):
        return True
    return None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("expected an integer") from None


def _int_or_none(text: str) -> int | None:
    return _int(text) if text else None


def _float_or_none(text: str) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        raise ValueError("expected a number") from None


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def _bytes(text: str) -> int | None:
    """Bytes, or with a K/M/G/T/P suffix (binary; "B", "iB" allowed): 512M, 2G, 1.5GiB.
    Blank: None."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if not text:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGTP]?)", text)
    if m is None:
        raise ValueError("expected bytes, e.g. 512M or 2G")
    return int(float(m[1]) * _BYTE_UNITS[m[2]])


# -- files and clients -----------------------------------------------------------------------
_FILES = "files and clients"
HOME = Knob("LOCALSERVE_HOME", "path", None, _text_or_none, _FILES,
            "the data dir (models); caches go under its cache/, the config under config/; unset: "
            "the platform's user data, cache and config dirs")
CONFIG = Knob("LOCALSERVE_CONFIG", "path", None, _text_or_none, _FILES,
              "the config file whose [up] table `localserve up` reads; unset: config.toml in the "
              "config dir")
URL = Knob("LOCALSERVE_URL", "url", None, _text_or_none, _FILES,
           "the server `localserve ps` and `localserve tui` talk to; unset: "
           "http://127.0.0.1:8000 (the TUI: port LOCALSERVE_PORT)")
DISK_RESERVE = Knob("LOCALSERVE_DISK_RESERVE", "bytes", "64M", _bytes, _FILES,
                    "disk space every store write leaves free (K/M/G/T/P suffixes); a huge one "
                    "makes any write hit a full disk")

# -- `localserve up`: flags > these > the config file's [up] table > these defaults ----------
_UP = "localserve up (a flag wins over these, these over the config file's [up] table)"
MODEL = Knob("LOCALSERVE_MODEL", "str", None, _text_or_none, _UP,
             "MODEL: a .gguf, an HF folder, random:NAME or a stored name; unset: the embedded "
             "Gemma 3 270M", setting="model")
HOST = Knob("LOCALSERVE_HOST", "str", "127.0.0.1", _text_or_none, _UP,
            "the address to bind; one other than localhost warns without an API key",
            setting="host")
PORT = Knob("LOCALSERVE_PORT", "int", "8000", _int_or_none, _UP,
            "the port to serve on", setting="port")
BACKEND = Knob("LOCALSERVE_BACKEND", "str", "auto", _text_or_none, _UP,
               "auto, cpu, cuda or rocm", setting="backend")
CTX = Knob("LOCALSERVE_CTX", "int", None, _int_or_none, _UP,
           "the context length; unset: the model's (capped by the KV pool either way)",
           setting="ctx")
MAX_RUNNING = Knob("LOCALSERVE_MAX_RUNNING", "int", None, _int_or_none, _UP,
                   "sequences decoded together; unset: the backend's recommendation (GPU 1024, CPU 32)",
                   setting="max_running")
MAX_QUEUED = Knob("LOCALSERVE_MAX_QUEUED", "int", "4096", _int_or_none, _UP,
                  "sequences waiting beyond those before 429 + Retry-After", setting="max_queued")
MAX_TOKENS_DEFAULT = Knob("LOCALSERVE_MAX_TOKENS_DEFAULT", "int", "4096", _int_or_none, _UP,
                          "tokens generated for a request that sets no max_tokens; 0: up to the "
                          "context", setting="max_tokens_default")
API_KEY = Knob("LOCALSERVE_API_KEY", "list", "", _comma_list, _UP,
               "comma-separated API keys the /v1 routes want (ps and the TUI send the first)",
               setting="api_keys")
SERVED_MODEL_NAME = Knob("LOCALSERVE_SERVED_MODEL_NAME", "str", None, _text_or_none, _UP,
                         "the model id clients use; unset: from MODEL", setting="served_model_name")
THREADS = Knob("LOCALSERVE_THREADS", "int", None, _int_or_none, _UP,
               "CPU backend threads; unset: the physical cores", setting="threads")
KV_MEMORY = Knob("LOCALSERVE_KV_MEMORY", "float", None, _float_or_none, _UP,
                 "GPU: the share of its total memory for weights, graphs and KV pages together (as "
                 "vLLM's --gpu-memory-utilization); CPU: the share of free RAM the KV pages take; "
                 "unset: the backend's (GPU 0.9, CPU 0.25)", setting="kv_memory")
WEIGHTS = Knob("LOCALSERVE_WEIGHTS", "auto|fp8", "auto", _text_or_none, _UP,
               "fp8: the layers' weights in e4m3 on NVIDIA GPUs with FP8 tensor cores",
               setting="weights")
KV_DTYPE = Knob("LOCALSERVE_KV_DTYPE", "auto|fp8", "auto", _text_or_none, _UP,
                "fp8: KV pages in e4m3 on NVIDIA GPUs with FP8", setting="kv_dtype")
ENGINE_PROCESS = Knob("LOCALSERVE_ENGINE_PROCESS", "auto|on|off", "auto", _text_or_none, _UP,
                      "the engine core in a process of its own (on) or on a thread of the server's (off); "
                      "auto: on with an accelerator, off on the CPU", setting="engine_process")
CORS_ORIGINS = Knob("LOCALSERVE_CORS_ORIGINS", "list", "", _comma_list, _UP,
                    "comma-separated browser origins allowed beyond localhost pages and editor webviews "
                    "(*: any); others get 403", setting="cors_origins")
ALLOWED_HOSTS = Knob("LOCALSERVE_ALLOWED_HOSTS", "list", "", _comma_list, _UP,
                     "comma-separated Host names answered beyond localhost names and addresses (*: any); "
                     "bound to a non-loopback address without this, any Host", setting="allowed_hosts")
MAX_BODY_MB = Knob("LOCALSERVE_MAX_BODY_MB", "int", "32", _int_or_none, _UP,
                   "the request body limit in MiB", setting="max_body_mb")
LOG_LEVEL = Knob("LOCALSERVE_LOG_LEVEL", "str", "info", _text_or_none, _UP,
                 "debug, info, warning or error", setting="log_level")

# -- the engine and the serving process ------------------------------------------------------
_ENGINE = "engine and serving process"
GC = Knob("LOCALSERVE_GC", "tuned|default", "tuned", _text, _ENGINE,
          "tuned: after load, freeze what is alive and raise gen0's threshold; default: CPython's "
          "collector as it is")
GC_THRESHOLD = Knob("LOCALSERVE_GC_THRESHOLD", "int", "50000", _int, _ENGINE,
                    "the young generation's threshold when the collector is tuned")
ASYNC_SCHEDULING = Knob("LOCALSERVE_ASYNC_SCHEDULING", "auto|0|1", "auto", _auto_bool, _ENGINE,
                        "overlap scheduling (prepare step N+1 while N runs); auto: where the "
                        "backend supports it, 1 still needs its support")
EARLY_SUBMIT = Knob("LOCALSERVE_EARLY_SUBMIT", "0|1", "1", _on_unless_0, _ENGINE,
                    "submit the next step before detokenizing the last one; 0: at the next "
                    "step's start")

# -- the CPU backend -------------------------------------------------------------------------
_CPU = "cpu backend"
PREPARED_CACHE = Knob("LOCALSERVE_PREPARED_CACHE", "0|1", "1", _on_unless_0, _CPU,
                      "0: quantize a GGUF's layers at every start instead of keeping their Q8 codes "
                      "under cache/prepared/ after the first")
Q8_KERNEL = Knob("LOCALSERVE_Q8_KERNEL", "0|1", "1", _on_unless_0, _CPU,
                 "0: Q8_0 matmuls in torch, not the compiled kernel")
ATTENTION_KERNEL = Knob("LOCALSERVE_ATTENTION_KERNEL", "0|1", "1", _on_unless_0, _CPU,
                        "0: paged attention in torch, not the compiled kernel")

# -- the CUDA backend (benchmarks/GPU_NOTES.md has the measurements behind each default) ----------------
_CUDA = "cuda backend"
ATTENTION = Knob("LOCALSERVE_ATTENTION", "flashinfer|triton|torch", None, _text_or_none, _CUDA,
                 "start the attention order (flashinfer, triton, torch) here; unset: from the "
                 "first")
FLASHINFER_BACKEND = Knob("LOCALSERVE_FLASHINFER_BACKEND", "str", "fa2", _text, _CUDA,
                          "the `backend` of FlashInfer's prefill wrappers")
FUSED = Knob("LOCALSERVE_FUSED", "auto|0|1", "auto", _text, _CUDA,
             "the fused Triton kernels: auto in bf16/fp16 on a GPU, 1 also in fp32 and the "
             "interpreter, 0 never")
GEMV = Knob("LOCALSERVE_GEMV", "0|1", "1", _on_unless_0, _CUDA,
            "0: steps of 1-2 sequences keep cuBLAS instead of the Triton GEMV")
FP8_FUSED_QUANT = Knob("LOCALSERVE_FP8_FUSED_QUANT", "0|1", "1", _on_unless_0, _CUDA,
                       "0: with --weights fp8, activations are quantized by a kernel of their "
                       "own, not by the norm and act*mul kernels")
PINNED = Knob("LOCALSERVE_PINNED", "0|1", "1", _on_unless_0, _CUDA,
              "0: per-step inputs from pageable memory, not the pinned staging ring")
MAX_GRAPH_BATCH = Knob("LOCALSERVE_MAX_GRAPH_BATCH", "int", "512", _int, _CUDA,
                       "the largest decode CUDA graph (sequences); read once, when the CUDA "
                       "backend is imported")
PIECEWISE = Knob("LOCALSERVE_PIECEWISE", "0|1", "1", _on_unless_0, _CUDA,
                 "0: no piecewise CUDA graphs for prefill and mixed steps")
PIECEWISE_MAX_TOKENS = Knob("LOCALSERVE_PIECEWISE_MAX_TOKENS", "int", "2048", _int_or_none, _CUDA,
                            "the largest step (tokens) piecewise graphs take; not an integer: a "
                            "warning, the default")
CASCADE = Knob("LOCALSERVE_CASCADE", "auto|1|force|0", "auto", _text, _CUDA,
               "shared-prefix attention: auto in cascade decode graphs, 1 also eager, force for "
               "any shared prefix, 0 never")
CASCADE_MIN_GB = Knob("LOCALSERVE_CASCADE_MIN_GB", "float", "2", _float_or_none, _CUDA,
                      "cascade a decode step when it saves this many GiB of KV reads (force: any)")
FI_TENSOR_CORES = Knob("LOCALSERVE_FI_TENSOR_CORES", "auto|0|1", "auto", _text, _CUDA,
                       "FlashInfer decode through tensor cores; auto: when a KV head serves 4+ "
                       "query heads")
FI_NO_SPLIT_MIN = Knob("LOCALSERVE_FI_NO_SPLIT_MIN", "int", None, _int, _CUDA,
                       "rows x KV heads from which tensor-core decode graphs plan without "
                       "split-KV; unset: 2 per SM (256 off a GPU)")
FI_HEADROOM = Knob("LOCALSERVE_FI_HEADROOM", "0|1", "1", _on_unless_0, _CUDA,
                   "0: tensor-core decode graphs below that plan their exact pages, not with "
                   "headroom")


KNOBS: dict[str, Knob] = {k.name: k for k in list(globals().values()) if isinstance(k, Knob)}
UP_SETTINGS: dict[str, Knob] = {k.setting: k for k in KNOBS.values() if k.setting}
