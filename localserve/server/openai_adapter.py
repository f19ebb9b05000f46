"""OpenAI requests to engine inputs: prompt token ids and SamplingParams. Every check that
depends on the request alone happens here, before anything reaches the engine."""

from __future__ import annotations

from typing import Any

from localserve.engine.guided import GuidedDecoding
from localserve.engine.sampling_params import SamplingParams
from localserve.errors import InvalidRequestError
from localserve.server.openai_protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields

ROLES = {"system", "developer", "user", "assistant", "tool"}


def sampling_params(req: SamplingFields, *, max_tokens: int | None, logprobs: bool, top_logprobs: int,
                    vocab_size: int) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 16:
        raise InvalidRequestError("stop may hold at most 16 sequences")
    if any(not s for s in stop):
        raise InvalidRequestError("stop sequences must not be empty")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=_logit_bias(req.logit_bias, vocab_size),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        n=req.n,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens,
        guided=guided_decoding(req),
    )


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            tok = int(key)
        except ValueError:
            raise InvalidRequestError(f"logit_bias keys must be token ids, got {key!r}") from None
        if not 0 <= tok < vocab_size:
            raise InvalidRequestError(f"logit_bias token id {tok} is outside the vocabulary [0, {vocab_size})")
        out[tok] = float(value)
    return out


# -- structured output ---------------------------------------------------------------------------


def guided_decoding(req: SamplingFields) -> GuidedDecoding | None:
    """The one structured-output constraint of a request, from whichever field names it."""
    given: list[tuple[str, dict[str, Any]]] = []
    if req.response_format is not None:
        spec = _response_format(req.response_format)
        if spec is not None:
            given.append(("response_format", spec))
    plain = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
             "guided_grammar": "ebnf", "json_schema": "json_schema", "regex": "regex", "ebnf": "ebnf"}
    for field, kind in plain.items():
        value = getattr(req, field)
        if value is not None:
            given.append((field, {kind: value}))
    if req.structured_outputs is not None:
        given.append(("structured_outputs", _structured_outputs(req.structured_outputs)))
    if not given:
        return None
    if len(given) > 1:
        raise InvalidRequestError("give at most one structured-output constraint; got "
                                  + " and ".join(name for name, _ in given))
    name, spec = given[0]
    try:
        return GuidedDecoding(**spec)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"{name}: {e}") from None


def _response_format(rf: dict[str, Any]) -> dict[str, Any] | None:
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        js = rf.get("json_schema")
        schema = js.get("schema") if isinstance(js, dict) else None
        if schema is None:
            schema = rf.get("schema")
        if schema is None:
            raise InvalidRequestError("response_format of type json_schema needs json_schema.schema")
        if not isinstance(schema, (dict, str)):
            raise InvalidRequestError("response_format.json_schema.schema must be a JSON schema object")
        return {"json_schema": schema}
    raise InvalidRequestError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def _structured_outputs(so: dict[str, Any]) -> dict[str, Any]:
    names = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "ebnf", "json_object": "json_object"}
    spec = {names[k]: v for k, v in so.items() if k in names and v is not None and v is not False}
    if len(spec) != 1:
        raise InvalidRequestError("structured_outputs needs exactly one of json, regex, choice, grammar, json_object; got "
                                  + (", ".join(k for k in so if k in names and so[k] not in (None, False)) or "none"))
    return spec


# -- chat ----------------------------------------------------------------------------------------


def chat_params(req: ChatCompletionRequest, vocab_size: int) -> SamplingParams:
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs to be true")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs, top_logprobs=req.top_logprobs or 0,
                           vocab_size=vocab_size)


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them: text content, known roles."""
    if not messages:
        raise InvalidRequestError("messages must hold at least one message")
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidRequestError(f"messages[{i}].role must be one of {sorted(ROLES)}, got {m.role!r}")
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                               "content": _text_content(m.content, i)}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls:
            if m.role != "assistant":
                raise InvalidRequestError(f"messages[{i}]: only assistant messages may hold tool_calls")
            msg["tool_calls"] = [_tool_call(c, i, j) for j, c in enumerate(m.tool_calls)]
        if m.role == "tool":
            if not m.tool_call_id:
                raise InvalidRequestError(f"messages[{i}]: a tool message needs the tool_call_id it answers")
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _tool_call(call: Any, i: int, j: int) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequestError(f"messages[{i}].tool_calls[{j}] must be {{\"id\", \"type\": \"function\", "
                                  f"\"function\": {{\"name\", \"arguments\"}}}}")
    args = fn.get("arguments", "{}")
    if not isinstance(args, (str, dict)):
        raise InvalidRequestError(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON string")
    return {"id": str(call.get("id") or ""), "type": "function", "function": {"name": fn["name"], "arguments": args}}


def _text_content(content: str | list[dict[str, Any]] | None, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        else:
            raise InvalidRequestError(
                f"messages[{i}].content: only text parts are supported by this model, got type {kind!r}")
    return "".join(parts)


# -- completions ----------------------------------------------------------------------------------


def completion_params(req: CompletionRequest, vocab_size: int) -> SamplingParams:
    if req.suffix:
        raise InvalidRequestError("suffix (fill-in-the-middle) is not supported")
    if req.best_of is not None and req.best_of != req.n:
        raise InvalidRequestError("best_of other than n is not supported")
    if req.logprobs is not None and not 0 <= req.logprobs <= 20:
        raise InvalidRequestError(f"logprobs must be in [0, 20], got {req.logprobs}")
    max_tokens = 16 if req.max_tokens is None else req.max_tokens  # the legacy API's default
    return sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs is not None,
                           top_logprobs=req.logprobs or 0, vocab_size=vocab_size)


def completion_prompts(prompt: str | list, tokenizer,
                       vocab_size: int) -> list[list[int]]:
    """Token ids per prompt: a string, a list of strings, a list of ids or a list of id lists."""
    if isinstance(prompt, str):
        texts: list = [prompt]
    elif not prompt:
        raise InvalidRequestError("prompt must not be empty")
    elif all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        texts = [list(prompt)]
    else:
        texts = list(prompt)
    out = []
    for p in texts:
        if isinstance(p, str):
            if tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: send token ids")
            ids = tokenizer.encode(p, add_special_tokens=True)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = p
        else:
            raise InvalidRequestError("prompt must be a string, a list of strings or token ids")
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        if any(t < 0 or t >= vocab_size for t in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})")
        out.append(ids)
    return out
