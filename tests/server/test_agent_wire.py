"""What coding agents send, against a real `localserve up` process: Claude Code's system turns
inside `messages`, its betas and billing-header block; Codex's namespace and hosted tools;
requests without max_tokens; the log line of every request; SSE content types. The agents
themselves are driven in tests/clients; these pin the server's side of each behaviour with
the SDKs and plain HTTP."""

from __future__ import annotations

import re

import anthropic
import httpx
import pytest

MODEL = "gemma3:270m"
HEADERS = {"anthropic-version": "2023-06-01"}
BILLING = "x-anthropic-billing-header: cc_version=2.1.337.{}; cc_entrypoint=sdk-cli;"
SYSTEM = "You are a careful coding agent. Answer briefly. " * 20


@pytest.fixture
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def messages(server, body: dict, betas: str | None = None, query: str = "") -> httpx.Response:
    headers = {**HEADERS, **({"anthropic-beta": betas} if betas else {})}
    return httpx.post(f"{server.url}/v1/messages{query}", json={"model": MODEL, "max_tokens": 4, **body},
                      headers=headers, timeout=120)


def claude_code_body(billing_suffix: str, question: str) -> dict:
    """The shape of Claude Code 2.1's first request: billing header block first, a system turn
    after the first user turn, thinking and context_management set."""
    return {
        "system": [{"type": "text", "text": BILLING.format(billing_suffix)},
                   {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "<system-reminder>be nice</system-reminder>"},
                                         {"type": "text", "text": question}]},
            {"role": "system", "content": [{"type": "text", "text": "# Environment\nPlatform: linux",
                                            "cache_control": {"type": "ephemeral"}}]},
        ],
        "thinking": {"type": "adaptive", "display": "omitted"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": "{\"device_id\": \"d\"}"},
    }


@pytest.mark.slow
def test_claude_code_request_shape_is_served_and_cached_across_prompts(server):
    betas = "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,effort-2025-11-24"
    first = messages(server, claude_code_body("be9", "Say hello"), betas, "?beta=true")
    assert first.status_code == 200, first.text
    # a new prompt of the same session: the billing block's suffix changed, the rest did not
    second = messages(server, claude_code_body("a41", "Say goodbye"), betas, "?beta=true")
    assert second.status_code == 200, second.text
    usage = second.json()["usage"]
    whole = usage["input_tokens"] + usage["cache_read_input_tokens"]
    # everything up to the question is reused: the system prompt and the reminder
    assert usage["cache_read_input_tokens"] > 0.8 * whole, usage
    # count_tokens sees the prompt /v1/messages serves
    counted = httpx.post(f"{server.url}/v1/messages/count_tokens?beta=true", headers=HEADERS,
                         json={"model": MODEL, **claude_code_body("c00", "Say goodbye")}).json()
    assert counted["input_tokens"] == whole
    assert "dropped a volatile system block" in server.output()


@pytest.mark.slow
def test_system_turns_inside_messages_are_placed_in_the_prompt(server):
    base = {"messages": [{"role": "user", "content": "Hi"}]}
    with_system = {"messages": [{"role": "user", "content": "Hi"},
                                {"role": "system", "content": "Reply in French."}]}
    count = [httpx.post(f"{server.url}/v1/messages/count_tokens", headers=HEADERS, json={"model": MODEL, **b})
             for b in (base, with_system)]
    assert all(c.status_code == 200 for c in count), [c.text for c in count]
    assert count[1].json()["input_tokens"] > count[0].json()["input_tokens"]
    assert messages(server, with_system).status_code == 200


@pytest.mark.slow
def test_features_this_server_cannot_honour_are_refused_as_anthropic_refuses_a_beta(server):
    deferred = {"messages": [{"role": "user", "content": "Hi"}],
                "tools": [{"name": "Read", "input_schema": {"type": "object"}},
                          {"name": "DeferredToolPlaceholder", "input_schema": {"type": "object"},
                           "defer_loading": True}]}
    r = messages(server, deferred, "claude-code-20250219,advanced-tool-use-2025-11-20")
    assert r.status_code == 400, r.text
    # Claude Code matches this sentence, drops the beta and sends every tool in full
    assert re.match(r"Unexpected value\(s\) `advanced-tool-use-2025-11-20` for the `anthropic-beta` header",
                    r.json()["error"]["message"]), r.text
    r = messages(server, deferred)  # no beta: a plain 400 naming the field
    assert r.status_code == 400 and "tools.1.defer_loading" in r.json()["error"]["message"]

    changes = {"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": [
        {"type": "tool_addition", "tool": {"type": "tool_reference", "name": "Read"}}]}]}
    r = messages(server, changes, "mid-conversation-tool-changes-2026-07-01")
    assert r.status_code == 400 and "`mid-conversation-tool-changes-2026-07-01`" in r.json()["error"]["message"]


@pytest.mark.slow
def test_unknown_betas_blocks_and_server_tools_are_accepted(server):
    body = {"messages": [
        {"role": "user", "content": "Find it"},
        {"role": "assistant", "content": [
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "x"}},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
            {"type": "text", "text": "Found."}]},
        {"role": "user", "content": [{"type": "some_future_block", "data": 1}, {"type": "text", "text": "Thanks"}]}],
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
                  {"name": "Read", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}]}
    r = messages(server, body, "some-future-beta-2099-01-01")
    assert r.status_code == 200, r.text
    log = server.output()
    assert "left out tool 'web_search' of type 'web_search_20250305'" in log
    assert "ignored a 'some_future_block' content block" in log
    # an image is content the text model would silently lose: refused, naming the block
    r = messages(server, {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                                     "content": [{"type": "image", "source": {}}]}]}]})
    assert r.status_code == 400 and "messages.0.content.0.content.0" in r.json()["error"]["message"]


CODEX_TOOLS = [
    {"type": "function", "name": "exec_command", "description": "Run a command.", "strict": False,
     "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}},
    {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.", "tools": [
        {"type": "function", "name": "close_agent", "description": "Close an agent.", "strict": False,
         "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"],
                        "additionalProperties": False}}]},
    {"type": "web_search", "external_web_access": False},
]


def responses(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, "max_output_tokens": 48, **body},
                      timeout=120)


@pytest.mark.slow
def test_codex_tools_namespace_and_hosted(server):
    base = {"input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
                      {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
            "tools": CODEX_TOOLS, "store": False, "include": ["reasoning.encrypted_content"],
            "reasoning": {"summary": "auto"}, "prompt_cache_key": "abc", "client_metadata": {"x": "y"}}
    r = responses(server, base)
    assert r.status_code == 200, r.text
    assert "left out hosted tool 'web_search'" in server.output()
    assert r.json()["tools"] == CODEX_TOOLS  # echoed as sent

    # a forced call of the namespace's function comes back under its own name, with its namespace
    only_ns = {**base, "tools": CODEX_TOOLS[1:], "tool_choice": "required", "parallel_tool_calls": False}
    r = responses(server, {**only_ns, "max_output_tokens": 64, "temperature": 0})
    assert r.status_code == 200, r.text
    calls = [it for it in r.json()["output"] if it["type"] == "function_call"]
    assert calls and calls[0]["name"] == "close_agent" and calls[0]["namespace"] == "multi_agent_v1", r.text

    # replayed: the call (with its namespace), its output, and items of hosted tools
    history = base["input"] + [
        {"type": "function_call", "call_id": "call_1", "name": "close_agent", "namespace": "multi_agent_v1",
         "arguments": "{\"id\": \"a1\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "closed"},
        {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search"}},
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "New context."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Thanks"}]}]
    r = responses(server, {**base, "input": history})
    assert r.status_code == 200, r.text
    assert "ignored an input item of type 'web_search_call'" in server.output()


@pytest.mark.slow
def test_request_without_max_tokens_gets_the_default_cap(client, server):
    """The session server runs with --max-tokens-default 24 (README default: 4096)."""
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to 1000."}],
                                         extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 24 and out.choices[0].finish_reason == "length"
    r = responses(server, {"input": "Count to 1000.", "max_output_tokens": None})
    assert r.json()["usage"]["output_tokens"] <= 24


@pytest.mark.slow
def test_every_streaming_route_is_an_event_stream(server):
    routes = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
        ("/v1/messages", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        ("/v1/responses", {"input": "Hi", "max_output_tokens": 2}),
    ]
    for path, body in routes:
        with httpx.stream("POST", server.url + path, json={"model": MODEL, "stream": True, **body},
                          headers=HEADERS, timeout=120) as r:
            assert r.status_code == 200, path
            assert r.headers["content-type"].startswith("text/event-stream"), (path, r.headers)
            assert b"data: " in r.read()


@pytest.mark.slow
def test_root_answers_and_every_request_is_logged(server):
    assert httpx.get(server.url + "/").status_code == 200
    assert httpx.head(server.url + "/").status_code == 200
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 3})
    assert r.status_code == 200
    bad = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert bad.status_code == 400
    log = server.output()
    assert re.search(r"POST /v1/chat/completions 200 model=gemma3:270m prompt=\d+ cached=\d+ generated=3 "
                     r"ttft=\d+\.\d+s duration=\d+\.\d+s", log), log[-2000:]
    assert re.search(r"POST /v1/chat/completions 400 duration=\S+ \| error: messages must hold at least one", log)


@pytest.mark.slow
def test_a_long_prefill_keeps_the_stream_alive(server):
    """Clients drop a connection idle for minutes; a long prompt's prefill takes that long on a
    small CPU. The stream answers 200 at once and sends SSE comments until the first event."""
    words = " ".join(f"w{i}" for i in range(2500))  # unique text: a cold prefill of some seconds
    with httpx.stream("POST", server.url + "/v1/messages", headers=HEADERS, timeout=120, json={
            "model": MODEL, "max_tokens": 2, "stream": True,
            "messages": [{"role": "user", "content": words}]}) as r:
        assert r.status_code == 200
        body = r.read().decode()
    assert body.startswith(": keep-alive\n\n"), body[:200]
    events = [line for line in body.splitlines() if line.startswith("event: ")]
    assert events[0] == "event: message_start" and events[-1] == "event: message_stop"
