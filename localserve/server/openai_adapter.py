"""OpenAI requests to engine inputs: prompt token ids and SamplingParams. Every check that
depends on the request alone happens here, before anything reaches the engine."""

from __future__ import annotations

from typing import Any

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
            msg["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


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
