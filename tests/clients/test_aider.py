"""Aider (PyPI aider-chat, its own venv) over the OpenAI chat-completions API: two `--message` runs
in one folder, the second restoring the first's chat history."""

from __future__ import annotations

import pytest

from tests.clients.drivers import AIDER_ERROR, MODEL, PROMPTS

# aider asks for no usage (no stream_options), so the cache is read from the server's /metrics;
# its history goes in after the fixed system prompt and examples, which is what turn 2 shares
CACHED_SHARE = 0.5


@pytest.fixture(scope="module")
def session(drive_client):
    return drive_client("aider")


def test_two_turns_without_api_error(session):
    for turn in session.turns:
        assert turn.returncode == 0, session.report()
        assert not AIDER_ERROR.search(turn.stdout + turn.stderr), session.report()
        assert not turn.failed_requests, session.report()
        assert len(turn.model_requests) == 1, session.report()
        assert turn.main_request.events()[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_second_run_restores_the_first_turn(session):
    first, second = (t.main_request.body["messages"] for t in session.turns)
    assert "Restored previous conversation history." in session.turns[1].stdout
    assert any(m["role"] == "user" and m["content"].startswith(PROMPTS[0]) for m in second)
    answer = "".join(c["choices"][0]["delta"].get("content") or ""
                     for c in session.turns[0].main_request.events() if c.get("choices"))
    assert any(m["role"] == "assistant" and m["content"].strip() == answer.strip() for m in second), session.report()
    # the shared head: the system prompt and aider's canned example turns, unchanged
    assert second[:4] == first[:4]


def test_second_turn_prompt_from_prefix_cache(session):
    turn = session.turns[1]
    assert turn.cache_query_tokens > 0, session.report()
    assert turn.cached_share >= CACHED_SHARE, (turn.cache_hit_tokens, turn.cache_query_tokens, session.report())


def test_wire_format(session):
    ex = session.turns[0].main_request
    assert (ex.method, ex.path, ex.query) == ("POST", "/v1/chat/completions", {})
    assert ex.headers["authorization"] == "Bearer unused"
    assert ex.headers["user-agent"].startswith("OpenAI/Python")
    body = ex.body
    # litellm strips the `openai/` provider prefix; the model is the served name
    assert body["model"] == MODEL
    assert body["stream"] is True and "stream_options" not in body  # no usage asked for
    assert body["temperature"] == 0
    assert body["max_tokens"] == 48  # from the model settings file: nothing is sent without it
    assert "tools" not in body  # the edit format lives in the prompt
    roles = [m["role"] for m in body["messages"]]
    assert roles[0] == "system" and roles[-1] == "user" and set(roles) == {"system", "user", "assistant"}
    assert all(isinstance(m["content"], str) for m in body["messages"])
    assert body["messages"][-1]["content"].startswith(PROMPTS[0])
    assert ex.is_sse and ex.response_headers["content-type"].startswith("text/event-stream")
