"""`ps`: the models a running localserve server has loaded, from its GET /v1/models.

The server's names are what clients send as `model` (the `localserve up` argument or
--served-model-name); where one is also a store name, the store adds size and quantization.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from localserve import envs
from localserve.store.store import ModelStore, StoreError

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass(slots=True)
class RunningModel:
    name: str
    context: int | None
    loaded_at: int  # unix seconds (the server's `created`)
    size: int | None = None  # from the store, when the name is in it
    quantization: str = ""
    status: str = "ready"  # or "loading", "failed: <why>" (from the server's /health)


def server_url() -> str:
    return envs.URL.get() or DEFAULT_URL


def api_key() -> str | None:
    """LOCALSERVE_API_KEY as `localserve up` reads it (comma-separated keys; the first one)."""
    keys = envs.API_KEY.get()
    return keys[0] if keys else None


def running_models(url: str, key: str | None = None, timeout: float = 10.0) -> list[RunningModel]:
    import httpx

    base = url.rstrip("/").removesuffix("/v1")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.get(f"{base}/v1/models", headers=headers, timeout=timeout)
    except httpx.TransportError as e:
        raise StoreError(f"no server answers at {base} ({type(e).__name__}); start one with `localserve up`") from None
    if r.status_code == 401:
        raise StoreError(f"{base} wants an API key: pass --api-key or set LOCALSERVE_API_KEY")
    if r.status_code == 503 and (pending := _not_ready(base, timeout)) is not None:
        return [pending]
    if r.status_code != 200:
        raise StoreError(f"{base}/v1/models answered HTTP {r.status_code}{_message(r)}; is this a localserve server?")
    try:
        cards = r.json()["data"]
        return [RunningModel(str(c["id"]), c.get("max_model_len"), int(c.get("created") or 0)) for c in cards]
    except (ValueError, KeyError, TypeError):
        raise StoreError(f"{base}/v1/models did not answer an OpenAI model list") from None


def _not_ready(base: str, timeout: float) -> RunningModel | None:
    """The model a server is still loading, or failed to load (its /health says which)."""
    import httpx

    try:
        health = httpx.get(f"{base}/health", timeout=timeout).json()
        name, status = str(health["model"]), str(health["status"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
    if status == "failed":
        status = f"failed: {health.get('error', '?')}"
    return RunningModel(name, None, 0, status=status)


def _message(r) -> str:
    try:
        return f" ({r.json()['error']['message']})"
    except (ValueError, KeyError, TypeError):
        return ""


def add_store_facts(models: list[RunningModel], store: ModelStore) -> None:
    for rm in models:
        try:
            m = store.lookup(rm.name)
        except (StoreError, ValueError):  # a path, a random: model, a name the store lacks
            continue
        rm.size, rm.quantization = m.size, m.quantization


def since(t: int, now: float | None = None) -> str:
    s = int((now if now is not None else time.time()) - t)
    if s < 60:
        return f"{s} seconds ago"
    if s < 3600:
        return f"{s // 60} minutes ago"
    if s < 86400:
        return f"{s // 3600} hours ago"
    return f"{s // 86400} days ago"
