"""Claude Code (npm @anthropic-ai/claude-code) over the Anthropic Messages API: `claude -p` twice,
the second run resuming the first's session."""

from __future__ import annotations

import json
import re

import pytest

from tests.clients.drivers import CLAUDE_MAX_OUTPUT_TOKENS, MODEL, PROMPTS, claude_result

CACHED_SHARE = 0.8  # turn 2 repeats the ~23k-token system prompt, tools and turn 1


@pytest.fixture(scope="module")
def session(drive_client):
    return drive_client("claude-code")


def anthropic_usage(ex) -> dict:
    """The usage the stream reports: message_start's, updated by message_delta's."""
    usage: dict = {}
    for event in ex.events():
        if event.get("type") == "message_start":
            usage.update(event["message"].get("usage") or {})
        elif event.get("type") in ("message_delta", "message"):  # "message": a non-streamed answer
            usage.update(event.get("usage") or {})
    return usage


def refused_beta(ex) -> str | None:
    """The anthropic-beta value a 400 names, if it names one: Claude Code then sends the same
    request again without that beta (for `advanced-tool-use-*`: without tool search, all tools
    declared in full) and the conversation goes on."""
    if ex.status != 400:
        return None
    m = re.search(r"`([a-z0-9-]+-\d{4}-\d{2}-\d{2})`", ex.text)
    return m.group(1) if m and "anthropic-beta" in ex.text else None


def unexpected_failures(turn) -> list:
    return [e for e in turn.failed_requests if not refused_beta(e)]


def test_two_turns_without_api_error(session):
    for turn in session.turns:
        result = claude_result(turn)
        assert result, session.report()
        assert result.get("api_error_status") is None, session.report()
        assert not unexpected_failures(turn), session.report()
        assert turn.main_request is not None, session.report()
        # a 270M model seldom ends its answer on its own: Claude Code asks it to go on 3 times
        # after a max_tokens stop and then calls the run an error of its own, "max_output_tokens"
        # (not an API error); anything else must be a clean success
        if result["is_error"]:
            assert result.get("api_error") == "max_output_tokens", session.report()
            stops = [stop_reason(e) for e in turn.model_requests if e.status == 200 and e.error is None]
            assert set(stops) == {"max_tokens"}, (stops, session.report())
        else:
            assert turn.returncode == 0 and result["terminal_reason"] != "api_error", session.report()
    first, second = (claude_result(t) for t in session.turns)
    assert second["session_id"] == first["session_id"]


def stop_reason(ex) -> str | None:
    return next((e["delta"].get("stop_reason") for e in ex.events() if e.get("type") == "message_delta"), None)


def test_refused_beta_is_sent_again_without_it(session):
    for turn in session.turns:
        requests = turn.model_requests
        for i, ex in enumerate(requests):
            beta = refused_beta(ex)
            if beta is None:
                continue
            again = requests[i + 1]
            assert beta not in again.headers["anthropic-beta"].split(","), session.report()
            assert not any(t.get("defer_loading") for t in again.body["tools"])  # tool search is off
            assert len(again.body["tools"]) > len(ex.body["tools"])


def test_second_turn_continues_the_session(session):
    messages = session.turns[1].main_request.body["messages"]
    texts = [json.dumps(m["content"]) for m in messages]
    assert any(PROMPTS[0] in t for m, t in zip(messages, texts) if m["role"] == "user")
    assert any(m["role"] == "assistant" for m in messages)
    assert any(PROMPTS[1] in t for m, t in zip(messages, texts) if m["role"] == "user")
    assert messages[0] == session.turns[0].main_request.body["messages"][0]


def test_second_turn_prompt_from_prefix_cache(session):
    usage = anthropic_usage(session.turns[1].main_request)
    prompt = usage["input_tokens"] + usage.get("cache_read_input_tokens", 0) + usage.get("cache_creation_input_tokens", 0)
    assert usage.get("cache_read_input_tokens", 0) >= CACHED_SHARE * prompt, (usage, session.report())
    turn = session.turns[1]
    assert turn.cached_share >= CACHED_SHARE, (turn.cache_hit_tokens, turn.cache_query_tokens, session.report())


def test_wire_format(session):
    """What Claude Code 2.1.337 sends, as the server must take it."""
    exchanges = session.turns[0].exchanges
    # a connectivity probe first; its status does not matter to the client
    assert (exchanges[0].method, exchanges[0].path) == ("HEAD", "/api/hello")
    first = session.turns[0].model_requests[0]
    ex = session.turns[0].main_request
    assert (ex.path, ex.query) == ("/v1/messages", {"beta": ["true"]})
    h = ex.headers
    assert h["anthropic-version"] == "2023-06-01"
    assert h["authorization"] == "Bearer unused" and "x-api-key" not in h  # ANTHROPIC_AUTH_TOKEN
    assert h["x-app"] == "cli"
    assert h["user-agent"].startswith("claude-cli/2.1.337")
    assert h["x-claude-code-session-id"] == claude_result(session.turns[0])["session_id"]
    betas = first.headers["anthropic-beta"].split(",")
    assert {"claude-code-20250219", "interleaved-thinking-2025-05-14", "context-management-2025-06-27",
            "advanced-tool-use-2025-11-20"} <= set(betas)
    # with tool search (advanced-tool-use) most tools are deferred behind ToolSearch
    assert {"ToolSearch", "DeferredToolPlaceholder"} <= {t["name"] for t in first.body["tools"]}
    assert any(t.get("defer_loading") for t in first.body["tools"])
    body = ex.body
    assert {"model", "messages", "system", "tools", "metadata", "max_tokens", "thinking", "context_management",
            "output_config", "stream"} <= body.keys()
    assert body["model"] == MODEL and body["stream"] is True
    # CLAUDE_CODE_MAX_OUTPUT_TOKENS; without it 32,000, more than a 32k context has left after the prompt
    assert body["max_tokens"] == CLAUDE_MAX_OUTPUT_TOKENS
    assert body["thinking"]["type"] == "adaptive"
    assert body["context_management"]["edits"][0]["type"].startswith("clear_thinking")
    assert "temperature" not in body
    # system: text blocks, the first a per-version billing line (volatile), later ones cache_control'd
    system = body["system"]
    assert all(b["type"] == "text" for b in system)
    assert system[0]["text"].startswith("x-anthropic-billing-header: cc_version=2.1.337")
    assert any("cache_control" in b for b in system[1:])
    # a system-role turn inside messages (the environment block) right after the first user turn
    roles = [m["role"] for m in body["messages"]]
    assert roles[:2] == ["user", "system"]
    assert "# Environment" in json.dumps(body["messages"][1]["content"])
    names = {t["name"] for t in body["tools"]}
    assert {"Bash", "Read", "Edit", "Write", "WebFetch", "WebSearch"} <= names
    assert all("input_schema" in t for t in body["tools"])
    assert ex.response_headers["content-type"].startswith("text/event-stream")
    kinds = [e["type"] for e in ex.events()]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
