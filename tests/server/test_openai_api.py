"""The OpenAI API of a real `localserve up` process on the embedded model, through the openai SDK."""

from __future__ import annotations

import re

import httpx
import pytest

pytestmark = pytest.mark.slow

MODEL = "gemma3:270m"
CHAT = [{"role": "user", "content": "Write a list of five fruits."}]


def test_health_and_models(server, client):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    # the context window, in the fields vLLM, llama.cpp and agent catalogs read
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    ctx = int(re.search(r"context (\d+) tokens", server.output()).group(1))
    assert card["max_model_len"] == card["context_length"] == card["context_window"] == card["meta"]["n_ctx"] == ctx
    assert card["meta"]["n_ctx_train"] >= ctx and card["max_output_tokens"] == ctx - 1
    assert "localserve: ready at" in server.output()
    assert "KV capacity" in server.output() and "backend cpu" in server.output()


def test_chat_streamed_equals_whole(client):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    assert raw.http_response.status_code == 200
    whole = raw.parse()
    (choice,) = whole.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = whole.usage
    assert u.completion_tokens <= 16 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0

    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == u.completion_tokens


def test_completions_streamed_equals_whole(client):
    whole = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0, stream=True))
    assert whole.choices[0].text and streamed == whole.choices[0].text
    assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"


def test_completions_batch_of_prompts_and_token_ids(client):
    res = client.completions.create(model=MODEL, prompt=["One, two,", "Monday, Tuesday,"], max_tokens=4,
                                    temperature=0, n=2)
    assert [c.index for c in res.choices] == [0, 1, 2, 3]
    # greedy: both choices of a prompt agree
    assert res.choices[0].text == res.choices[1].text and res.choices[2].text == res.choices[3].text
    assert res.usage.completion_tokens == 16
    ids = client.completions.create(model=MODEL, prompt=[2, 4521, 236764], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_n_choices_and_seed_reproducibility(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=12, temperature=1.0, n=2)
    a = client.chat.completions.create(seed=1234, **kw)
    b = client.chat.completions.create(seed=1234, **kw)
    assert len(a.choices) == 2 and [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # per-choice streams differ
    others = {client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {a.choices[0].message.content}) > 1


def test_logprobs(client):
    res = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                         top_logprobs=3)
    content = res.choices[0].logprobs.content
    assert len(content) == res.usage.completion_tokens
    assert "".join(t.token for t in content) == res.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token  # greedy picks the most likely token
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4
    legacy = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=3, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.top_logprobs[0]) == 2 and lp.text_offset[0] == 0


def test_stop_strings(client):
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=20, temperature=0)
    text = base.choices[0].text
    assert "9" in text, text
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=20, temperature=0, stop=["9"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[:text.index("9")]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=20, temperature=0, stop="9", stream=True))
    assert streamed == stopped.choices[0].text


def test_repeated_long_prompt_reports_cached_tokens(client):
    system = "You are a careful assistant. " + " ".join(f"Rule {i}: answer briefly and exactly." for i in range(60))
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}]
    first = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0)
    msgs[1]["content"] = "Name a number."
    second = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > 400
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 32 and cached < second.usage.prompt_tokens


def test_metrics_parse(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("localserve_requests", "localserve_prompt_tokens", "localserve_generation_tokens",
                 "localserve_time_to_first_token_seconds", "localserve_inter_token_latency_seconds",
                 "localserve_requests_running", "localserve_requests_waiting", "localserve_kv_pages_used",
                 "localserve_kv_pages_total", "localserve_prefix_cache_hit_tokens", "localserve_prefix_cache_hit_ratio"):
        assert name in families, name
    finished = [s for s in families["localserve_requests"].samples if s.labels.get("status") == "finished"]
    assert finished and finished[0].value >= 1, r.text
    ttft = [s for s in families["localserve_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft[0].value >= 1
    assert families["localserve_kv_pages_total"].samples[0].value > 0


def test_openapi_schema(server):
    r = httpx.get(server.url + "/openapi/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert "/v1/chat/completions" in paths and "/v1/completions" in paths and "/v1/models" in paths
