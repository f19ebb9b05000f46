"""Under a forced tool call (tool_choice required or a named function) the output is the
calls: a call cut off by max_tokens is dropped, never sent as content, whole or streamed, in
every format; without a forced call the same text stays content, as before. On text, no server."""

from __future__ import annotations

import pytest

from localserve.server.tools import (
    GENERIC,
    HERMES,
    LLAMA3,
    MISTRAL,
    ArgsDelta,
    CallStart,
    OutputParser,
    TextDelta,
    ToolCallParser,
    ToolChoice,
    ToolPlan,
    ToolSpec,
)

NAMES = ["get_weather", "get_time"]
ONE = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
CUT = '{"name": "get_time", "arguments": {"timezone": "Europe/Os'


def forced_text(fmt, calls: list[str], cut: str | None) -> str:
    """What a forced grammar lets the model write: the prefix, calls, and maybe one cut off."""
    text = fmt.prefix + fmt.separator.join(calls)
    if cut is None:
        return text + fmt.suffix
    return text + (fmt.separator if calls else "") + cut


def streamed(parser: ToolCallParser, text: str, size: int = 3) -> list:
    return [e for i in range(0, len(text), size) for e in parser.feed(text[i:i + size])] + parser.finish()


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3, MISTRAL, GENERIC], ids=lambda f: f.name)
@pytest.mark.parametrize("calls", [[], [ONE]], ids=["cut_first", "cut_second"])
def test_a_cut_forced_call_is_never_content(fmt, calls):
    text = forced_text(fmt, calls, CUT)
    content, got = ToolCallParser(fmt, NAMES, forced=True).parse(text)
    assert content == "" and [c.name for c in got] == ["get_weather"] * len(calls)
    events = streamed(ToolCallParser(fmt, NAMES, forced=True), text)
    assert not [e for e in events if isinstance(e, TextDelta)]
    # the calls that completed stream as they do without forcing
    starts = [e.name for e in events if isinstance(e, CallStart)]
    assert starts[:len(calls)] == ["get_weather"] * len(calls)
    # not forced, a cut call with nothing before it is the content (the model's own text)
    if not calls:
        assert ToolCallParser(fmt, NAMES).parse(text) == (text, [])


@pytest.mark.parametrize("fmt", [HERMES, GENERIC], ids=lambda f: f.name)
def test_complete_forced_calls_parse_as_without_forcing(fmt):
    text = forced_text(fmt, [ONE, ONE], None)
    for forced in (True, False):
        content, calls = ToolCallParser(fmt, NAMES, forced=forced).parse(text)
        assert content == "" and [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Oslo"}')] * 2
    args = "".join(e.text for e in streamed(ToolCallParser(fmt, NAMES, forced=True), text) if isinstance(e, ArgsDelta))
    assert args == '{"city": "Oslo"}' * 2


def test_output_parser_of_a_forced_plan_gives_no_content():
    from tests.server.test_tool_parsers import tiny_tokenizer

    tok = tiny_tokenizer("gemma3")
    tools = [ToolSpec(n, "", {"type": "object", "properties": {}}) for n in NAMES]
    required = ToolPlan.build(tools, ToolChoice("required"), True, tok)
    auto = ToolPlan.build(tools, ToolChoice("auto"), True, tok)
    text = forced_text(required.format, [], CUT)
    parsed = OutputParser.for_request(required, tok, "").parse(text)
    assert (parsed.content, parsed.calls) == (None, [])
    named = ToolPlan.build(tools, ToolChoice("function", "get_time"), False, tok)
    assert OutputParser.for_request(named, tok, "").parse(text).content is None
    # tool_choice auto: the model chose to write this, it stays content
    assert OutputParser.for_request(auto, tok, "").parse(text).content == text
