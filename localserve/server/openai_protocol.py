"""OpenAI request and response schemas (msgspec). No framework imports: the server decodes into
these, and the OpenAPI schema is generated from them.

Unknown fields are ignored (clients send vendor extras); a known field with the wrong type is a
400. Extra sampling fields that vLLM and SGLang accept (top_k, min_p, repetition_penalty,
ignore_eos, stop_token_ids, ...) are accepted under the same names.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

# -- requests ----------------------------------------------------------------------------------


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class SamplingFields(msgspec.Struct, kw_only=True):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM / SGLang extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured output: OpenAI's response_format, and the names vLLM and SGLang accept
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None  # accepted and ignored: xgrammar serves them all
    structured_outputs: dict[str, Any] | None = None  # vLLM: {json, regex, choice, grammar, json_object}
    regex: str | None = None  # SGLang
    ebnf: str | None = None  # SGLang
    json_schema: dict[str, Any] | str | None = None  # SGLang (a schema as JSON text or object)


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True


class CompletionRequest(SamplingFields, kw_only=True):
    prompt: str | list[Any]  # a string, strings, token ids or lists of ids (checked by the adapter)
    logprobs: int | None = None  # the legacy API: the number of top logprobs
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


# -- responses ---------------------------------------------------------------------------------


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"]
    content: str | None  # null (present) when the answer is only tool calls
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None


class ChatDelta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    usage: Usage | None = None


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    stop_reason: int | str | None = None


class Completion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    object: Literal["text_completion"] = "text_completion"


class ModelMeta(msgspec.Struct):
    """llama.cpp's `meta` object of a model card."""

    n_ctx: int
    n_ctx_train: int
    n_vocab: int


class ModelCard(msgspec.Struct, kw_only=True):
    """A served model. Its context window is given in the fields clients look for: vLLM's
    `max_model_len`, `context_length` / `context_window` (OpenRouter, LM Studio and agent
    catalogs) and llama.cpp's `meta.n_ctx`; `max_output_tokens` is the most one request can
    generate (a prompt of one token)."""

    id: str
    created: int
    owned_by: str = "localserve"
    object: Literal["model"] = "model"
    max_model_len: int | None = None
    context_length: int | None = None
    context_window: int | None = None
    max_output_tokens: int | None = None
    meta: ModelMeta | None = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"


class ErrorInfo(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorInfo
