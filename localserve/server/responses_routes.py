"""POST /v1/responses: OpenAI's Responses API, the stateless subset the Codex CLI uses (the
client sends the whole conversation each time; nothing is stored). A thin adapter over the
same engine path as /v1/chat/completions and /v1/messages; errors are OpenAI-shaped (the app's
handlers)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

from litestar import Request, post

from localserve.engine.outputs import SeqDelta
from localserve.errors import InvalidRequestError, LocalServeError
from localserve.server.anthropic_adapter import fit_max_tokens
from localserve.server.openai_routes import compile_guided, until_disconnect
from localserve.server.responses_adapter import chat_input, namespaces_of, sampling_params, text_echo
from localserve.server.responses_output import OutputItems, item_id, items_of
from localserve.server.responses_protocol import (
    Completed,
    Created,
    ErrorEvent,
    Failed,
    Incomplete,
    IncompleteDetails,
    InProgress,
    InputTokensDetails,
    OutputItem,
    OutputTokensDetails,
    Response,
    ResponseError,
    ResponsesRequest,
    Usage,
)
from localserve.server.served_model import ServedModel
from localserve.server.sse import KEEPALIVE, EventStream, typed_event, with_keepalive
from localserve.server.state import served_model
from localserve.server.tools import OutputParser, ToolPlan

log = logging.getLogger("localserve.server")


@dataclass(slots=True)
class Echo:
    """What every response object of one request repeats: its id and the request's settings."""

    id: str
    created_at: int
    data: ResponsesRequest
    model: str

    def response(self, status: str, output: OutputItems | list[OutputItem] | None = None, usage: Usage | None = None,
                 error: ResponseError | None = None) -> Response:
        d = self.data
        return Response(
            id=self.id, created_at=self.created_at, status=status, model=self.model,
            output=list(output.items if isinstance(output, OutputItems) else output or []), usage=usage, error=error,
            incomplete_details=IncompleteDetails("max_output_tokens") if status == "incomplete" else None,
            instructions=d.instructions, tools=list(d.tools or []),
            tool_choice=d.tool_choice if d.tool_choice is not None else "auto",
            parallel_tool_calls=d.parallel_tool_calls,
            temperature=1.0 if d.temperature is None else d.temperature, top_p=1.0 if d.top_p is None else d.top_p,
            max_output_tokens=d.max_output_tokens, text=text_echo(d.text), reasoning=d.reasoning,
            metadata=dict(d.metadata or {}), user=d.user,
        )


@post("/v1/responses", status_code=200, summary="Create a model response (OpenAI Responses API, stateless)",
      tags=["openai"])
async def create_response(data: ResponsesRequest, request: Request) -> Response:
    arrival = time.monotonic()
    served = served_model(request)
    served.check_model(data.model)
    tokenizer = served.tokenizer
    if tokenizer is None:
        raise InvalidRequestError("this model has no tokenizer or chat template, so it cannot serve /v1/responses")
    params = sampling_params(data)
    chat = chat_input(data)
    plan = ToolPlan.build(chat.tools, chat.choice, chat.parallel, tokenizer)
    plan.adjust(params)
    text = plan.render(tokenizer, chat.messages, add_generation_prompt=True)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    served.apply_default_max_tokens(params, len(prompt))
    fit_max_tokens(params, len(prompt), served.max_context)
    await compile_guided(served, params)
    (stream,) = served.submit([prompt], params, arrival)
    echo = Echo(item_id("resp"), int(time.time()), data, data.model or served.name)
    parser = OutputParser.for_request(plan, tokenizer, text)
    if data.stream:
        # a request the engine refuses fails on the first item and gets its HTTP status; one
        # whose prefill takes a while answers 200 at once and keeps the connection alive
        stream = with_keepalive(stream)
        first = await until_disconnect(request, asyncio.ensure_future(anext(stream)))
        return EventStream(_events(first, stream, OutputItems(parser, namespaces_of(data.tools)), echo, served))
    return await until_disconnect(request, asyncio.ensure_future(_whole(stream, parser, echo, served)))


def _truncated(last: SeqDelta | None) -> bool:
    assert last is not None and last.finished, "the engine ended a stream without finishing it"
    return last.finish_reason == "length"


def _usage(last: SeqDelta, reasoning: str | None, served: ServedModel) -> Usage:
    thought = len(served.tokenizer.encode(reasoning, add_special_tokens=False)) if reasoning else 0
    return Usage(input_tokens=last.num_prompt_tokens,
                 input_tokens_details=InputTokensDetails(cached_tokens=last.num_cached_tokens),
                 output_tokens=last.num_output_tokens,
                 output_tokens_details=OutputTokensDetails(reasoning_tokens=min(thought, last.num_output_tokens)),
                 total_tokens=last.num_prompt_tokens + last.num_output_tokens)


async def _whole(stream: AsyncIterator[SeqDelta], parser: OutputParser, echo: Echo, served: ServedModel) -> Response:
    last: SeqDelta | None = None
    text: list[str] = []
    try:
        async for d in stream:
            text.append(d.text)
            last = d
    finally:
        await stream.aclose()
    truncated = _truncated(last)
    parsed = parser.parse("".join(text))
    items = items_of(parsed, truncated, namespaces_of(echo.data.tools))
    return echo.response("incomplete" if truncated else "completed", items, _usage(last, parsed.reasoning, served))


async def _events(first: SeqDelta | None, stream: AsyncIterator[SeqDelta | None], items: OutputItems, echo: Echo,
                  served: ServedModel) -> AsyncIterator[bytes]:
    """response.created and response.in_progress (then keep-alive comments until the prompt is
    in), the items' events as text arrives, then response.completed (or response.incomplete)
    with the whole response. An error after the stream began is an `error` event then
    response.failed: the status line is long gone."""
    numbers = itertools.count()

    def sse(event) -> bytes:
        event.sequence_number = next(numbers)
        return typed_event(event)

    try:
        yield sse(Created(response=echo.response("in_progress")))
        yield sse(InProgress(response=echo.response("in_progress")))
        while first is None:
            yield KEEPALIVE
            first = await anext(stream)
        last = first
        for event in items.feed(first.text):
            yield sse(event)
        async for d in stream:  # to its end even after the finishing delta: it then counts as finished
            if d is not None:
                last = d
                for event in items.feed(d.text):
                    yield sse(event)
        truncated = _truncated(last)
        for event in items.finish(truncated):
            yield sse(event)
        usage = _usage(last, items.reasoning, served)
        if truncated:
            yield sse(Incomplete(response=echo.response("incomplete", items, usage)))
        else:
            yield sse(Completed(response=echo.response("completed", items, usage)))
    except LocalServeError as exc:
        for chunk in _failure(sse, echo, items, exc.code or "server_error", str(exc)):
            yield chunk
    except Exception as exc:  # noqa: BLE001 - the client hears of it; the log keeps the trace
        log.exception("unexpected error while streaming a response")
        for chunk in _failure(sse, echo, items, "server_error", f"internal server error ({type(exc).__name__})"):
            yield chunk
    finally:
        await stream.aclose()


def _failure(sse, echo: Echo, items: OutputItems, code: str, message: str) -> list[bytes]:
    return [sse(ErrorEvent(code=code, message=message)),
            sse(Failed(response=echo.response("failed", items, error=ResponseError(code=code, message=message))))]


ROUTES = [create_response]
