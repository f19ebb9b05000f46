"""Every failure becomes an OpenAI-shaped error body with the right status, never a stack trace."""

from __future__ import annotations

import logging

import msgspec

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException

from localserve.errors import EngineOverloadedError, LocalServeError
from localserve.server.openai_protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("localserve.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_body(exc: LocalServeError) -> ErrorResponse:
    return error_response_body(exc.status, str(exc), exc.code)


def error_response_body(status: int, message: str, code: str | None = None, param: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=_TYPES.get(status, "server_error"), param=param,
                                         code=code))


def _respond(status: int, body: ErrorResponse, headers: dict[str, str] | None = None) -> Response:
    return Response(content=body, status_code=status, media_type=MediaType.JSON, headers=headers)


def on_localserve_error(_: Request, exc: LocalServeError) -> Response:
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, EngineOverloadedError) else None
    if exc.status >= 500:
        log.error("%s", exc)
    return _respond(exc.status, error_body(exc), headers)


def on_validation_error(_: Request, exc: ValidationException) -> Response:
    details = []
    for item in exc.extra or []:
        if isinstance(item, dict):
            where = item.get("key") or item.get("source") or ""
            details.append(f"{item.get('message', '')}{f' (at {where})' if where else ''}")
        else:
            details.append(str(item))
    message = "invalid request body" + (": " + "; ".join(d for d in details if d) if details else f": {exc.detail}")
    return _respond(400, error_response_body(400, message, "invalid_request_error"))


def malformed_json(exc: BaseException) -> str | None:
    """The message for a body that is not JSON at all (vs valid JSON of the wrong shape), else None."""
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        if isinstance(cause, msgspec.DecodeError) and not isinstance(cause, msgspec.ValidationError):
            return f"the request body is not valid JSON: {cause}"
        cause = cause.__cause__ or cause.__context__
    return None


def on_http_error(_: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    if status == 400 and (malformed := malformed_json(exc)):
        return _respond(400, error_response_body(400, malformed, "invalid_json"))
    messages = {404: "no such route", 405: "method not allowed", 413: "the request body is too large"}
    message = exc.detail if exc.detail and exc.detail not in ("Not Found", "Method Not Allowed") else messages.get(status, exc.detail)
    if status == 413:
        message = messages[413]
    code = {401: "invalid_api_key", 403: "forbidden", 413: "request_too_large", 415: "unsupported_media_type",
            503: "model_not_ready"}.get(status)
    return _respond(status, error_response_body(status, str(message), code), dict(exc.headers or {}) or None)


def on_unexpected_error(_: Request, exc: Exception) -> Response:
    log.exception("unexpected error while serving a request")
    return _respond(500, error_response_body(500, f"internal server error ({type(exc).__name__})", "internal_error"))


EXCEPTION_HANDLERS = {
    LocalServeError: on_localserve_error,
    ValidationException: on_validation_error,
    HTTPException: on_http_error,
    Exception: on_unexpected_error,
}
