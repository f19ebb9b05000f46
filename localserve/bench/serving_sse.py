"""The serving benchmark's requests and its reading of their event streams.

A request is one streamed OpenAI call with an exact output length (ignore_eos, a fixed
max_tokens), encoded once before the clock starts. Its response is read by SseScan, which is
fed the raw bytes as they come, splits them into events on blank lines and classifies each by
byte tests: does it carry generated tokens, does it carry usage, is it an error. Only the usage
event (one a request) and the few the tests cannot tell (a chat stream's finish chunk) are
decoded as JSON, so a token event costs a few substring searches, not a JSON parse.
"""

from __future__ import annotations

import json

from localserve.bench.serving_metrics import RequestResult


def request_body(model: str, prompt, max_tokens: int, chat: bool, temperature: float = 0.0) -> bytes:
    """One streamed request with an exact output length (ignore_eos, fixed max_tokens)."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return json.dumps(body, separators=(",", ":")).encode()


def _has_tokens(obj: dict, chat: bool) -> bool:
    choices = obj.get("choices") or []
    if not choices:
        return False
    if not chat:
        return True
    delta = choices[0].get("delta") or {}
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"))


class SseScan:
    """Reads one response stream: records token-event times, usage and errors into a RequestResult.

    A completions event with a choice is a token event (as in vLLM's client: the chunks of a
    model without a tokenizer carry empty text); a chat event is one when its delta has content,
    reasoning or tool calls (not the opening role chunk, not the finish chunk). A token event
    costs three substring searches (the event's end, `"usage":`, `"choices":[` or `"content":"`);
    JSON that is laid out otherwise (spaces after colons) is parsed, which is right, only slower."""

    __slots__ = ("rec", "chat", "buf", "crlf", "got_usage", "done")

    def __init__(self, rec: RequestResult, chat: bool) -> None:
        self.rec = rec
        self.chat = chat
        self.buf = b""
        self.crlf: bool | None = None  # lines end in CRLF (not known before the first line ends)
        self.got_usage = False
        self.done = False

    def feed(self, data: bytes, now: float) -> None:
        buf = self.buf + data if self.buf else data
        if self.crlf is None:  # the first line ending says which the stream uses
            i = buf.find(b"\n")
            if i < 0:
                self.buf = buf
                return
            self.crlf = buf[i - 1:i] == b"\r"
        if self.crlf:
            buf = buf.replace(b"\r\n", b"\n")
        start, n = 0, len(buf)
        while (i := buf.find(b"\n\n", start)) >= 0:
            self.event(buf[start:i] if start or i + 2 < n else buf[:-2], now)
            start = i + 2
        self.buf = buf[start:] if start < n else b""

    def event(self, ev: bytes, now: float) -> None:
        if not ev.startswith(b"data:"):
            i = ev.find(b"\ndata:")  # `event: x` first, or a comment (keep-alive) with no data
            if i < 0:
                return
            ev = ev[i + 1:]
        j = 6 if ev.startswith(b" ", 5) else 5  # where the payload starts
        if ev.startswith(b"[DONE]", j):
            self.done = True
            return
        u = ev.find(b'"usage":')
        if (u >= 0 and not ev.startswith(b"null", u + 8) and not ev.startswith(b" null", u + 8)) \
                or ev.startswith(b'{"error"', j) or ev.startswith(b'{"type":"error"', j):
            obj = json.loads(ev[j:])
            if "error" in obj:
                err = obj["error"]
                self.rec.error = f"error event: {err.get('message', err) if isinstance(err, dict) else err}"
                return
            usage = obj.get("usage") or {}
            self.rec.prompt_tokens = usage.get("prompt_tokens", 0)
            self.rec.output_tokens = usage.get("completion_tokens", 0)
            self.got_usage = True
            tokens = _has_tokens(obj, self.chat)
        elif self.chat:
            # the first chunk (role, empty content) and the finish chunk carry no tokens
            c = ev.find(b'"content":"')
            tokens = not ev.startswith(b'"', c + 11) if c >= 0 else _has_tokens(json.loads(ev[j:]), True)
        else:
            c = ev.find(b'"choices":[')
            tokens = ev.startswith(b"{", c + 11) if c >= 0 else _has_tokens(json.loads(ev[j:]), False)
        if tokens:
            self.rec.chunk_times.append(now)
