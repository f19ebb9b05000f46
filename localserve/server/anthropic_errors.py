"""Errors on /v1/messages* in Anthropic's shape: {"type": "error", "error": {"type", "message"}}.

These handlers sit on the Anthropic route handlers themselves, so they win over the app's
OpenAI-shaped ones for everything raised while serving those routes: the body's validation,
the API-key guard, the body-size limit, engine errors.
"""

from __future__ import annotations

import logging

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException

from localserve.errors import ContextOverflowError, EngineOverloadedError, LocalServeError
from localserve.server.anthropic_protocol import ErrorDetail, ErrorResponse
from localserve.server.errors import malformed_json

log = logging.getLogger("localserve.server")

# a full server is "overloaded" to Anthropic clients (they back off and retry on 529)
OVERLOADED = 529

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    OVERLOADED: "overloaded_error",
}


def error_body(status: int, message: str) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(type=TYPES.get(status, "api_error"), message=message))


def status_of(exc: LocalServeError) -> int:
    return OVERLOADED if isinstance(exc, EngineOverloadedError) else exc.status


def _respond(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(content=error_body(status, message), status_code=status, media_type=MediaType.JSON,
                    headers=headers)


def message_of(exc: LocalServeError) -> str:
    """The error's text; a prompt longer than the context reads as Anthropic's API words it,
    which is what Claude Code recognises (it then compacts the conversation and retries)."""
    if isinstance(exc, ContextOverflowError):
        return f"prompt is too long: {exc.num_tokens} tokens > {exc.max_context - 1} maximum"
    return str(exc)


def on_localserve_error(_: Request, exc: LocalServeError) -> Response:
    if exc.status >= 500:
        log.error("%s", exc)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, EngineOverloadedError) else None
    return _respond(status_of(exc), message_of(exc), headers)


def on_validation_error(_: Request, exc: ValidationException) -> Response:
    details = []
    for item in exc.extra or []:
        if isinstance(item, dict):
            where = item.get("key") or ""
            where = "" if where == "data" else where  # the body itself
            details.append(f"{item.get('message', '')}{f' (at {where})' if where else ''}")
        else:
            details.append(str(item))
    details = [d for d in details if d]
    return _respond(400, "invalid request body: " + ("; ".join(details) if details else str(exc.detail)))


def on_http_error(_: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    if status == 400 and (malformed := malformed_json(exc)):
        return _respond(400, malformed)
    message = {413: "the request body is too large"}.get(status) or str(exc.detail)
    return _respond(status, message, dict(exc.headers or {}) or None)


def on_unexpected_error(_: Request, exc: Exception) -> Response:
    log.exception("unexpected error while serving an Anthropic request")
    return _respond(500, f"internal server error ({type(exc).__name__})")


EXCEPTION_HANDLERS = {
    LocalServeError: on_localserve_error,
    ValidationException: on_validation_error,
    HTTPException: on_http_error,
    Exception: on_unexpected_error,
}
