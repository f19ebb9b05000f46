"""Codex CLI (npm @openai/codex) over the OpenAI Responses API: `codex exec`, then
`codex exec resume --last`, with a provider in $CODEX_HOME/config.toml."""

from __future__ import annotations

import json

import pytest

from tests.clients.drivers import MODEL, PROMPTS, Codex, codex_config, codex_events, drive
from tests.clients.install import ensure_installed
from tests.clients.proxy import CapturingProxy

CACHED_SHARE = 0.8  # turn 2 repeats the ~20k-character instructions, the tools and turn 1

# what codex says for a model its catalog does not know (a custom provider's model, unless
# config.toml names a model_catalog_json, or the provider a model_catalog_url and an env_key)
FALLBACK_WARNING = (f"Model metadata for `{MODEL}` not found. Defaulting to fallback metadata; "
                    "this can degrade performance and cause issues.")
INCOMPLETE = "Incomplete response returned, reason: max_output_tokens"


@pytest.fixture(scope="module")
def session(drive_client):
    return drive_client("codex")


def responses_usage(ex) -> dict:
    for event in ex.events():
        if event.get("type") in ("response.completed", "response.incomplete"):
            return event["response"]["usage"]
        if event.get("object") == "response":  # a non-streamed answer
            return event["usage"]
    return {}


def assert_no_api_error(turn, report) -> None:
    """codex's exit status, its error events and every exchange: clean, except for an answer the
    server cut at its max-tokens cap (the Responses stream ends `response.incomplete`, which codex
    reports as a failed turn): the embedded base model seldom ends its turn by itself."""
    events = codex_events(turn)
    kinds = [e["type"] for e in events]
    errors = [e["message"] for e in events if e["type"] == "error"]
    errors += [e["error"]["message"] for e in events if e["type"] == "turn.failed"]
    assert set(errors) <= {INCOMPLETE}, report()
    assert not turn.failed_requests, report()
    assert turn.main_request is not None, report()
    if errors:
        last = turn.main_request.events()[-1]
        assert last["type"] == "response.incomplete", report()
        assert last["response"]["incomplete_details"]["reason"] == "max_output_tokens", report()
        assert turn.returncode == 1, report()
    else:
        assert turn.returncode == 0 and "turn.completed" in kinds, report()
    notices = [e["item"]["message"] for e in events if e["type"] == "item.completed" and e["item"]["type"] == "error"]
    assert set(notices) <= {FALLBACK_WARNING}, report()
    assert any(e["type"] == "item.completed" and e["item"]["type"] == "agent_message" for e in events), report()


def test_two_turns_without_api_error(session):
    for turn in session.turns:
        assert_no_api_error(turn, session.report)
    threads = [e["thread_id"] for t in session.turns for e in codex_events(t) if e["type"] == "thread.started"]
    assert len(threads) == 2 and threads[0] == threads[1], session.report()  # resumed, not a new thread


def test_unknown_model_gets_fallback_metadata(session):
    """codex has no metadata (context window, ...) for gemma3:270m: it warns once per run."""
    for turn in session.turns:
        items = [e["item"] for e in codex_events(turn) if e["type"] == "item.completed"]
        assert [i["message"] for i in items if i["type"] == "error"] == [FALLBACK_WARNING], session.report()


def test_second_turn_continues_the_session(session):
    items = session.turns[1].main_request.body["input"]
    texts = [json.dumps(i) for i in items]
    assert any(PROMPTS[0] in t for i, t in zip(items, texts) if i.get("role") == "user")
    assert any(i.get("role") == "assistant" for i in items)
    assert PROMPTS[1] in texts[-1]


def test_second_turn_prompt_from_prefix_cache(session):
    usage = responses_usage(session.turns[1].main_request)
    cached = usage["input_tokens_details"]["cached_tokens"]
    assert cached >= CACHED_SHARE * usage["input_tokens"], (usage, session.report())
    turn = session.turns[1]
    assert turn.cached_share >= CACHED_SHARE, (turn.cache_hit_tokens, turn.cache_query_tokens, session.report())


def test_wire_format(session):
    """What Codex 0.171.0 sends, as the server must take it."""
    ex = session.turns[0].main_request
    assert (ex.method, ex.path, ex.query) == ("POST", "/v1/responses", {})
    assert ex is session.turns[0].exchanges[0]  # no GET /v1/models first: no catalog fetch
    h = ex.headers
    assert h["accept"] == "text/event-stream"
    assert h["originator"] == "codex_exec"
    assert h["user-agent"].startswith("codex_exec/0.171.0")
    assert "authorization" not in h  # the provider names no env_key
    thread = next(e["thread_id"] for e in codex_events(session.turns[0]) if e["type"] == "thread.started")
    assert h["session-id"] == thread
    body = ex.body
    assert body["model"] == MODEL
    assert body["stream"] is True and body["store"] is False
    assert body["include"] == ["reasoning.encrypted_content"]
    assert body["prompt_cache_key"] == thread
    assert body["tool_choice"] == "auto" and body["parallel_tool_calls"] is True
    assert "reasoning" in body and "client_metadata" in body
    assert body.get("instructions") is None  # the base instructions come as a developer message
    assert "max_output_tokens" not in body  # the server's default cap bounds the answer
    # tools: plain function tools, a namespace of function tools, and the hosted web_search
    kinds = {t["type"] for t in body["tools"]}
    assert kinds == {"function", "namespace", "web_search"}, kinds
    namespace = next(t for t in body["tools"] if t["type"] == "namespace")
    assert namespace["name"] == "multi_agent_v1" and namespace["tools"]
    assert all(t["type"] == "function" and "parameters" in t for t in namespace["tools"])
    assert "exec_command" in {t.get("name") for t in body["tools"]}
    # input: developer messages (base instructions, skills), then user messages (environment, prompt)
    roles = [i["role"] for i in body["input"]]
    assert roles[:2] == ["developer", "developer"] and roles[-1] == "user"
    assert all(i["type"] == "message" and "id" in i for i in body["input"])
    assert body["input"][-1]["content"] == [{"type": "input_text", "text": PROMPTS[0]}]
    assert ex.response_headers["content-type"].startswith("text/event-stream")


def test_model_catalog_json_gives_codex_the_metadata(session, clients_server, tmp_path):
    """`model_catalog_json` in config.toml is one way codex learns a custom model's metadata
    (context window, ...): with the base instructions codex used above, the warning goes and the
    prompt stays the same. (The other: a provider with an `env_key` and a `model_catalog_url`,
    which codex GETs with `?client_version=` and reads as `{"models": [...]}` like this file.)"""
    base = session.turns[0].main_request.body["input"][0]["content"][0]["text"]
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps({"models": [codex_model_info(base)]}))
    with CapturingProxy(clients_server.url) as proxy:
        client = Codex(ensure_installed(Codex.spec), tmp_path / "home", tmp_path / "work", proxy.url)
        (client.codex_home / "config.toml").write_text(
            codex_config(proxy.url + "/v1", extra=f"model_catalog_json = {json.dumps(str(catalog))}\n"))
        run = drive(client, proxy, clients_server.url, prompts=PROMPTS[:1], server_log=clients_server.log)
    turn = run.turns[0]
    assert_no_api_error(turn, run.report)
    assert not any(e.get("item", {}).get("message") == FALLBACK_WARNING for e in codex_events(turn)), run.report()
    assert turn.main_request.body["input"][0]["content"][0]["text"] == base


def codex_model_info(base_instructions: str) -> dict:
    """A codex ModelInfo for the served model: `base_instructions` (or model_messages) is required."""
    return {"slug": MODEL, "display_name": MODEL, "description": "localserve", "base_instructions": base_instructions,
            "default_reasoning_level": None, "supported_reasoning_levels": [], "shell_type": "default",
            "visibility": "list", "supported_in_api": True, "priority": 1, "availability_nux": None,
            "upgrade": None, "model_messages": None, "supports_reasoning_summaries": False,
            "default_reasoning_summary": "none", "support_verbosity": False, "default_verbosity": None,
            "apply_patch_tool_type": None, "web_search_tool_type": "text",
            "truncation_policy": {"mode": "bytes", "limit": 10000}, "supports_parallel_tool_calls": False,
            "supports_image_detail_original": False, "context_window": 32768, "max_context_window": 32768,
            "auto_compact_token_limit": None, "effective_context_window_percent": 95,
            "experimental_supported_tools": [], "input_modalities": ["text"]}
