"""Our GGUF tokenizers against transformers' for the same files, and the conversion cache."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localserve.errors import ModelLoadError
from localserve.models.gguf_tokenizer import GGUFVocab, derive_merges, file_cache_key, load_gguf_tokenizer
from localserve.models.tokenizer import Tokenizer
from tests.models.tokenizer_builders import (
    CORPUS,
    default_tokenizer,
    tokenizer_cache_dir,
    write_byte_level_gguf,
    write_sentencepiece_gguf,
)

TEXTS = [
    "",
    " ",
    "  ",
    "Hello world",
    " Hello world",
    "Hello  world",
    "hello\nworld",
    "\n\n\nthree newlines",
    "trailing spaces   ",
    "\ttab\t\tdouble tab",
    "mixed \t \n whitespace \r\n CRLF",
    "                                        forty spaces",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'import numpy as np\nx = np.arange(10)[::-1]  # reversed\nprint(f"{x.sum():.3f}")',
    "fn main() { println!(\"{}\", 1 + 2); }",
    "SELECT * FROM users WHERE id = 42 AND name LIKE '%bob%';",
    '{"key": [1, 2.5, true, null], "nested": {"a": "b"}}',
    "<html><body><table><tr><td>cell</td></tr></table></body></html>",
    "https://example.com/path?query=1&other=two#frag",
    "user@example.com +1 (555) 123-4567",
    "1234567890 3.14159 -2.5e10 0x1F 1,000,000",
    "café naïve résumé façade Ünïcödé",
    "Привет, мир! Как дела?",
    "Γειά σου Κόσμε",
    "中文分词测试：你好，世界！",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 문장입니다.",
    "مرحبا بالعالم",
    "שלום עולם",
    "हिन्दी पाठ",
    "ภาษาไทย",
    "emoji 😀🚀🎉 and flags 🇫🇷🇯🇵",
    "family 👨‍👩‍👧‍👦 skin 👍🏽 zwj",
    "math ∑∫∂√∞ ≤ ≥ ≠ ± × ÷",
    "symbols ©®™ §¶ †‡ •… ‰ ′″",
    "rare chars \U0001f9ec \U0001fae0 \U00010348 \u2028 \u00a0nbsp",
    "control \x00\x01\x1f chars",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text with bos<eos>",
    "<start_of_turn>",
    "<end_of_turn><end_of_turn>",
    "not special: <start_of_turn",
    "<pad><unk><mask>",
    "[multimodal] <start_of_image> image <end_of_image>",
    "<unused0> <unused99>",
    "<b>bold</b> <i>it</i> <code>x</code>",
    "CamelCaseIdentifier snake_case_identifier kebab-case-id SCREAMING_CASE",
    "It's don't won't y'all I'm we'll they'd",
    "a" * 200,
    "ab " * 50,
    "!!!???...,,,;;;:::",
    "----====____****####",
    "    ",
    "\n",
    "\u2581already\u2581has\u2581meta\u2581space",
    "Ġbyte level marker Ċ",
    "<0xF0><0x9F> literal byte token text",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "Mixed: English, 中文, العربية, עברית, 😀, and code `x = 1`.",
]


@pytest.fixture(scope="session")
def tokenizer_cache() -> Path:
    return tokenizer_cache_dir()


@pytest.fixture(scope="session")
def gemma_tok(default_gguf) -> Tokenizer:
    return default_tokenizer(default_gguf)


@pytest.fixture(scope="session")
def hf_gemma(default_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


# -- the default model (gemma3, SentencePiece BPE without merges in the file) ----------------


@pytest.mark.slow
def test_gemma_backend_is_transformers_backend(gemma_tok, hf_gemma):
    ours = json.loads(gemma_tok.backend.to_str())
    theirs = json.loads(hf_gemma.backend_tokenizer.to_str())
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens"):
        assert ours[key] == theirs[key], key
    assert ours["model"]["vocab"] == theirs["model"]["vocab"]
    assert ours["model"]["merges"] == theirs["model"]["merges"]
    assert {k: v for k, v in ours["model"].items() if k not in ("vocab", "merges")} == {
        k: v for k, v in theirs["model"].items() if k not in ("vocab", "merges")
    }


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_gemma_matches_transformers(gemma_tok, hf_gemma, text):
    ids = gemma_tok.encode(text)
    assert ids == hf_gemma.encode(text)
    assert gemma_tok.encode(text, add_special_tokens=False) == hf_gemma.encode(text, add_special_tokens=False)
    assert gemma_tok.decode(ids) == hf_gemma.decode(ids, skip_special_tokens=True)
    assert gemma_tok.decode(ids, skip_special_tokens=False) == hf_gemma.decode(ids, skip_special_tokens=False)


@pytest.mark.slow
def test_gemma_decodes_arbitrary_ids_like_transformers(gemma_tok, hf_gemma):
    rng = random.Random(0)
    byte_ids = list(range(238, 238 + 256))  # <0x00>..<0xFF>
    for _ in range(200):
        ids = [rng.choice(byte_ids) if rng.random() < 0.3 else rng.randrange(gemma_tok.vocab_size) for _ in range(12)]
        for skip in (True, False):
            assert gemma_tok.decode(ids, skip) == hf_gemma.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.slow
def test_gemma_special_tokens(gemma_tok):
    assert gemma_tok.vocab_size == 262144
    assert gemma_tok.bos_token_id == 2
    assert gemma_tok.eos_token_ids == frozenset({1, 106})
    assert gemma_tok.encode("<start_of_turn>", add_special_tokens=False) == [105]
    assert gemma_tok.encode("x")[0] == 2  # BOS added
    assert gemma_tok.encode("x", add_special_tokens=False)[0] != 2
    assert {0, 1, 2, 3, 105, 106} <= gemma_tok.special_token_ids
    assert 107 not in gemma_tok.special_token_ids  # "\n" is user-defined, not special
    assert gemma_tok.id_to_piece(105) == "<start_of_turn>"
    assert gemma_tok.id_to_piece(138) == "\u2581\u2581"  # stored as two real spaces in the file
    assert gemma_tok.decode([105, 9259, 106]) == "Hello"


SECOND_START = """
import sys, time
from localserve.models import gguf_tokenizer
from localserve.models.tokenizer import Tokenizer

def no_conversion(*args, **kwargs):
    raise AssertionError("a cache hit must neither read the GGUF vocabulary nor convert it")

gguf_tokenizer.GGUFVocab.read = no_conversion
gguf_tokenizer.build_tokenizer = no_conversion
best = 1e9
for _ in range(3):
    t0 = time.process_time()
    tok = Tokenizer.from_gguf(sys.argv[1], cache_dir=sys.argv[2])
    best = min(best, time.process_time() - t0)
print(best, tok.encode("<start_of_turn>user\\nHi"))
"""


@pytest.mark.slow
def test_gemma_cache_makes_second_load_fast(default_gguf, gemma_tok, tokenizer_cache):
    """A later start (a fresh process) loads the converted tokenizer from the cache in under two
    second. CPU time, best of three: wall time on a shared 2-core box measures the neighbours."""
    assert any(p.name.startswith(default_gguf.stem) for p in tokenizer_cache.iterdir())
    out = subprocess.run(
        [sys.executable, "-c", SECOND_START, str(default_gguf), str(tokenizer_cache)],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout.split(" ", 1)
    seconds, ids = float(out[0]), json.loads(out[1])
    assert seconds < 2.0, f"cached load took {seconds:.2f} s of CPU"
    assert ids == gemma_tok.encode("<start_of_turn>user\nHi")


@pytest.mark.slow
def test_gemma_hf_folder_round_trip(gemma_tok, hf_gemma, tmp_path):
    hf_gemma.save_pretrained(tmp_path)
    ours = Tokenizer.from_hf_folder(tmp_path)
    for text in TEXTS[::3]:
        assert ours.encode(text) == hf_gemma.encode(text)
    assert ours.bos_token_id == 2


def test_derive_merges_order():
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}
    # score: file order (later = worse); ties inside one token: longer left piece first
    merges = derive_merges(vocab, {t: -i for t, i in vocab.items()})
    assert merges == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]


# -- byte-level BPE (gpt2 / llama3 / qwen style) and plain SentencePiece GGUFs ---------------

SMALL_TEXTS = CORPUS[:7] + TEXTS[:12] + TEXTS[20:34] + ["<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "<s>x</s>"]


@pytest.fixture(scope="session")
def tiny_ggufs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_gguf")
    return {
        "llama-bpe": write_byte_level_gguf(root / "llama-bpe.gguf", pre="llama-bpe"),
        "qwen2": write_byte_level_gguf(root / "qwen2.gguf", pre="qwen2"),
        "gpt2": write_byte_level_gguf(root / "gpt2.gguf", pre="gpt2"),
        "spm": write_sentencepiece_gguf(root / "spm.gguf"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama-bpe", "qwen2", "gpt2", "spm"])
def test_small_gguf_matches_transformers(tiny_ggufs, kind):
    transformers = pytest.importorskip("transformers")
    path = tiny_ggufs[kind]
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = Tokenizer.from_gguf(path)
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id
    for text in SMALL_TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("kind", ["llama-bpe", "qwen2", "spm"])
def test_small_gguf_round_trips(tiny_ggufs, kind):
    tok = Tokenizer.from_gguf(tiny_ggufs[kind])
    for text in SMALL_TEXTS:
        if kind == "spm" and text[:1] == " ":
            continue  # Llama's decoder strips the one space its pre-tokenizer would have added
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("hi")[0] == tok.bos_token_id


def test_byte_level_specials_and_eos(tiny_ggufs):
    tok = Tokenizer.from_gguf(tiny_ggufs["qwen2"])
    im_start, im_end, eot = (tok.piece_to_id(p) for p in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [im_start]
    assert tok.eos_token_ids == frozenset({im_end, eot})  # the file's EOS plus the turn end
    assert tok.decode([im_start, *tok.encode("hi", add_special_tokens=False), im_end]) == "hi"
    assert tok.chat_template.name == "chatml"


def test_cache_hit_and_invalidation(tiny_ggufs, tmp_path):
    src = tmp_path / "model.gguf"
    shutil.copy(tiny_ggufs["llama-bpe"], src)
    cache = tmp_path / "cache"
    first = Tokenizer.from_gguf(src, cache_dir=cache)
    (entry,) = list(cache.iterdir())
    assert (entry / "tokenizer.json").is_file() and (entry / "tokenizer_config.json").is_file()
    key = file_cache_key(src)
    assert entry.name.endswith(key)
    # the same file hits its entry...
    second = Tokenizer.from_gguf(src, cache_dir=cache)
    assert second.encode("Hello world") == first.encode("Hello world")
    assert len(list(cache.iterdir())) == 1
    # ...and a changed file (new mtime) gets a new entry
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert file_cache_key(src) != key
    Tokenizer.from_gguf(src, cache_dir=cache)
    assert len(list(cache.iterdir())) == 2


def test_damaged_cache_entry_is_rebuilt(tiny_ggufs, tmp_path):
    cache = tmp_path / "cache"
    ref = Tokenizer.from_gguf(tiny_ggufs["spm"], cache_dir=cache)
    (entry,) = list(cache.iterdir())
    (entry / "tokenizer.json").write_text("{not json")
    again = Tokenizer.from_gguf(tiny_ggufs["spm"], cache_dir=cache)
    assert again.encode("Hello world") == ref.encode("Hello world")
    json.loads((entry / "tokenizer.json").read_text())  # the entry was rewritten whole
    assert [p.name for p in cache.iterdir()] == [entry.name]


def test_unsupported_tokenizer_model():
    md = {"general.architecture": "bert", "tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["[CLS]", "a"]}
    with pytest.raises(ModelLoadError, match="unsupported GGUF tokenizer model 'bert'"):
        Tokenizer.from_gguf(md)


def test_from_metadata_mapping_uses_content_key(tiny_ggufs, tmp_path):
    vocab = GGUFVocab.read(tiny_ggufs["qwen2"])
    md = {
        "general.architecture": vocab.architecture,
        "tokenizer.ggml.model": vocab.model,
        "tokenizer.ggml.pre": vocab.pre,
        "tokenizer.ggml.tokens": vocab.tokens,
        "tokenizer.ggml.token_type": vocab.token_types,
        "tokenizer.ggml.merges": vocab.merges,
        "tokenizer.ggml.bos_token_id": vocab.bos_token_id,
        "tokenizer.ggml.eos_token_id": vocab.eos_token_id,
        "tokenizer.ggml.add_bos_token": True,
    }
    a = Tokenizer.from_gguf(md, cache_dir=tmp_path)
    b = Tokenizer.from_gguf(tiny_ggufs["qwen2"])
    assert a.encode("Hello <|im_end|> world") == b.encode("Hello <|im_end|> world")
    tok, _ = load_gguf_tokenizer(md, tmp_path)  # hit
    assert len(list(tmp_path.iterdir())) == 1
    assert tok.encode("Hello").ids == b.encode("Hello", add_special_tokens=True)


def test_chat_template_from_file(tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    path = write_byte_level_gguf(tmp_path / "t.gguf", chat_template=template)
    tok = Tokenizer.from_gguf(path)
    assert tok.chat_template.name == ""
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi[assistant]"
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] != tok.bos_token_id and tok.decode(ids) == "[user]hi[assistant]"


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope" * 10)
    with pytest.raises(ModelLoadError):
        Tokenizer.from_gguf(bad)
    with pytest.raises(ModelLoadError):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")


def test_hf_folder(tmp_path):
    from tests.models.tokenizer_builders import train_byte_level

    backend = train_byte_level()
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<|begin_of_text|>", "special": True},
                "eos_token": "<|im_end|>",
                "add_bos_token": True,
                "chat_template": [{"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"}],
            }
        )
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 3]}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    tok = Tokenizer.from_hf_folder(tmp_path)
    bos = tok.piece_to_id("<|begin_of_text|>")
    assert tok.bos_token_id == bos
    assert tok.encode("hi")[0] == bos
    assert tok.eos_token_ids == frozenset({0, 3})
    assert tok.apply_chat_template([{"role": "user", "content": "yo"}]) == "<|begin_of_text|>yo"
    with pytest.raises(ModelLoadError):
        Tokenizer.from_hf_folder(tmp_path / "nowhere")
