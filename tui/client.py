"""The TUI's HTTP client of a localserve server: JSON routes and the /api/events stream."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import quote, urlparse

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class ServerError(Exception):
    """The server answered with an error status; `message` is its error body's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class NoServerError(Exception):
    """Nothing answers at the URL (connection refused, unknown host, timeout)."""


@dataclass(slots=True)
class SSEEvent:
    type: str
    data: dict


def is_local_url(url: str) -> bool:
    return (urlparse(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


def url_port(url: str) -> int:
    p = urlparse(url)
    return p.port or (443 if p.scheme == "https" else 80)


class ServerClient:
    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- server ---------------------------------------------------------------------------
    async def health(self) -> dict:
        """The /health body ({"status": "loading" | "ready" | "failed", ...}) even when it is a 503."""
        r = await self._send("GET", "/health", ok=(200, 503))
        return r.json()

    async def status(self) -> dict:
        return await self._json("GET", "/api/status")

    # -- store ----------------------------------------------------------------------------
    async def models(self) -> list[dict]:
        return (await self._json("GET", "/api/models"))["models"]

    async def model(self, name: str, ctx: int | None = None) -> dict:
        return await self._json("GET", f"/api/models/{quote(name)}", params={"ctx": ctx} if ctx else None)

    async def delete_model(self, name: str) -> dict:
        return await self._json("DELETE", f"/api/models/{quote(name)}")

    async def pull(self, ref: str, name: str | None = None) -> dict:
        return await self._json("POST", "/api/pull", json={"ref": ref, "name": name or None})

    async def quantize(self, source: str, target: str, name: str | None = None) -> dict:
        body = {"source": source, "target": target, "name": name or None}
        return await self._json("POST", "/api/quantize", json=body)

    async def quantize_types(self) -> dict:
        return await self._json("GET", "/api/quantize/types")

    async def estimate(self, source: str, target: str) -> dict:
        return await self._json("GET", "/api/quantize/estimate", params={"source": source, "target": target})

    async def job(self, job_id: str) -> dict:
        return await self._json("GET", f"/api/jobs/{quote(job_id)}")

    async def cancel_job(self, job_id: str) -> dict:
        return await self._json("DELETE", f"/api/jobs/{quote(job_id)}")

    # -- events ---------------------------------------------------------------------------
    async def events(self, types: str | None = None) -> AsyncIterator[SSEEvent]:
        """The server's events until the connection ends; the first is `hello`."""
        params = {"types": types} if types else None
        try:
            async with self._http.stream("GET", "/api/events", params=params,
                                         timeout=httpx.Timeout(10.0, read=None)) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise ServerError(r.status_code, _message(r))
                async for ev in parse_sse(r.aiter_lines()):
                    yield ev
        except (httpx.TransportError, OSError) as exc:
            raise NoServerError(f"{self.url}: {exc or type(exc).__name__}") from None

    # -- plumbing -------------------------------------------------------------------------
    async def _json(self, method: str, path: str, **kw) -> dict:
        return (await self._send(method, path, **kw)).json()

    async def _send(self, method: str, path: str, ok: tuple[int, ...] = (), **kw) -> httpx.Response:
        try:
            r = await self._http.request(method, path, **kw)
        except (httpx.TransportError, OSError) as exc:
            raise NoServerError(f"no localserve server answers at {self.url} ({type(exc).__name__})") from None
        if r.status_code >= 400 and r.status_code not in ok:
            raise ServerError(r.status_code, _message(r))
        return r


def _message(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return f"HTTP {r.status_code}: {r.text[:200]}"
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    return f"HTTP {r.status_code}: {str(body)[:200]}"


async def parse_sse(lines: AsyncIterator[str]) -> AsyncIterator[SSEEvent]:
    """The text/event-stream format: `event:` and `data:` lines, a blank line ends an event;
    comment lines (keep-alives) start with ':'."""
    kind, data = "message", []
    async for line in lines:
        if not line:
            if data:
                try:
                    payload = json.loads("\n".join(data))
                except ValueError:
                    payload = {"text": "\n".join(data)}
                yield SSEEvent(kind, payload if isinstance(payload, dict) else {"value": payload})
            kind, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                kind = value
            elif field == "data":
                data.append(value)
