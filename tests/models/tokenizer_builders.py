"""Tiny real tokenizers for tests: trained with the `tokenizers` library and, where a test needs
a file, written into a GGUF with gguf.GGUFWriter the way llama.cpp's converter lays them out."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

CORPUS = [
    "Hello world! This is a tiny corpus for a byte-level BPE tokenizer.",
    "def add(a, b):\n    return a + b\n\nclass Foo:\n    pass\n",
    "The quick brown fox jumps over the lazy dog. 12345 67890 3.14159",
    "Unicode: café naïve — “quotes” 中文 日本語 한국어 😀 🚀 Ünïcödé",
    "    indented\n\tTabs\n\n\nnewlines   spaces\r\n",
    "It's we're they'll I'd you've HELLO World hello-world snake_case camelCase",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>",
] * 30

BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<|begin_of_text|>", "<|im_start|>", "<|im_end|>"]


def train_byte_level(vocab_size: int = 800) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=BYTE_LEVEL_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _vocab_and_merges(tok: Tokenizer) -> tuple[list[str], list[str]]:
    d = json.loads(tok.to_str())
    vocab = d["model"]["vocab"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in d["model"]["merges"]]
    return sorted(vocab, key=vocab.get), merges


def _llama_header(w: gguf.GGUFWriter) -> None:
    # enough model metadata for transformers' GGUF config reader
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_byte_level_gguf(path: Path, pre: str = "llama-bpe", chat_template: str | None = None) -> Path:
    """A gpt2-style (byte-level BPE with merges) GGUF like llama3/qwen files."""
    tokens, merges = _vocab_and_merges(train_byte_level())
    ids = {t: i for i, t in enumerate(tokens)}
    w = gguf.GGUFWriter(str(path), "llama")
    _llama_header(w)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in BYTE_LEVEL_SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(ids["<|begin_of_text|>"])
    w.add_eos_token_id(ids["<|endoftext|>"])
    w.add_add_bos_token(True)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    _finish(w)
    return path


def write_sentencepiece_gguf(path: Path, architecture: str = "llama") -> Path:
    """A llama-style SentencePiece BPE GGUF: <unk> <s> </s>, 256 byte tokens, then pieces spelled
    with U+2581 and scored by rank (no merges in the file, as llama.cpp writes them)."""
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Replace(" ", "\u2581")
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False)
    trained.train_from_iterator(CORPUS, trainer)
    pieces, _ = _vocab_and_merges(trained)
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tokens = ["<unk>", "<s>", "</s>"] + bytes_ + [p for p in pieces if p not in bytes_]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    w = gguf.GGUFWriter(str(path), architecture)
    _llama_header(w)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    _finish(w)
    return path


_GEMMA: dict[str, object] = {}


def default_tokenizer(gguf_path: Path):
    """The default model's Tokenizer, converted once per test session: the conversion cache
    lives under LOCALSERVE_HOME, which tests/conftest.py points at a session temp dir."""
    from localserve.models.tokenizer import Tokenizer

    key = str(gguf_path)
    if key not in _GEMMA:
        _GEMMA[key] = Tokenizer.from_gguf(gguf_path, cache_dir=tokenizer_cache_dir())
    return _GEMMA[key]


def tokenizer_cache_dir() -> Path:
    import os

    return Path(os.environ.get("LOCALSERVE_HOME", "/tmp")) / "tokenizer-cache"
