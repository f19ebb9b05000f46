"""Tool-call parsers per model family, the reasoning split, the forced-call grammar and the
prompt rewrite for templates without tool support: on text, no server."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localserve.errors import InvalidRequestError
from localserve.models.chat_template import ChatTemplate
from localserve.server.reasoning import ReasoningParser, split_reasoning
from localserve.server.tools import (
    GENERIC,
    HERMES,
    LLAMA3,
    MISTRAL,
    ArgsDelta,
    CallStart,
    TextDelta,
    ToolCallParser,
    ToolChoice,
    ToolSpec,
    forced_calls_ebnf,
    format_for_template,
    tool_choice_from_openai,
    tools_from_openai,
)
from localserve.server.tools.prompt import generic_messages

NAMES = ["get_weather", "get_time"]
WEATHER = '{"city": "Paris", "days": [1, {"note": "a } and a \\" inside"}]}'

# (format, model text, expected content, expected [(name, arguments)])
CASES = [
    (HERMES, f'Let me look.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
     "Let me look.", [("get_weather", WEATHER), ("get_time", "{}")]),
    (HERMES, 'plain answer with <b>tags</b> and <tool_ text', 'plain answer with <b>tags</b> and <tool_ text', []),
    (LLAMA3, f' {{"name": "get_weather", "parameters": {WEATHER}}}; {{"name": "get_time", "parameters": {{}}}}',
     "", [("get_weather", WEATHER), ("get_time", "{}")]),
    (LLAMA3, '<|python_tag|>{"name": "get_time", "arguments": {"tz": "UTC"}}', "", [("get_time", '{"tz": "UTC"}')]),
    (LLAMA3, '{"answer": 42}', '{"answer": 42}', []),
    (LLAMA3, 'The answer is {"name": "get_time"}', 'The answer is {"name": "get_time"}', []),
    (MISTRAL, f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {WEATHER}}}, '
              '{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}]',
     "", [("get_weather", WEATHER), ("get_time", '{"tz": "UTC"}')]),
    (GENERIC, f'Checking.\n```tool_call\n{{"name": "get_weather", "arguments": {WEATHER}}}\n```\nDone.',
     "Checking.\nDone.", [("get_weather", WEATHER)]),
    (GENERIC, '```python\nprint("hi")\n```\n', '```python\nprint("hi")\n```\n', []),
    # an unknown function is no call: it stays text
    (HERMES, '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', []),
    # a call with no arguments key has empty arguments
    (GENERIC, '```tool_call\n{"name": "get_time"}\n```', "", [("get_time", "{}")]),
]


def events_of(fmt, pieces):
    p = ToolCallParser(fmt, NAMES)
    out = []
    for piece in pieces:
        out += p.feed(piece)
    return out + p.finish(), p


def summary(events):
    """(content, [(name, arguments)]) from events."""
    content = "".join(e.text for e in events if isinstance(e, TextDelta))
    calls: dict[int, list] = {}
    for e in events:
        if isinstance(e, CallStart):
            assert e.index == len(calls) and e.id.startswith("call_")
            calls[e.index] = [e.name, ""]
        elif isinstance(e, ArgsDelta):
            calls[e.index][1] += e.text
    return content, [tuple(c) for c in calls.values()]


@pytest.mark.parametrize("fmt,text,content,calls", CASES, ids=[f"{c[0].name}-{i}" for i, c in enumerate(CASES)])
def test_parse_whole(fmt, text, content, calls):
    got_content, got_calls = ToolCallParser(fmt, NAMES).parse(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    for c in got_calls:
        json.loads(c.arguments)
        assert c.to_openai()["function"] == {"name": c.name, "arguments": c.arguments}


@pytest.mark.parametrize("fmt,text,content,calls", CASES, ids=[f"{c[0].name}-{i}" for i, c in enumerate(CASES)])
def test_streamed_char_by_char_equals_whole(fmt, text, content, calls):
    events, parser = events_of(fmt, list(text))
    assert summary(events) == (content, calls)
    assert [(c.name, c.arguments) for c in parser.calls] == calls


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_any_split_gives_the_same_events(case, cuts):
    fmt, text, content, calls = case
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert summary(events_of(fmt, pieces)[0]) == (content, calls)


def test_marker_prefix_is_held_back_until_decided():
    p = ToolCallParser(HERMES, NAMES)
    assert p.feed("Hi <tool") == [TextDelta("Hi")]  # " <tool" may start a call
    assert p.feed("box>") == [TextDelta(" <toolbox>")]
    events = p.feed('<tool_call>\n{"name": "get_time", "arguments": {"tz": ')
    assert [type(e) for e in events] == [CallStart, ArgsDelta]
    assert events[1].text == '{"tz":'
    assert p.feed('"UTC"}}\n</tool_call>') + p.finish() == [ArgsDelta(0, ' "UTC"}')]
    assert p.calls[0].arguments == '{"tz": "UTC"}'


def test_calls_past_max_calls_are_dropped():
    text = CASES[0][1]
    content, calls = ToolCallParser(HERMES, NAMES, max_calls=1).parse(text)
    assert (content, [(c.name, c.arguments) for c in calls]) == ("Let me look.", [("get_weather", WEATHER)])
    assert summary(events_of_max(text, 1))[1] == [("get_weather", WEATHER)]


def events_of_max(text, max_calls):
    p = ToolCallParser(HERMES, NAMES, max_calls=max_calls)
    return [e for ch in text for e in p.feed(ch)] + p.finish()


def test_truncated_call_is_content_when_parsed_whole():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    assert ToolCallParser(HERMES, NAMES).parse(text) == (text, [])
    events, parser = events_of(HERMES, [text])
    assert parser.incomplete and not parser.calls  # streamed: the call started and broke off


def test_reasoning_split_whole_and_streamed():
    text = "<think>\nThe user wants x.\n</think>\n\nThe answer is 4."
    assert split_reasoning(text) == ("\nThe user wants x.\n", "The answer is 4.")
    assert split_reasoning("No thinking here.") == (None, "No thinking here.")
    assert split_reasoning("still thinking</think>done", in_reasoning=True) == ("still thinking", "done")
    for step in (1, 3, 7):
        p = ReasoningParser()
        parts = [p.feed(text[i:i + step]) for i in range(0, len(text), step)] + [p.finish()]
        assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == split_reasoning(text)


def test_reasoning_only_for_templates_with_think_tags():
    class Tok:
        def __init__(self, source):
            self.chat_template = ChatTemplate(source)

    assert ReasoningParser.for_prompt(Tok("{{ messages[0]['content'] }}"), "x") is None
    think = Tok("{{ '<think>' if enable_thinking is defined else '' }}")
    assert ReasoningParser.for_prompt(think, "<|im_start|>assistant\n").feed("<think>a</think>b") == ("a", "b")
    assert ReasoningParser.for_prompt(think, "assistant\n<think>\n").feed("a</think>b") == ("a", "b")


def test_formats_of_the_builtin_templates():
    names = {n: format_for_template(ChatTemplate.builtin(n).source) for n in ("chatml", "llama3", "gemma3", "mistral")}
    assert names == {"chatml": HERMES, "llama3": LLAMA3, "gemma3": GENERIC, "mistral": GENERIC}


TOOLS = [ToolSpec("get_weather", "Weather of a city", {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "array"}}, "required": ["city"]}),
    ToolSpec("get_time", "", {"type": "object", "properties": {"tz": {"type": "string"}}})]


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3, MISTRAL, GENERIC], ids=lambda f: f.name)
def test_forced_grammar_accepts_what_the_parser_reads(fmt):
    testing = pytest.importorskip("xgrammar.testing")
    two = [("get_weather", WEATHER), ("get_time", '{"tz": "UTC"}')]
    one_text, two_text = fmt.render_calls(two[:1]), fmt.render_calls(two)
    single, parallel = forced_calls_ebnf(TOOLS, fmt, False), forced_calls_ebnf(TOOLS, fmt, True)
    assert testing._is_grammar_accept_string(single, one_text)
    assert not testing._is_grammar_accept_string(single, two_text)
    assert testing._is_grammar_accept_string(parallel, two_text)
    assert not testing._is_grammar_accept_string(parallel, one_text.replace("get_weather", "get_wether"))
    assert not testing._is_grammar_accept_string(forced_calls_ebnf(TOOLS[1:], fmt, False), one_text)
    content, calls = ToolCallParser(fmt, NAMES).parse(two_text)
    assert (content, [(c.name, c.arguments) for c in calls]) == ("", two)


def test_generic_prompt_keeps_gemma_turns_alternating():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and the time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {"tz": "CET"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
        {"role": "user", "content": "Thanks"},
    ]
    chat = generic_messages(messages, TOOLS, ToolChoice("auto"), parallel=True)
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user"]
    assert "get_weather" in chat[0]["content"] and "```tool_call" in chat[0]["content"]
    assert chat[2]["content"] == GENERIC.render_calls([("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "CET"}')])
    assert "Result of get_weather:\n18 C" in chat[3]["content"] and "Result of get_time:\n12:00" in chat[3]["content"]
    text = ChatTemplate.builtin("gemma3", {"bos_token": "<bos>"}).render(chat)  # raises if turns do not alternate
    assert text.count("<start_of_turn>user") == 2 and text.endswith("<start_of_turn>model\n")
    # tool_choice none: no instruction, the tool turns are still written out
    assert [m["role"] for m in generic_messages(messages, [], ToolChoice("none"), True)] == ["system", "user",
                                                                                           "assistant", "user"]


def test_openai_tools_and_choice_are_checked():
    tools = tools_from_openai([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert tool_choice_from_openai(None, tools).mode == "auto" and tool_choice_from_openai(None, []).mode == "none"
    assert tool_choice_from_openai({"type": "function", "function": {"name": "f"}}, tools) == ToolChoice("function", "f")
    bad = [
        (lambda: tools_from_openai([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]),
         "parameters"),
        (lambda: tools_from_openai([{"type": "function", "function": {"name": "f", "parameters": [1]}}]), "parameters"),
        (lambda: tools_from_openai([{"type": "function", "function": {"name": "bad name!"}}]), "name"),
        (lambda: tools_from_openai([{"type": "function", "function": {"name": "f"}}] * 2), "unique"),
        (lambda: tool_choice_from_openai({"type": "function", "function": {"name": "g"}}, tools), "'g'"),
        (lambda: tool_choice_from_openai("required", []), "no tools"),
        (lambda: tool_choice_from_openai("sometimes", tools), "tool_choice"),
    ]
    for call, word in bad:
        with pytest.raises(InvalidRequestError, match=word):
            call()


def test_events_become_openai_deltas():
    import msgspec

    from localserve.server.openai_routes import chat_deltas
    from localserve.server.tools import ReasoningDelta

    events = [ReasoningDelta("hm"), TextDelta("a"), TextDelta("b"), CallStart(0, "call_x", "f"), ArgsDelta(0, '{"a"'),
              ArgsDelta(0, ": 1}"), CallStart(1, "call_y", "g"), ArgsDelta(1, "{}")]
    assert [msgspec.to_builtins(d) for d in chat_deltas(events)] == [
        {"reasoning_content": "hm"},
        {"content": "ab"},
        {"tool_calls": [{"index": 0, "id": "call_x", "type": "function", "function": {"name": "f", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]},
        {"tool_calls": [{"index": 1, "id": "call_y", "type": "function", "function": {"name": "g", "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
    ]


def test_output_parser_splits_reasoning_then_calls():
    from localserve.server.reasoning import ReasoningParser
    from localserve.server.tools import OutputParser, ReasoningDelta

    text = '<think>Need the weather.</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    whole = OutputParser(ReasoningParser(), ToolCallParser(HERMES, NAMES)).parse(text)
    assert (whole.reasoning, whole.content) == ("Need the weather.", None)
    assert [(c.name, c.arguments) for c in whole.calls] == [("get_weather", '{"city": "Oslo"}')]
    stream = OutputParser(ReasoningParser(), ToolCallParser(HERMES, NAMES))
    events = [e for i in range(0, len(text), 5) for e in stream.feed(text[i:i + 5])] + stream.finish()
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "Need the weather."
    assert summary(events) == ("", [("get_weather", '{"city": "Oslo"}')])
    plain = OutputParser().parse("just text")
    assert (plain.reasoning, plain.content, plain.calls) == (None, "just text", [])


def tiny_tokenizer(architecture: str, vocab=("<unk>",), chat_template: str | None = None):
    """A real Tokenizer over a word-level vocabulary: enough to pick and render templates."""
    import tokenizers

    from localserve.models.gguf_tokenizer import TokenizerSettings
    from localserve.models.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({v: i for i, v in enumerate(vocab)}, unk_token="<unk>"))
    return Tokenizer(backend, TokenizerSettings(architecture=architecture, bos_token="<unk>", eos_token="<unk>",
                                                chat_template=chat_template))


CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
]


def test_plans_render_tools_through_the_family_template():
    from localserve.server.tools import ToolPlan

    qwen = ToolPlan.build(TOOLS, ToolChoice("auto"), True, tiny_tokenizer("qwen2"))
    assert (qwen.format, qwen.template_tools, qwen.guided) == (HERMES, True, None)
    text = qwen.render(tiny_tokenizer("qwen2"), CONVERSATION)
    assert "<tools>" in text and '"name": "get_time"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n18 C\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")

    llama_tok = tiny_tokenizer("llama", ("<unk>", "<|start_header_id|>"))
    llama = ToolPlan.build(TOOLS, ToolChoice("function", "get_time"), False, llama_tok)
    assert llama.format is LLAMA3 and "root ::=" in llama.guided.ebnf and "get_weather" not in llama.guided.ebnf
    text = llama.render(llama_tok, CONVERSATION)
    assert "Environment: ipython" in text and '{"name": "get_weather", "parameters": {"city": "Paris"}}' in text

    gemma_tok = tiny_tokenizer("gemma3")
    gemma = ToolPlan.build(TOOLS, ToolChoice("none"), True, gemma_tok)
    assert (gemma.format, gemma.template_tools, gemma.active, gemma.parser()) == (GENERIC, False, False, None)
    text = gemma.render(gemma_tok, CONVERSATION)
    assert "You have access" not in text and "Result of get_weather:\n18 C" in text

    with pytest.raises(InvalidRequestError, match="required"):
        ToolPlan.build([], ToolChoice("required"), True, gemma_tok)
