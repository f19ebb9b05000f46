"""Every bad input gets its own clear 4xx in the OpenAI error shape, and nothing else is disturbed."""

from __future__ import annotations

import json
import re
import threading

import httpx
import pytest

pytestmark = pytest.mark.slow

MODEL = "gemma3:270m"
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


def post(server, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"},
                      timeout=120, **kw)


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and isinstance(err["message"], str)
    assert "Traceback" not in r.text
    for w in words:
        assert w.lower() in err["message"].lower(), err["message"]
    return err


CASES = [
    ("malformed JSON", "/v1/chat/completions", b'{"model": "x", "messages": [', 400, ["json"]),
    ("wrong type", "/v1/chat/completions", {**OK_CHAT, "max_tokens": "lots"}, 400, ["max_tokens"]),
    ("messages not a list", "/v1/chat/completions", {"messages": "hello"}, 400, ["messages"]),
    ("negative max_tokens", "/v1/chat/completions", {**OK_CHAT, "max_tokens": -5}, 400, ["max_tokens"]),
    ("huge max_tokens", "/v1/chat/completions", {**OK_CHAT, "max_tokens": 10**9}, 400, ["maximum context length"]),
    ("unknown model", "/v1/chat/completions", {**OK_CHAT, "model": "gpt-17"}, 404, ["gpt-17", MODEL]),
    ("empty messages", "/v1/chat/completions", {**OK_CHAT, "messages": []}, 400, ["at least one message"]),
    ("invalid role", "/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     ["role", "wizard"]),
    ("image part", "/v1/chat/completions",
     {**OK_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     ["text"]),
    ("temperature out of range", "/v1/chat/completions", {**OK_CHAT, "temperature": 500}, 400, ["temperature"]),
    ("bad logit_bias", "/v1/chat/completions", {**OK_CHAT, "logit_bias": {"999999999": 5}}, 400, ["logit_bias"]),
    ("top_logprobs without logprobs", "/v1/chat/completions", {**OK_CHAT, "top_logprobs": 2}, 400, ["logprobs"]),
    ("n out of range", "/v1/chat/completions", {**OK_CHAT, "n": 0}, 400, ["n must be"]),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": []}, 400, ["empty"]),
    ("prompt ids out of vocab", "/v1/completions", {"model": MODEL, "prompt": [1, 10**7]}, 400, ["token ids"]),
    ("suffix", "/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y"}, 400, ["suffix"]),
]


@pytest.mark.parametrize("name,path,body,status,words", CASES, ids=[c[0] for c in CASES])
def test_bad_request(server, name, path, body, status, words):
    assert_error(post(server, path, body), status, *words)


def test_too_long_prompt_names_both_lengths(server):
    long_text = "word " * 40000
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": long_text, "max_tokens": 1})
    err = assert_error(r, 400, "maximum context length is 32768 tokens")
    assert err["code"] == "context_length_exceeded"
    (count,) = re.findall(r"the prompt has (\d+) tokens", err["message"])
    assert int(count) > 32768


def test_oversized_body_is_413(server):
    body = json.dumps({"model": MODEL, "prompt": "x" * (33 * 1024 * 1024)})
    assert_error(post(server, "/v1/completions", body), 413, "too large")


def test_unknown_route_and_method(server):
    assert_error(httpx.get(server.url + "/v1/nothing-here"), 404)
    assert_error(httpx.get(server.url + "/v1/chat/completions"), 405)


def test_bad_inputs_do_not_disturb_a_running_request(server):
    """A long request keeps streaming, to the same text, while a burst of bad ones is refused."""
    body = {"model": MODEL, "prompt": "1, 2, 3,", "max_tokens": 24, "temperature": 0}
    alone = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    result = {}
    t = threading.Thread(target=lambda: result.update(r=post(server, "/v1/completions", body)))
    t.start()
    for _, path, bad, status, _ in CASES:
        assert post(server, path, bad).status_code == status
    t.join()
    assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["text"] == alone
    assert post(server, "/v1/chat/completions", OK_CHAT).status_code == 200
