"""Only this machine's clients drive a localhost server: a DNS-rebinding page (a foreign Host),
a foreign page's cross-origin "simple" POST, and a body that does not say it is JSON are
refused before any work, in the API's own error shape; the store's writes need the key. All
through real `localserve up` processes."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import start_server

FOREIGN_HOST = "attacker.example"
FOREIGN_ORIGIN = "http://attacker.example"
COMPLETION = {"model": "gemma3:270m", "prompt": "Hi", "max_tokens": 2}


def _port(server) -> str:
    return server.url.rsplit(":", 1)[1]


def _openai_error(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"], error


def _anthropic_error(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and words in body["error"]["message"], body


@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("GET", "/api/models"), ("GET", "/api/status"),
                                         ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")])
def test_a_foreign_host_is_refused(server, method, path):
    """What a DNS-rebinding page sends: its own name in Host, to 127.0.0.1."""
    body = COMPLETION if path == "/v1/completions" else {"model": "gemma3:270m", "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": "Hi"}]}
    r = httpx.request(method, server.url + path, headers={"Host": f"{FOREIGN_HOST}:{_port(server)}"},
                      json=body if method == "POST" else None, timeout=30)
    _openai_error(r, 403, "host 'attacker.example")


def test_a_foreign_host_gets_anthropics_shape_on_messages(server):
    r = httpx.post(server.url + "/v1/messages", headers={"Host": FOREIGN_HOST},
                   json={"model": "gemma3:270m", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
    _anthropic_error(r, 403, "not allowed")
    assert r.json()["error"]["type"] == "permission_error"


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "127.0.0.2", "app.localhost"])
def test_loopback_hosts_are_served(server, host):
    r = httpx.get(server.url + "/v1/models", headers={"Host": f"{host}:{_port(server)}"}, timeout=30)
    assert r.status_code == 200, r.text


def test_a_foreign_pages_simple_post_does_no_work(server):
    """Content-Type text/plain and a foreign Origin: no preflight in a browser, so the server
    itself must refuse, and generate nothing."""
    before = _prompt_tokens(server)
    r = httpx.post(server.url + "/v1/completions", content=json.dumps(COMPLETION),
                   headers={"Origin": FOREIGN_ORIGIN, "Content-Type": "text/plain"})
    _openai_error(r, 403, "origin 'http://attacker.example' is not allowed")
    assert "access-control-allow-origin" not in r.headers
    assert _prompt_tokens(server) == before


def _prompt_tokens(server) -> str:
    """The prompt tokens the server has admitted, from /metrics."""
    lines = httpx.get(server.url + "/metrics").text.splitlines()
    return "\n".join(line for line in lines if line.startswith("localserve_prompt_tokens_total"))


@pytest.mark.parametrize("origin", ["null", "https://attacker.example", "http://localhost.attacker.example",
                                    "http://127.0.0.1.attacker.example:8000", "ftp://localhost"])
def test_foreign_origins_are_refused_even_with_json(server, origin):
    r = httpx.post(server.url + "/v1/completions", json=COMPLETION, headers={"Origin": origin})
    _openai_error(r, 403, "is not allowed")


@pytest.mark.parametrize("origin", ["http://localhost:3000", "http://127.0.0.1:5173", "http://[::1]:8080",
                                    "vscode-webview://1abc", "app://obsidian.md"])
def test_local_pages_and_editor_webviews_are_served(server, origin):
    r = httpx.post(server.url + "/v1/completions", json=COMPLETION, headers={"Origin": origin}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == origin


def test_a_preflight_from_a_local_page_is_answered(server):
    r = httpx.options(server.url + "/v1/chat/completions",
                      headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                               "Access-Control-Request-Headers": "content-type,authorization"})
    assert r.status_code in (200, 204), r.text
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_a_body_must_say_it_is_json(server, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    r = httpx.post(server.url + "/v1/completions", content=json.dumps(COMPLETION), headers=headers)
    _openai_error(r, 415, "must be JSON")
    r = httpx.post(server.url + "/v1/messages", content=json.dumps(
        {"model": "gemma3:270m", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}), headers=headers)
    _anthropic_error(r, 415, "Content-Type: application/json")


def test_json_with_a_charset_is_json(server):
    r = httpx.post(server.url + "/v1/completions", content=json.dumps(COMPLETION),
                   headers={"Content-Type": "application/json; charset=utf-8"}, timeout=120)
    assert r.status_code == 200, r.text


def test_store_writes_need_the_key_and_refuse_foreign_pages(tiny_server):
    """tiny_server has --api-key sekret. Nothing is pulled, quantized or deleted."""
    url, key = tiny_server.url, {"Authorization": "Bearer sekret"}
    pull = {"model": "hf.co/ggml-org/gemma-3-270m-GGUF"}
    for r in (httpx.post(url + "/api/pull", json=pull),
              httpx.post(url + "/api/quantize", json={"model": "x", "type": "q8_0"}),
              httpx.delete(url + "/api/models/x")):
        _openai_error(r, 401, "API key")
    r = httpx.post(url + "/api/pull", content=json.dumps(pull),
                   headers={**key, "Origin": FOREIGN_ORIGIN, "Content-Type": "text/plain"})
    _openai_error(r, 403, "is not allowed")
    r = httpx.post(url + "/api/pull", json=pull, headers={**key, "Host": FOREIGN_HOST})
    _openai_error(r, 403, "is not allowed")
    jobs = httpx.get(url + "/api/jobs", headers=key)
    assert jobs.status_code == 200 and jobs.json()["jobs"] == [], jobs.text


def test_allowed_hosts_and_an_open_bind_warn_without_a_key(tmp_path):
    """--host 0.0.0.0 without --api-key warns at start and in /health; --allowed-hosts names
    the hosts it answers (and their pages' origin), still none other."""
    srv = start_server(["random:tiny-llama", "--threads", "1", "--host", "0.0.0.0",
                        "--allowed-hosts", "box.lan"], tmp_path / "up.log")
    try:
        health = httpx.get(srv.url + "/health").json()
        assert any("without an API key" in w for w in health["warnings"]), health
        assert "without an API key" in srv.output()
        ok = httpx.get(srv.url + "/v1/models", headers={"Host": "box.lan:1234", "Origin": "http://box.lan:1234"})
        assert ok.status_code == 200, ok.text
        _openai_error(httpx.get(srv.url + "/v1/models", headers={"Host": FOREIGN_HOST}), 403, "--allowed-hosts")
    finally:
        srv.stop()


def test_a_loopback_server_with_a_key_has_no_warning(tiny_server):
    assert "warnings" not in httpx.get(tiny_server.url + "/health").json()
