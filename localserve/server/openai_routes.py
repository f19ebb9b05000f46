"""POST /v1/chat/completions, POST /v1/completions and GET /v1/models."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

from litestar import Request, get, post

from localserve.errors import InvalidRequestError, LocalServeError
from localserve.server.errors import error_body
from localserve.server.openai_adapter import (
    chat_messages,
    chat_params,
    completion_params,
    completion_prompts,
)
from localserve.server.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    ModelMeta,
)
from localserve.server.openai_responses import ChoiceState, TokenText, UsageCounter, merge
from localserve.server.request_log import ClientDisconnected
from localserve.server.served_model import ServedModel
from localserve.server.sse import KEEPALIVE, KEEPALIVE_SECONDS, SSE_DONE, EventStream, data_event, with_keepalive
from localserve.server.state import served_model
from localserve.server.tools import CallStart, OutputParser, ReasoningDelta, TextDelta, ToolPlan
from localserve.server.tools import tool_choice_from_openai, tools_from_openai



async def until_disconnect(request: Request, work: asyncio.Future):
    """Awaits `work`; if the client goes away first, cancels it (its requests are aborted and
    their pages freed) and raises ClientDisconnected."""
    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work not in done:
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise ClientDisconnected()
    return work.result()


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# -- chat ------------------------------------------------------------------------------------------


@post("/v1/chat/completions", status_code=200, summary="Create a chat completion", tags=["openai"])
async def chat_completions(data: ChatCompletionRequest, request: Request) -> ChatCompletion:
    arrival = time.monotonic()
    served = served_model(request)
    served.check_model(data.model)
    tokenizer = served.tokenizer
    if tokenizer is None:
        raise InvalidRequestError("this model has no tokenizer or chat template: use /v1/completions with token ids")
    params = chat_params(data, served.loaded.config.vocab_size)
    tools = tools_from_openai(data.tools)
    plan = ToolPlan.build(tools, tool_choice_from_openai(data.tool_choice, tools), data.parallel_tool_calls, tokenizer)
    plan.adjust(params)
    # the template's own variables (enable_thinking, ...); the ones the request sets are not overridable
    kwargs = {k: v for k, v in (data.chat_template_kwargs or {}).items()
              if k not in ("messages", "tools", "add_generation_prompt")}
    text = plan.render(tokenizer, chat_messages(data.messages), add_generation_prompt=data.add_generation_prompt,
                       **kwargs)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    served.apply_default_max_tokens(params, len(prompt))
    await compile_guided(served, params)
    streams = served.submit([prompt], params, arrival)
    parsers = [OutputParser.for_request(plan, tokenizer, text) for _ in range(data.n)]
    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        streams = [with_keepalive(st, first_wait=KEEPALIVE_SECONDS) for st in streams]
        return EventStream(_chat_stream(served, streams, data, parsers, include_usage))
    return await until_disconnect(request, asyncio.ensure_future(_chat_whole(served, streams, data, parsers)))


async def compile_guided(served: ServedModel, params) -> None:
    """Compiles the request's grammar off the event loop before anything is sent: a schema or
    regex the compiler rejects is a 400 even for a stream, and the engine then finds it in the
    compiler's cache."""
    if params.guided is None:
        return
    if served.tokenizer is None:
        raise InvalidRequestError("structured output needs a model with a tokenizer")
    from localserve.engine.grammar import tokenizer_grammar

    def compile_() -> None:
        grammar = tokenizer_grammar(served.tokenizer, served.loaded.config.vocab_size, sorted(served.eos_token_ids))
        grammar.compile(params.guided)

    await asyncio.to_thread(compile_)


def _finish_reason(reason: str | None, calls: list) -> str | None:
    return "tool_calls" if calls and reason == "stop" else reason


async def _chat_whole(served: ServedModel, streams, data: ChatCompletionRequest,
                      parsers: list[OutputParser]) -> ChatCompletion:
    choices = [ChoiceState() for _ in range(data.n)]
    usage = UsageCounter()
    async for p, c, d in merge(streams, data.n):
        _collect(choices[c], d)
        usage.add(p, c, d)
    text = TokenText(served.tokenizer)
    out = []
    for i, ch in enumerate(choices):
        parsed = parsers[i].parse("".join(ch.text))
        message = AssistantMessage(role="assistant", content=parsed.content,
                                   tool_calls=[c.to_openai() for c in parsed.calls] or None,
                                   reasoning_content=parsed.reasoning)
        out.append(ChatChoice(index=i, message=message, finish_reason=_finish_reason(ch.finish_reason, parsed.calls),
                              logprobs=text.chat_logprobs(ch.logprobs) if data.logprobs else None))
    return ChatCompletion(id=_new_id("chatcmpl"), created=int(time.time()), model=served.name, choices=out,
                          usage=usage.usage())


async def _chat_stream(served: ServedModel, streams, data: ChatCompletionRequest, parsers: list[OutputParser],
                       include_usage: bool) -> AsyncIterator[bytes]:
    rid, created, model = _new_id("chatcmpl"), int(time.time()), served.name
    text = TokenText(served.tokenizer)
    usage = UsageCounter()

    def chunk(choices, u=None) -> bytes:
        return data_event(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=u))

    for i in range(data.n):
        yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
    try:
        async for p, c, d in merge(streams, data.n):
            if d is None:
                yield KEEPALIVE
                continue
            usage.add(p, c, d)
            deltas = chat_deltas(parsers[c].feed(d.text) if d.text else [])
            if d.finished:
                deltas += chat_deltas(parsers[c].finish())
            lp = text.chat_logprobs(d.logprobs) if data.logprobs and d.logprobs else None
            if lp is not None and not deltas:
                deltas = [ChatDelta()]
            for k, delta in enumerate(deltas):
                yield chunk([ChatChunkChoice(index=c, delta=delta, logprobs=lp if k == 0 else None)])
            if d.finished:
                reason = _finish_reason(d.finish_reason, parsers[c].calls)
                yield chunk([ChatChunkChoice(index=c, delta=ChatDelta(), finish_reason=reason)])
    except LocalServeError as exc:
        yield data_event(error_body(exc))
    if include_usage:
        yield chunk([], usage.usage())
    yield SSE_DONE


def chat_deltas(events: list) -> list[ChatDelta]:
    """Parser events as OpenAI deltas; neighbours of one kind (and one call) share a delta. A
    call's first delta holds index, id, type, name and empty arguments, later ones index and
    arguments pieces."""
    out: list[ChatDelta] = []
    last = None  # (kind, call index) of out[-1]
    for e in events:
        if isinstance(e, TextDelta):
            key = ("content", -1)
            if key == last:
                out[-1].content += e.text
            else:
                out.append(ChatDelta(content=e.text))
        elif isinstance(e, ReasoningDelta):
            key = ("reasoning", -1)
            if key == last:
                out[-1].reasoning_content += e.text
            else:
                out.append(ChatDelta(reasoning_content=e.text))
        elif isinstance(e, CallStart):
            key = ("start", e.index)
            out.append(ChatDelta(tool_calls=[{"index": e.index, "id": e.id, "type": "function",
                                              "function": {"name": e.name, "arguments": ""}}]))
        else:
            key = ("args", e.index)
            if key == last:
                out[-1].tool_calls[0]["function"]["arguments"] += e.text
            else:
                out.append(ChatDelta(tool_calls=[{"index": e.index, "function": {"arguments": e.text}}]))
        last = key
    return out


def _collect(state: ChoiceState, d) -> None:
    state.text.append(d.text)
    if d.logprobs:
        state.logprobs.extend(d.logprobs)
    if d.finished:
        state.finish_reason, state.stop_reason = d.finish_reason, d.stop_reason


# -- completions -----------------------------------------------------------------------------------


@post("/v1/completions", status_code=200, summary="Create a completion", tags=["openai"])
async def completions(data: CompletionRequest, request: Request) -> Completion:
    arrival = time.monotonic()
    served = served_model(request)
    served.check_model(data.model)
    vocab = served.loaded.config.vocab_size
    params = completion_params(data, vocab)
    prompts = completion_prompts(data.prompt, served.tokenizer, vocab)
    if data.echo and params.logprobs:
        raise InvalidRequestError("echo with logprobs (prompt logprobs) is not supported")
    echoes = [_echo(served, p) if data.echo else "" for p in prompts]
    await compile_guided(served, params)
    streams = served.submit(prompts, params, arrival)
    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        streams = [with_keepalive(st, first_wait=KEEPALIVE_SECONDS) for st in streams]
        return EventStream(_completion_stream(served, streams, data, echoes, include_usage))
    return await until_disconnect(request, asyncio.ensure_future(_completion_whole(served, streams, data, echoes)))


def _echo(served: ServedModel, prompt: list[int]) -> str:
    return served.tokenizer.decode(prompt, skip_special_tokens=True) if served.tokenizer else ""


async def _completion_whole(served: ServedModel, streams, data: CompletionRequest, echoes: list[str]) -> Completion:
    n = data.n
    choices = [ChoiceState(text=[echoes[i // n]]) for i in range(n * len(streams))]
    usage = UsageCounter()
    async for p, c, d in merge(streams, n):
        _collect(choices[c], d)
        usage.add(p, c, d)
    text = TokenText(served.tokenizer)
    return Completion(
        id=_new_id("cmpl"), created=int(time.time()), model=served.name,
        choices=[
            CompletionChoice(index=i, text="".join(ch.text), finish_reason=ch.finish_reason,
                             logprobs=text.completion_logprobs(ch.logprobs, 0) if data.logprobs is not None else None,
                             stop_reason=ch.stop_reason)
            for i, ch in enumerate(choices)
        ],
        usage=usage.usage(),
    )


async def _completion_stream(served: ServedModel, streams, data: CompletionRequest, echoes: list[str],
                             include_usage: bool) -> AsyncIterator[bytes]:
    rid, created, model = _new_id("cmpl"), int(time.time()), served.name
    text = TokenText(served.tokenizer)
    usage = UsageCounter()
    offsets: dict[int, int] = {}

    def chunk(choices, u=None) -> bytes:
        return data_event(Completion(id=rid, created=created, model=model, choices=choices, usage=u))

    for c in range(data.n * len(streams)):
        if echoes[c // data.n]:
            yield chunk([CompletionChoice(index=c, text=echoes[c // data.n], finish_reason=None)])
    try:
        async for p, c, d in merge(streams, data.n):
            if d is None:
                yield KEEPALIVE
                continue
            usage.add(p, c, d)
            lp = None
            if data.logprobs is not None and d.logprobs:
                lp = text.completion_logprobs(d.logprobs, offsets.get(c, 0))
            offsets[c] = offsets.get(c, 0) + len(d.text)
            # a model without a tokenizer has no text: its chunks still show the tokens' progress
            if d.text or lp is not None or d.finished or served.tokenizer is None:
                yield chunk([CompletionChoice(index=c, text=d.text, finish_reason=d.finish_reason, logprobs=lp,
                                              stop_reason=d.stop_reason)])
    except LocalServeError as exc:
        yield data_event(error_body(exc))
    if include_usage:
        yield chunk([], usage.usage())
    yield SSE_DONE


# -- models ----------------------------------------------------------------------------------------


@get("/v1/models", summary="List the served models", tags=["openai"])
async def list_models(request: Request) -> ModelList:
    served = served_model(request)
    return ModelList(data=[model_card(served, name) for name in served.names])


@get("/v1/models/{model_id:path}", summary="Describe a served model", tags=["openai"])
async def get_model(model_id: str, request: Request) -> ModelCard:
    served = served_model(request)
    model_id = model_id.lstrip("/")
    served.check_model(model_id or "\0")
    return model_card(served, model_id)


def model_card(served: ServedModel, name: str) -> ModelCard:
    ctx, config = served.max_context, served.loaded.config
    return ModelCard(id=name, created=served.created, max_model_len=ctx, context_length=ctx, context_window=ctx,
                     max_output_tokens=ctx - 1,
                     meta=ModelMeta(n_ctx=ctx, n_ctx_train=config.max_context, n_vocab=config.vocab_size))


ROUTES = [chat_completions, completions, list_models, get_model]
