"""IncrementalDetokenizer on real tokenizers: a small byte-level BPE (fast) and the default
gemma3 SentencePiece tokenizer with byte fallback (slow fixture)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localserve.engine.detokenizer import IncrementalDetokenizer, StepText
from localserve.engine.sampling_params import SamplingParams
from localserve.models.gguf_tokenizer import TokenizerSettings
from localserve.models.tokenizer import Tokenizer
from tests.models.tokenizer_builders import default_tokenizer, train_byte_level, write_sentencepiece_gguf


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    backend = train_byte_level()
    eos = backend.token_to_id("<|endoftext|>")
    return Tokenizer(backend, TokenizerSettings(architecture="qwen2", eos_token="<|endoftext|>", eos_token_ids=[eos]))


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> Tokenizer:
    """Llama-style SentencePiece: its decoder strips the leading space of the whole text."""
    return Tokenizer.from_gguf(write_sentencepiece_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf"))


@pytest.fixture(scope="module")
def gemma(default_gguf) -> Tokenizer:
    return default_tokenizer(default_gguf)


def stream(tok, ids, **params) -> tuple[list[str], StepText | None, str]:
    """Feeds ids one by one; returns (deltas, the stopping step or None, flush())."""
    det = IncrementalDetokenizer(tok, SamplingParams(**params))
    deltas: list[str] = []
    for i in ids:
        step = det.feed(i)
        deltas.append(step.text_delta)
        if step.stopped:
            assert det.flush() == ""
            return deltas, step, ""
    return deltas, None, det.flush()


def streamed_text(tok, ids, **params) -> str:
    deltas, _, tail = stream(tok, ids, **params)
    return "".join(deltas) + tail


# -- multi-byte characters split across tokens -------------------------------------------------


def test_emoji_split_across_byte_tokens(bpe):
    ids = bpe.encode("🦜", add_special_tokens=False)  # not in the tiny vocab: split into byte pieces
    assert len(ids) >= 3
    deltas, stop, tail = stream(bpe, ids)
    assert deltas == [""] * (len(ids) - 1) + ["🦜"]  # never a U+FFFD half
    assert tail == ""


@pytest.mark.slow
def test_emoji_split_across_byte_fallback_tokens(gemma):
    text = "ok 🦜🪿 done"
    ids = gemma.encode(text, add_special_tokens=False)
    pieces = [gemma.id_to_piece(i) for i in ids]
    assert sum(p.startswith("<0x") for p in pieces) >= 4, pieces  # byte fallback happened
    deltas, _, tail = stream(gemma, ids)
    assert "".join(deltas) + tail == text
    assert all("\ufffd" not in d for d in deltas)


def test_incomplete_character_at_the_end_is_flushed(bpe):
    ids = bpe.encode("a🦜", add_special_tokens=False)[:-1]  # cut inside the emoji
    deltas, _, tail = stream(bpe, ids)
    assert "".join(deltas) == "a"
    assert "".join(deltas) + tail == bpe.decode(ids)  # the remainder decodes as U+FFFD, as decode does
    assert tail.startswith("\ufffd")


def test_sentencepiece_leading_spaces(spm):
    ids = spm.encode("Hello world, how are you", add_special_tokens=False)
    deltas, _, tail = stream(spm, ids)
    assert "".join(deltas) + tail == spm.decode(ids) == "Hello world, how are you"
    assert any(d.startswith(" ") for d in deltas[1:])  # later words keep their space


# -- stop strings, stop tokens, EOS -------------------------------------------------------------


def test_stop_string_across_token_boundaries(bpe):
    text = "The quick brown fox jumps over the lazy dog"
    ids = bpe.encode(text, add_special_tokens=False)
    deltas, stop, _ = stream(bpe, ids, stop=["fox jum"])
    assert stop is not None and stop.stop_reason == "fox jum"
    assert "".join(deltas) == "The quick brown "
    # the text that might have begun the stop string was held back, never emitted
    assert all("fox" not in d for d in deltas)


def test_stop_string_included(bpe):
    ids = bpe.encode("The quick brown fox jumps over", add_special_tokens=False)
    deltas, stop, _ = stream(bpe, ids, stop=["own fo"], include_stop_str_in_output=True)
    assert stop.stop_reason == "own fo"
    assert "".join(deltas) == "The quick brown fo"


def test_held_back_prefix_released_when_it_stops_matching(bpe):
    ids = bpe.encode("hello world", add_special_tokens=False)
    det = IncrementalDetokenizer(bpe, SamplingParams(stop=["worm"]))
    out = ""
    for i in ids:
        step = det.feed(i)
        out += step.text_delta
        assert not step.stopped
    assert out + det.flush() == "hello world"


def test_held_back_prefix_flushed_at_length_finish(bpe):
    ids = bpe.encode("say hel", add_special_tokens=False)
    deltas, stop, tail = stream(bpe, ids, stop=["hello"])
    assert stop is None
    assert not "".join(deltas).endswith("hel")  # held: it could still become "hello"
    assert "".join(deltas) + tail == "say hel"


def test_earliest_finishing_stop_string_wins(bpe):
    ids = bpe.encode("abcdef", add_special_tokens=False)
    _, stop, _ = stream(bpe, ids, stop=["cdef", "bc"])
    assert stop.stop_reason == "bc"
    assert streamed_text(bpe, ids, stop=["cdef", "bc"]) == "a"


def test_eos_and_stop_token_ids(bpe):
    eos = bpe.piece_to_id("<|endoftext|>")
    im_end = bpe.piece_to_id("<|im_end|>")
    hello = bpe.encode("hello", add_special_tokens=False)
    deltas, stop, _ = stream(bpe, [*hello, eos, *hello])
    assert stop.stopped and stop.stop_reason is None  # EOS
    assert "".join(deltas) == "hello"
    deltas, stop, _ = stream(bpe, [*hello, eos, *hello], ignore_eos=True)
    assert stop is None and "".join(deltas) == "hellohello"
    deltas, stop, _ = stream(bpe, [*hello, im_end, *hello], stop_token_ids=[im_end])
    assert stop.stop_reason == im_end and "".join(deltas) == "hello"
    deltas, _, _ = stream(
        bpe, [*hello, im_end], stop_token_ids=[im_end], include_stop_str_in_output=True, skip_special_tokens=False
    )
    assert "".join(deltas) == "hello<|im_end|>"


def test_stop_token_releases_held_text(bpe):
    eos = bpe.piece_to_id("<|endoftext|>")
    ids = bpe.encode("a🦜", add_special_tokens=False)
    deltas, stop, _ = stream(bpe, [*ids[:-1], eos], stop=["a\ufffd!"])
    assert stop.stop_reason is None
    assert "".join(deltas) == bpe.decode(ids[:-1])


def test_feed_after_stop_is_a_bug(bpe):
    eos = bpe.piece_to_id("<|endoftext|>")
    det = IncrementalDetokenizer(bpe, SamplingParams())
    assert det.feed(eos).stopped
    with pytest.raises(AssertionError):
        det.feed(eos)


@pytest.mark.slow
def test_gemma_ends_on_eos_and_end_of_turn(gemma):
    hi = gemma.encode("Hi there", add_special_tokens=False)
    for end in (1, 106):
        deltas, stop, _ = stream(gemma, [*hi, end, *hi])
        assert stop is not None and stop.stop_reason is None
        assert "".join(deltas) == "Hi there"


# -- properties -----------------------------------------------------------------------------------

TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(list("abc xyz\n\t  .,!?-_{}()'\"")),
        st.sampled_from(list("éü中文日本😀🦜🇫🇷👍🏽")),
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_deltas_concatenate_to_decode_bpe(bpe, text):
    ids = bpe.encode(text, add_special_tokens=False)
    assert streamed_text(bpe, ids) == bpe.decode(ids) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 499), max_size=30))
def test_arbitrary_ids_concatenate_to_decode(bpe, ids):
    # arbitrary ids include broken UTF-8 and special tokens
    ids = [i for i in ids if i < bpe.vocab_size and i != bpe.piece_to_id("<|endoftext|>")]
    for skip in (True, False):
        assert streamed_text(bpe, ids, skip_special_tokens=skip) == bpe.decode(ids, skip_special_tokens=skip)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_deltas_concatenate_to_decode_sentencepiece(spm, text):
    ids = spm.encode(text, add_special_tokens=False)
    assert streamed_text(spm, ids) == spm.decode(ids)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, data=st.data(), include=st.booleans())
def test_stop_string_property(bpe, text, data, include):
    """Output == decode(ids) cut at the first stop occurrence, whatever the token boundaries."""
    ids = bpe.encode(text, add_special_tokens=False)
    full = bpe.decode(ids)
    if full:
        i = data.draw(st.integers(0, len(full) - 1))
        stop = full[i : i + data.draw(st.integers(1, 6))]
    else:
        stop = data.draw(st.text(min_size=1, max_size=3))
    deltas, step, tail = stream(bpe, ids, stop=[stop], include_stop_str_in_output=include)
    at = full.find(stop)
    if at == -1:
        assert step is None and "".join(deltas) + tail == full
    else:
        assert "".join(deltas) + tail == full[: at + (len(stop) if include else 0)]
        # a stop string that ends in U+FFFD is seen only by flush(): a trailing U+FFFD is held
        # back as a possibly incomplete character, so the text is cut there, without a step
        assert (step is not None and step.stop_reason == stop) or (
            step is None and stop.endswith("\ufffd"))
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in full


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_deltas_concatenate_to_decode_gemma(gemma, text):
    ids = gemma.encode(text, add_special_tokens=False)
    assert streamed_text(gemma, ids) == gemma.decode(ids)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.one_of(st.integers(238, 238 + 255), st.integers(0, 262143)), max_size=24))
def test_gemma_arbitrary_ids_with_byte_tokens(gemma, ids):
    ids = [i for i in ids if i not in gemma.eos_token_ids]
    assert streamed_text(gemma, ids) == gemma.decode(ids)
