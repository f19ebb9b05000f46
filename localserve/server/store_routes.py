"""The model store over HTTP, for the TUI and other remote clients; thin over localserve.store.

    GET    /api/models                  the store's models (+ which is the embedded default, which is served)
    GET    /api/models/{name}           one model: manifest, shapes, memory for weights + KV, fits
    DELETE /api/models/{name}           remove it (not the embedded default, not the served model)
    POST   /api/pull                    {"ref", "name"?, "revision"?} -> a job (202)
    POST   /api/quantize                {"source", "target", "name"?} -> a job (202)
    GET    /api/quantize/types          targets for GGUF and HF sources
    GET    /api/quantize/estimate       ?source=&target= -> the output size before converting
    GET    /api/jobs, /api/jobs/{id}    job progress; DELETE /api/jobs/{id} cancels

Progress also reaches GET /api/events as `job` events. With API keys set, every route here
needs a key, as /v1 does: these change what is on the server's disk.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

from litestar import Request, delete, get, post
from litestar.exceptions import HTTPException, NotAuthorizedException

from localserve.server.access import store_key_guard
from localserve.server.events import EVENTS_KEY
from localserve.server.jobs import Job, JobManager
from localserve.server.state import STATE_KEY, server_state

STORE_API_KEY = "localserve.store_api"


@dataclass
class StoreService:
    """The server's store (opened on first use, the embedded default registered) and its jobs."""

    jobs: JobManager
    _store: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def store(self):
        with self._lock:
            if self._store is None:
                from localserve.runtime.default_model import default_model_path
                from localserve.store.default import register_default
                from localserve.store.store import ModelStore

                store = ModelStore()
                register_default(store, default_model_path())
                self._store = store
            return self._store


def store_service(request: Request) -> StoreService:
    return request.app.state[STORE_API_KEY]


# every store route: tagged for the OpenAPI page, behind the API key when the server has one
STORE = {"tags": ["store"], "guards": [store_key_guard]}


def _store_errors(fn):
    """StoreError -> 400 (404 when the model is not there), with the store's message."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        from localserve.store.names import InvalidNameError
        from localserve.store.store import ModelNotInStoreError, StoreError

        try:
            return fn(*args, **kwargs)
        except ModelNotInStoreError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None
        except (StoreError, InvalidNameError, ValueError) as e:
            raise HTTPException(status_code=400, detail=str(e)) from None

    return run


def manifest_row(m, default: bool, served: bool) -> dict:
    return {
        "name": m.ref, "size": m.size, "format": m.format, "quantization": m.quantization,
        "architecture": m.architecture, "parameters": m.parameters, "context": m.context,
        "source": m.source, "modified": m.created, "default": default,
        "served": served,
    }


def _is_served(request: Request, m, path: Path | None) -> bool:
    """The server serves this model: by its store name, or by its file (the embedded default
    is served from the runtime's copy, which the store holds as a hard link)."""
    served = server_state(request).served
    if served is None:
        return False
    if m.ref in served.names:
        return True
    try:
        return path is not None and os.path.samefile(path, served.loaded.source)
    except OSError:  # random:..., a file that went away
        return False


def _path_or_none(store, m) -> Path | None:
    from localserve.store.store import StoreError

    try:
        return store.model_path(m)
    except StoreError:
        return None


@get("/api/models", sync_to_thread=True, summary="Models in the store", **STORE)
@_store_errors
def list_models(request: Request) -> dict:
    from localserve.store.default import is_default

    store = store_service(request).store
    rows = [manifest_row(m, is_default(m), _is_served(request, m, _path_or_none(store, m))) for m in store.list()]
    return {"models": rows}


@get("/api/models/{name:path}", sync_to_thread=True, summary="One model: metadata and memory needs", **STORE)
@_store_errors
def show_model(request: Request, name: str, ctx: int | None = None) -> dict:
    from localserve.store.default import is_default
    from localserve.store.model_info import available_memory, summarize_gguf, summarize_hf_folder

    store = store_service(request).store
    m = store.lookup(name.lstrip("/"))
    path = store.model_path(m)
    s = summarize_hf_folder(path) if path.is_dir() else summarize_gguf(path)
    ctx = ctx or s.context
    weights, kv, avail = s.cpu_weight_bytes(), s.kv_bytes(ctx), available_memory()
    row = manifest_row(m, is_default(m), _is_served(request, m, path))
    row.update({k: getattr(s, k) for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                                            "vocab_size", "sliding_window", "tensor_types", "weight_bytes")})
    row.update(has_chat_template=s.chat_template is not None, ctx=ctx, weights_memory_bytes=weights, kv_bytes=kv,
               memory_needed=weights + kv, memory_available=avail, fits=weights + kv <= avail,
               quantized_from=m.extra.get("quantized_from"))
    return row


@delete("/api/models/{name:path}", sync_to_thread=True, status_code=200, summary="Remove a model", **STORE)
@_store_errors
def delete_model(request: Request, name: str) -> dict:
    from localserve.store.default import is_default

    store = store_service(request).store
    m = store.lookup(name.lstrip("/"))
    if is_default(m):
        raise HTTPException(status_code=400,
                            detail=f"{m.ref} is the embedded default model; it ships with localserve and stays")
    path = _path_or_none(store, m)
    if _is_served(request, m, path):
        raise HTTPException(status_code=409, detail=f"{m.ref} is the model this server serves; stop the server first")
    m, freed = store.remove(m.ref)
    return {"deleted": m.ref, "freed": freed}


@post("/api/pull", status_code=202, summary="Pull a model into the store (a job)", **STORE)
async def start_pull(request: Request, data: dict) -> dict:
    ref = str(data.get("ref") or data.get("model") or "").strip()
    if not ref:
        raise HTTPException(status_code=400, detail="'ref' is required: an HF repo, a URL or a local path")
    name, revision = data.get("name") or None, data.get("revision") or None
    service = store_service(request)
    await asyncio.to_thread(_store_errors(_check_pull), ref, name)  # a bad reference is a 400, not a job

    def work(job: Job) -> dict:
        from localserve.store.pull import PullOptions, pull

        job.note(f"pulling {ref}")
        m = pull(ref, service.store, PullOptions(name, revision, on_progress=job.progress, show_progress=False,
                                                  log=job.note))
        return {"name": m.ref, "size": m.size, "architecture": m.architecture, "quantization": m.quantization}

    return service.jobs.start("pull", ref, {"name": name, "revision": revision}, work).to_dict()


def _check_pull(ref: str, name: str | None) -> None:
    from localserve.store.names import parse_name
    from localserve.store.sources import parse_pull_ref

    parse_pull_ref(ref)
    if name:
        parse_name(name)


def _check_quantize(service: StoreService, source: str, target: str, name: str | None) -> None:
    from localserve.store.names import parse_name
    from localserve.store.quantize import check_target
    from localserve.store.quantize_job import resolve_source

    path, _ = resolve_source(service.store, source)
    check_target(target, hf=path.is_dir())
    if name:
        parse_name(name)


@post("/api/quantize", status_code=202, summary="Quantize a model into the store (a job)",
      **STORE)
async def start_quantize(request: Request, data: dict) -> dict:
    source, target = str(data.get("source") or "").strip(), str(data.get("target") or "").strip().upper()
    if not source or not target:
        raise HTTPException(status_code=400, detail="'source' and 'target' are required")
    name = data.get("name") or None
    service = store_service(request)
    await asyncio.to_thread(_store_errors(_check_quantize), service, source, target, name)

    def work(job: Job) -> dict:
        from localserve.store.quantize import count_values
        from localserve.store.quantize_job import quantize_to_store, resolve_source

        store = service.store
        src_path, _ = resolve_source(store, source)
        job.progress(0, count_values(src_path))
        job.note(f"quantizing {source} to {target}")
        outcome = quantize_to_store(store, source, target, name, on_values=job.advance)
        r = outcome.result
        return {"name": outcome.manifest.ref, "size": r.out_bytes, "source_bytes": r.src_bytes, "types": r.types}

    return service.jobs.start("quantize", source, {"target": target, "name": name}, work, unit="weights").to_dict()


@get("/api/quantize/types", sync_to_thread=True, summary="Quantization targets", **STORE)
def quantize_types() -> dict:
    from localserve.store.quantize import HF_TARGETS, writable_types

    return {"gguf": writable_types(), "hf": list(HF_TARGETS)}


@get("/api/quantize/estimate", sync_to_thread=True, summary="Estimated output size of a quantization", **STORE)
@_store_errors
def quantize_estimate(request: Request, source: str, target: str) -> dict:
    from localserve.store.quantize_job import resolve_source

    path, _ = resolve_source(store_service(request).store, source)
    return estimate_quantized(path, target)


def estimate_quantized(path: Path, target: str) -> dict:
    """File bytes after converting `path` to `target`, per tensor with the store's own type
    choice (norms F32, the head at least Q8_0, rows that do not fill a block F16)."""
    import gguf

    from localserve.store.quantize import check_target, tensor_type

    def nbytes(kind: str, shape) -> int:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        return prod(shape) // block * size

    if path.is_dir():
        from localserve.store.model_info import summarize_hf_folder

        target = check_target(target, hf=True)
        s = summarize_hf_folder(path)
        out = s.matrix_params * nbytes(target, (1, 256)) // 256 + (s.parameters - s.matrix_params) * 4
        return {"source_bytes": s.weight_bytes, "estimated_bytes": out, "target": target}
    from localserve.models.gguf_file import GGUFFile

    target = check_target(target)
    f = GGUFFile(path)
    try:
        tied = "output.weight" not in f.tensor_infos
        out = 0
        for name, info in f.tensor_infos.items():
            is_head = name == "output.weight" or (tied and name == "token_embd.weight")
            out += nbytes(tensor_type(name, info.shape, target, is_head), info.shape)
        src = sum(i.n_bytes for i in f.tensor_infos.values())
    finally:
        f.close()
    overhead = path.stat().st_size - src  # metadata, tokenizer, alignment: carried over as they are
    return {"source_bytes": src + overhead, "estimated_bytes": out + overhead, "target": target}


@get("/api/jobs", summary="Pull and quantize jobs", **STORE)
async def list_jobs(request: Request) -> dict:
    return {"jobs": [j.to_dict() for j in store_service(request).jobs.list()]}


@get("/api/jobs/{job_id:str}", summary="One job", **STORE)
async def get_job(request: Request, job_id: str) -> dict:
    job = store_service(request).jobs.get(job_id)
    if job is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
    return job.to_dict()


@delete("/api/jobs/{job_id:str}", status_code=200, summary="Cancel a job", **STORE)
async def cancel_job(request: Request, job_id: str) -> dict:
    job = store_service(request).jobs.cancel(job_id)
    if job is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
    return job.to_dict()


ROUTES = [list_models, show_model, delete_model, start_pull, start_quantize, quantize_types, quantize_estimate,
          list_jobs, get_job, cancel_job]


def make_store_service(app_state) -> StoreService:
    return StoreService(JobManager(app_state[EVENTS_KEY]))
