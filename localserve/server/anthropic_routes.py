"""POST /v1/messages and POST /v1/messages/count_tokens: Anthropic's Messages API, a thin adapter
over the same engine path as the OpenAI routes."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from litestar import Request, Response, post

from localserve.engine.outputs import SeqDelta
from localserve.errors import InvalidRequestError, LocalServeError
from localserve.server.anthropic_adapter import (
    chat_input,
    fit_max_tokens,
    sampling_params,
    stop_reason,
)
from localserve.server.anthropic_answer import AnswerBlocks
from localserve.server.anthropic_betas import betas_of
from localserve.server.anthropic_errors import EXCEPTION_HANDLERS, error_body, message_of, status_of
from localserve.server.anthropic_protocol import (
    CountTokensRequest,
    CountTokensResponse,
    Message,
    MessageDelta,
    MessageDeltaBody,
    MessagesRequest,
    MessageStart,
    MessageStop,
    Ping,
    PromptFields,
    Usage,
)
from localserve.server.openai_routes import until_disconnect
from localserve.server.served_model import ServedModel
from localserve.server.sse import KEEPALIVE, EventStream, named_event, typed_event, with_keepalive
from localserve.server.state import served_model
from localserve.server.tools import OutputParser, ToolPlan

log = logging.getLogger("localserve.server")


def _request_id() -> str:
    return f"req_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class Prepared:
    """A request made ready for the engine: the prompt it sees and how to read its answer."""

    served: ServedModel
    plan: ToolPlan
    prompt_text: str
    prompt_ids: list[int]

    def blocks(self, data: MessagesRequest) -> AnswerBlocks:
        parser = OutputParser.for_request(self.plan, self.served.tokenizer, self.prompt_text)
        thinking = data.thinking is not None and data.thinking.get("type") != "disabled"
        return AnswerBlocks(parser, show_thinking=thinking)


def prepare(request: Request, data: PromptFields) -> Prepared:
    """Everything that decides the prompt, shared by /v1/messages and count_tokens so that the
    count is the prompt the engine sees."""
    served = served_model(request)
    served.check_model(data.model)
    if served.tokenizer is None:
        raise InvalidRequestError("this model has no tokenizer or chat template, so it cannot serve /v1/messages")
    chat = chat_input(data, betas_of(request.headers.get("anthropic-beta")))
    plan = ToolPlan.build(chat.tools, chat.choice, chat.parallel, served.tokenizer)
    # a final assistant turn is a prefill: the answer continues it (and does not repeat it)
    last = chat.messages[-1]
    prefill = chat.messages.pop()["content"] if last["role"] == "assistant" and "tool_calls" not in last else ""
    text = plan.render(served.tokenizer, chat.messages, add_generation_prompt=True) + prefill
    return Prepared(served, plan, text, served.tokenizer.encode(text, add_special_tokens=False))


def usage_of(d: SeqDelta) -> Usage:
    return Usage(input_tokens=d.num_prompt_tokens - d.num_cached_tokens, output_tokens=d.num_output_tokens,
                 cache_read_input_tokens=d.num_cached_tokens)


@post("/v1/messages", status_code=200, summary="Create a message (Anthropic Messages API)", tags=["anthropic"],
      exception_handlers=EXCEPTION_HANDLERS)
async def create_message(data: MessagesRequest, request: Request) -> Message:
    arrival = time.monotonic()
    params = sampling_params(data)
    prep = prepare(request, data)
    prep.plan.adjust(params)
    fit_max_tokens(params, len(prep.prompt_ids), prep.served.max_context)
    (stream,) = prep.served.submit([prep.prompt_ids], params, arrival)
    mid, rid = f"msg_{uuid.uuid4().hex[:24]}", _request_id()
    if data.stream:
        # a request the engine refuses fails on the first item and gets its HTTP status; one
        # whose prefill takes a while answers 200 at once and keeps the connection alive
        stream = with_keepalive(stream)
        first = await until_disconnect(request, asyncio.ensure_future(anext(stream)))
        return EventStream(_events(first, stream, prep.blocks(data), data, mid), headers={"request-id": rid})
    work = asyncio.ensure_future(_whole(stream, prep.blocks(data), data, mid))
    return Response(await until_disconnect(request, work), headers={"request-id": rid})


@post("/v1/messages/count_tokens", status_code=200, summary="Count a request's input tokens", tags=["anthropic"],
      exception_handlers=EXCEPTION_HANDLERS)
async def count_tokens(data: CountTokensRequest, request: Request) -> CountTokensResponse:
    prep = prepare(request, data)
    return Response(CountTokensResponse(input_tokens=len(prep.prompt_ids)), headers={"request-id": _request_id()})


def _finished(last: SeqDelta | None, answer: AnswerBlocks, data: MessagesRequest) -> tuple[str, str | None]:
    assert last is not None and last.finished, "the engine ended a stream without finishing it"
    return stop_reason(last.finish_reason, last.stop_reason, data.stop_sequences, answer.called_tools)


async def _whole(stream: AsyncIterator[SeqDelta], answer: AnswerBlocks, data: MessagesRequest, mid: str) -> Message:
    last: SeqDelta | None = None
    try:
        async for d in stream:
            answer.feed(d.text)
            last = d
    finally:
        await stream.aclose()
    answer.finish()
    reason, sequence = _finished(last, answer, data)
    return Message(id=mid, model=data.model, content=answer.blocks, stop_reason=reason, stop_sequence=sequence,
                   usage=usage_of(last))


async def _events(first: SeqDelta | None, stream: AsyncIterator[SeqDelta | None], answer: AnswerBlocks,
                  data: MessagesRequest, mid: str) -> AsyncIterator[bytes]:
    """Keep-alive comments until the prompt is in, then message_start (its usage counts the
    cached tokens), ping, the content blocks as they arrive, message_delta with the stop reason
    and usage, message_stop. An error after the stream began is an `error` event: the status
    line is long gone."""
    try:
        while first is None:
            yield KEEPALIVE
            first = await anext(stream)
        last = first
        yield typed_event(MessageStart(message=Message(
            id=mid, model=data.model, content=[], stop_reason=None, stop_sequence=None, usage=usage_of(first))))
        yield typed_event(Ping())
        for event in answer.feed(first.text):
            yield typed_event(event)
        async for d in stream:  # to its end even after the finishing delta: it then counts as finished
            if d is not None:
                last = d
                for event in answer.feed(d.text):
                    yield typed_event(event)
        for event in answer.finish():
            yield typed_event(event)
        reason, sequence = _finished(last, answer, data)
        yield typed_event(MessageDelta(delta=MessageDeltaBody(stop_reason=reason, stop_sequence=sequence),
                                     usage=usage_of(last)))
        yield typed_event(MessageStop())
    except LocalServeError as exc:
        yield _error_event(status_of(exc), message_of(exc))
    except Exception as exc:  # noqa: BLE001 - the client hears of it; the log keeps the trace
        log.exception("unexpected error while streaming an Anthropic message")
        yield _error_event(500, f"internal server error ({type(exc).__name__})")
    finally:
        await stream.aclose()


def _error_event(status: int, message: str) -> bytes:
    return named_event("error", error_body(status, message))


ROUTES = [create_message, count_tokens]
