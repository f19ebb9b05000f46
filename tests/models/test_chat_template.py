"""Chat templates: gemma's exact prompt string, HF-compatible rendering, fallbacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localserve.errors import InvalidRequestError
from localserve.models.chat_template import (
    FALLBACK_TEMPLATES,
    ChatTemplate,
    fallback_template_name,
    load_builtin_template,
)

GEMMA_SPECIALS = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
PEER_GEMMA = Path("/work/shared/peers/gemma3_chat_template.jinja")

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "  Hi  "}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": [{"type": "text", "text": "And 3+3?"}]},
    ],
    [
        {"role": "system", "content": [{"type": "text", "text": "System as parts."}]},
        {"role": "user", "content": "Unicode: 中文 😀 <tag> & \"quotes\""},
        {"role": "assistant", "content": "ok", "tool_calls": None},
        {"role": "user", "content": "multi\nline\n\ntext"},
    ],
]


def gemma() -> ChatTemplate:
    return ChatTemplate.builtin("gemma3", GEMMA_SPECIALS)


def test_gemma_builtin_is_the_reference_template():
    if PEER_GEMMA.exists():
        assert load_builtin_template("gemma3") == PEER_GEMMA.read_text()


def test_gemma_single_turn():
    out = gemma().render([{"role": "user", "content": "Why is the sky blue?"}])
    assert out == "<bos><start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n"


def test_gemma_system_and_history():
    out = gemma().render(CONVERSATIONS[2], add_generation_prompt=False)
    assert out == (
        "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
    )
    out = gemma().render(CONVERSATIONS[1])
    assert out == "<bos><start_of_turn>user\nBe terse.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_gemma_rejects_non_alternating_roles():
    with pytest.raises(InvalidRequestError, match="alternate"):
        gemma().render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.slow
@pytest.mark.parametrize("name", FALLBACK_TEMPLATES)
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_rendering_matches_transformers(name, conv):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Backend(WordLevel({"<unk>": 0, "<bos>": 1, "<eos>": 2, "<pad>": 3}, unk_token="<unk>")),
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    source = load_builtin_template(name)
    messages = CONVERSATIONS[conv]
    if name == "mistral" and messages[-1]["role"] != "user":
        return
    for agp in (True, False):
        expected = hf.apply_chat_template(
            messages, chat_template=source, tokenize=False, add_generation_prompt=agp, date_string="01 Jan 2025"
        )
        ours = ChatTemplate(source, GEMMA_SPECIALS).render(messages, add_generation_prompt=agp, date_string="01 Jan 2025")
        assert ours == expected


def test_environment_like_transformers():
    src = (
        "{{ messages[0]['content'] | tojson }}|{{ {'b': 1, 'a': [1, 2]} | tojson(sort_keys=True) }}|"
        "{{ strftime_now('%Y') | length }}|{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
        "{{ 'content' in messages[1] }}|{{ bos_token }}{{ eos_token }}|{{ tools | length }}|{{ extra }}"
    )
    out = ChatTemplate(src, GEMMA_SPECIALS).render(
        [{"role": "user", "content": "<b>&é"}, {"role": "assistant", "content": None}],
        tools=[{"type": "function", "function": {"name": "f"}}],
        extra="kw",
    )
    # tojson does not escape HTML or non-ASCII; a None content is dropped, not printed as "None"
    assert out == '"<b>&é"|{"a": [1, 2], "b": 1}|4|user|False|<bos><eos>|1|kw'


def test_trim_and_lstrip_blocks():
    src = "{% for m in messages %}\n  {% if true %}\n{{ m.content }}\n  {% endif %}\n{% endfor %}"
    assert ChatTemplate(src).render([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]) == "x\ny\n"


def test_sandbox_blocks_attribute_escapes():
    src = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception):
        ChatTemplate(src).render([{"role": "user", "content": "x"}])


def test_bad_template_source():
    with pytest.raises(ValueError):
        ChatTemplate("{% for %}")
    with pytest.raises(InvalidRequestError):
        ChatTemplate("{{ messages[0]['content'] }}").render([{"content": "no role"}])


def test_tools_and_tool_calls_in_fallbacks():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    chatml = ChatTemplate.builtin("chatml").render(messages, tools=tools)
    assert json.dumps(tools[0]) in chatml
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in chatml
    assert "<tool_response>\nsunny\n</tool_response>" in chatml
    assert chatml.endswith("<|im_start|>assistant\n")
    llama = ChatTemplate.builtin("llama3", {"bos_token": "<|begin_of_text|>"}).render(messages, tools=tools)
    assert llama.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n")
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in llama
    assert "<|start_header_id|>ipython<|end_header_id|>\n\nsunny<|eot_id|>" in llama


def test_fallback_choice():
    assert fallback_template_name("gemma3") == "gemma3"
    assert fallback_template_name("qwen2") == "chatml"
    assert fallback_template_name("qwen3") == "chatml"
    assert fallback_template_name("mistral") == "mistral"
    assert fallback_template_name("llama", {"<|start_header_id|>"}) == "llama3"
    assert fallback_template_name("llama", {"[INST]"}) == "mistral"
    assert fallback_template_name("llama", {"<|im_start|>"}) == "chatml"
    assert fallback_template_name("llama") == "llama3"
    for name in FALLBACK_TEMPLATES:
        ChatTemplate.builtin(name)  # all compile


@pytest.mark.slow
def test_default_model_chat_prompt(default_gguf):
    from tests.models.tokenizer_builders import default_tokenizer

    tok = default_tokenizer(default_gguf)
    messages = [{"role": "user", "content": "Write a haiku."}]
    text = tok.apply_chat_template(messages)
    assert text == "<bos><start_of_turn>user\nWrite a haiku.<end_of_turn>\n<start_of_turn>model\n"
    ids = tok.encode_chat(messages)
    assert ids[:3] == [2, 105, 2364]  # <bos> <start_of_turn> user
    assert ids[-3:] == [105, 4368, 107]  # <start_of_turn> model \n
    assert ids.count(2) == 1


# -- system turns inside the conversation (Claude Code sends them mid-conversation) ---------------

LATE_SYSTEM = [
    {"role": "system", "content": "SYS"},
    {"role": "user", "content": "U1"},
    {"role": "system", "content": "MID1"},
    {"role": "assistant", "content": "A1"},
    {"role": "system", "content": [{"type": "text", "text": "MID2"}]},
    {"role": "user", "content": "U2"},
]


def test_gemma_folds_late_system_turns_where_it_puts_system_text():
    assert gemma().folds_system_into_user
    out = gemma().render(LATE_SYSTEM)
    assert out == ("<bos><start_of_turn>user\nSYS\n\nU1\n\nMID1<end_of_turn>\n"
                   "<start_of_turn>model\nA1<end_of_turn>\n"
                   "<start_of_turn>user\nMID2\n\nU2<end_of_turn>\n<start_of_turn>model\n")
    # last in the conversation, after an assistant turn: a user turn of its own
    out = gemma().render([{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
                          {"role": "system", "content": "NOTE"}])
    assert out.endswith("<start_of_turn>model\nA1<end_of_turn>\n<start_of_turn>user\nNOTE<end_of_turn>\n"
                        "<start_of_turn>model\n")


def test_template_with_a_system_role_keeps_late_system_turns_in_place():
    chatml = ChatTemplate.builtin("chatml", GEMMA_SPECIALS)
    assert not chatml.folds_system_into_user
    out = chatml.render(LATE_SYSTEM)
    assert out.index("U1") < out.index("<|im_start|>system\nMID1<|im_end|>") < out.index("A1")
    assert out.index("A1") < out.index("<|im_start|>system\nMID2<|im_end|>") < out.index("U2")


def test_a_folded_system_turn_between_two_user_turns_joins_them():
    chat = [{"role": "user", "content": "Result of ls:\nfile"}, {"role": "system", "content": "NOTE"},
            {"role": "user", "content": "Thanks"}]
    assert gemma().render(chat) == ("<bos><start_of_turn>user\nResult of ls:\nfile\n\nNOTE\n\nThanks<end_of_turn>\n"
                                    "<start_of_turn>model\n")


@pytest.mark.parametrize("source", [
    # refuses system turns after the first message (as Qwen3's template does)
    "{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
    "{{ raise_exception('System message must be at the beginning.') }}{% endif %}"
    "<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}",
    # drops them silently
    "{% for m in messages %}{% if m.role != 'system' or loop.first %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>"
    "{% endif %}{% endfor %}",
])
def test_late_system_turns_are_folded_where_the_template_cannot_take_them(source):
    out = ChatTemplate(source).render(LATE_SYSTEM, add_generation_prompt=False)
    assert out == "<system>SYS</system><user>U1\n\nMID1</user><assistant>A1</assistant><user>MID2\n\nU2</user>"
