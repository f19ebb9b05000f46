"""Typed errors raised below the HTTP boundary; the server maps each to a status code."""

from __future__ import annotations


class LocalServeError(Exception):
    """Base class; `status` is the HTTP status the server answers with."""

    status: int = 500
    code: str = "internal_error"


class ModelLoadError(LocalServeError):
    """A model file is unreadable, truncated, corrupt or incomplete. Always names the file."""

    status = 500
    code = "model_load_error"

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class UnsupportedArchitectureError(ModelLoadError):
    code = "unsupported_architecture"


class MissingTensorError(ModelLoadError):
    code = "missing_tensor"


class ContextOverflowError(LocalServeError):
    """The prompt (plus the tokens asked for, where that is checked) exceeds the context."""

    status = 400
    code = "context_length_exceeded"

    def __init__(self, num_tokens: int, max_context: int, what: str = "prompt") -> None:
        super().__init__(
            f"This model's maximum context length is {max_context} tokens, "
            f"but the {what} has {num_tokens} tokens."
        )
        self.num_tokens = num_tokens
        self.max_context = max_context


class InvalidRequestError(LocalServeError):
    status = 400
    code = "invalid_request_error"


class EngineOverloadedError(LocalServeError):
    """Too many requests running and queued; the client should retry after `retry_after` s."""

    status = 429
    code = "overloaded"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelNotFoundError(LocalServeError):
    status = 404
    code = "model_not_found"

    def __init__(self, model: str, served: list[str]) -> None:
        super().__init__(f"The model {model!r} does not exist; this server serves: {', '.join(served)}")
        self.model = model


class EngineDeadError(LocalServeError):
    """The engine stopped: its process exited, or a step failed for the request."""

    status = 500
    code = "engine_dead"


class EngineRequestError(LocalServeError):
    """A request the engine (in its own process) refused or lost, with the status it gave."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class KVCapacityError(LocalServeError):
    """The KV pool cannot hold one sequence of the context asked for (a start-up error)."""

    status = 500
    code = "kv_capacity"
