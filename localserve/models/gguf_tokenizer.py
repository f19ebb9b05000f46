"""A GGUF file's tokenizer metadata as a `tokenizers.Tokenizer`, built the way transformers builds it.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`), its
kind (`tokenizer.ggml.model`: "llama" = SentencePiece BPE with scores, "gpt2" = byte-level BPE with
`tokenizer.ggml.merges`), token types and special ids as metadata. We rebuild the same pipeline
(normalizer, pre-tokenizer, BPE settings, decoder, added tokens, BOS post-processor) that
`AutoTokenizer.from_pretrained(dir, gguf_file=...)` produces, so ids match transformers exactly.

Rebuilding Gemma's 262k-token vocabulary means deriving ~515k merges in Python (seconds), so
`load_gguf_tokenizer` caches the result as an HF-style folder (tokenizer.json +
tokenizer_config.json) keyed by the file's size, mtime and a hash of its header.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from localserve.errors import ModelLoadError

# llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Bump whenever the conversion changes: it is part of the cache key.
CONVERTER_VERSION = 1
# The tokenizer metadata sits at the start of the file, before any tensor data; hashing this
# much of the file covers it for every vocabulary we know (gemma3's header is ~6.5 MB).
HEADER_HASH_BYTES = 16 << 20

SENTENCEPIECE_GEMMA_ARCHS = frozenset({"gemma", "gemma2", "gemma3"})

# Control tokens that end a turn in the families we serve; llama.cpp treats the same texts as
# end-of-generation. Gemma's file names only <eos> but its chat turns end on <end_of_turn>.
END_OF_GENERATION_TEXTS = frozenset(
    {
        "<end_of_turn>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end_of_text|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<EOT>",
    }
)

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the split regex its merges were learned under (as transformers maps them)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


@dataclass(slots=True)
class GGUFVocab:
    """The `tokenizer.*` metadata of a GGUF file."""

    architecture: str
    model: str  # tokenizer.ggml.model
    tokens: list[str]
    token_types: list[int] | None = None
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    unk_token_id: int | None = None
    pad_token_id: int | None = None
    eot_token_id: int | None = None
    eom_token_id: int | None = None
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    chat_template: str | None = None

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> GGUFVocab:
        """From a flat {key: python value} mapping of GGUF metadata."""

        def opt_int(key: str) -> int | None:
            v = md.get(key)
            return None if v is None else int(v)

        def opt_bool(key: str) -> bool | None:
            v = md.get(key)
            return None if v is None else bool(v)

        def opt_list(key: str) -> list | None:
            v = md.get(key)
            return None if v is None else list(v)

        return cls(
            architecture=str(md.get("general.architecture", "")),
            model=str(md["tokenizer.ggml.model"]),
            tokens=[t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in md["tokenizer.ggml.tokens"]],
            token_types=opt_list("tokenizer.ggml.token_type"),
            scores=opt_list("tokenizer.ggml.scores"),
            merges=opt_list("tokenizer.ggml.merges"),
            pre=md.get("tokenizer.ggml.pre"),
            bos_token_id=opt_int("tokenizer.ggml.bos_token_id"),
            eos_token_id=opt_int("tokenizer.ggml.eos_token_id"),
            unk_token_id=opt_int("tokenizer.ggml.unknown_token_id"),
            pad_token_id=opt_int("tokenizer.ggml.padding_token_id"),
            eot_token_id=opt_int("tokenizer.ggml.eot_token_id"),
            eom_token_id=opt_int("tokenizer.ggml.eom_token_id"),
            add_bos_token=opt_bool("tokenizer.ggml.add_bos_token"),
            add_eos_token=opt_bool("tokenizer.ggml.add_eos_token"),
            chat_template=md.get("tokenizer.chat_template"),
        )

    @classmethod
    def read(cls, path: str | os.PathLike) -> GGUFVocab:
        """Through localserve.models.gguf_file (0.2 s for gemma3's header; gguf.GGUFReader takes
        ~11 s because it builds a numpy view per array element)."""
        from localserve.models.gguf_file import GGUFFile

        f = GGUFFile(path)  # ModelLoadError naming the file when it is not a whole GGUF
        try:
            md = f.metadata
        finally:
            f.close()
        if "tokenizer.ggml.model" not in md or "tokenizer.ggml.tokens" not in md:
            raise ModelLoadError(os.fspath(path), "the file holds no tokenizer (tokenizer.ggml.*)")
        return cls.from_metadata(md)

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None or not 0 <= token_id < len(self.tokens) else self.tokens[token_id]

    def ids_of_type(self, token_type: int) -> list[int]:
        return [i for i, t in enumerate(self.token_types or ()) if t == token_type]

    def content_hash(self) -> str:
        big = ("tokens", "token_types", "scores", "merges")
        scalars = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in big}
        h = hashlib.sha256(f"v{CONVERTER_VERSION}:".encode())
        h.update(json.dumps(scalars, sort_keys=True).encode())
        for seq in (self.tokens, self.merges or ()):
            h.update("\0".join(seq).encode("utf-8", "surrogatepass"))
            h.update(b"\1")
        h.update(repr(self.token_types).encode())
        h.update(repr(self.scores).encode())
        return h.hexdigest()


@dataclass(slots=True)
class TokenizerSettings:
    """What tokenizer_config.json (+ generation_config.json) would say; JSON round-trippable."""

    architecture: str = ""
    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    chat_template: str | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TokenizerSettings:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


# -- building ---------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def derive_merges(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list[tuple[str, str]]:
    """Merges implied by a vocabulary without a merge list: every split of a token into two
    vocabulary tokens, best score first (ties: longer left piece first, then file order).

    Same order as transformers' `generate_merges(vocab, vocab_scores)`: candidates per token sorted
    by (id(left), id(right)), then a stable sort by (score, len(left), len(right)), descending.
    """
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab
        ]
        if len(local) > 1:
            local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked.extend((score, len(left), len(right), left, right) for left, right in local)
    ranked.sort(key=lambda m: m[:3], reverse=True)
    return [(m[3], m[4]) for m in ranked]


def _sentencepiece_bpe(vocab: GGUFVocab) -> Tokenizer:
    """SentencePiece BPE (`tokenizer.ggml.model == "llama"`), as transformers' GemmaTokenizer or
    LlamaTokenizer configures it."""
    tokens = vocab.tokens
    gemma = vocab.architecture in SENTENCEPIECE_GEMMA_ARCHS
    if gemma:
        # Gemma files store whitespace-only tokens with real spaces where the model spells them
        # with U+2581; merges come from the file order, not the scores.
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores: Mapping[str, float] = {t: -i for i, t in enumerate(tokens)}
    else:
        if vocab.scores is None:
            raise ValueError("a SentencePiece GGUF vocabulary needs tokenizer.ggml.scores")
        scores = dict(zip(tokens, vocab.scores))
    ids = {t: i for i, t in enumerate(tokens)}
    if vocab.merges is not None:
        merges = [tuple(m.split(" ")) for m in vocab.merges]
    else:
        merges = derive_merges(ids, scores)
    unk = vocab.token(vocab.unk_token_id) or "<unk>"
    tok = Tokenizer(BPE(vocab=ids, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None))
    if gemma:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    return tok


def _byte_level_bpe(vocab: GGUFVocab) -> Tokenizer:
    """Byte-level BPE (`tokenizer.ggml.model == "gpt2"`), as transformers' GPT2Tokenizer."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    ids = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(vocab.tokens)
    }
    if vocab.merges is None:
        raise ValueError("a byte-level GGUF vocabulary needs tokenizer.ggml.merges")
    merges = [tuple(m.split(" ")) for m in vocab.merges]
    tok = Tokenizer(
        BPE(vocab=ids, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    split = PRE_TOKENIZER_SPLITS.get(vocab.pre or "")
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_special_tokens(tok: Tokenizer, vocab: GGUFVocab, settings: TokenizerSettings) -> None:
    """Control tokens become special added tokens and user-defined ones plain added tokens, so
    the text `<start_of_turn>` encodes as one id; named special tokens are special too."""
    types = vocab.token_types or [TOKEN_NORMAL] * len(vocab.tokens)
    named = [settings.bos_token, settings.eos_token, settings.unk_token, settings.pad_token]
    if vocab.architecture in SENTENCEPIECE_GEMMA_ARCHS:
        named.append("<mask>")  # GemmaTokenizer's mask_token
    special = [AddedToken(t, special=True, normalized=False) for t in named if t is not None]
    # In a byte-level vocabulary a "control" token outside the byte alphabet is a llama.cpp
    # mislabel; adding it would grow the vocabulary past what the model expects.
    spelled = set(bytes_to_unicode().values()) if vocab.model == "gpt2" else None
    special += [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(vocab.tokens, types)
        if ty == TOKEN_CONTROL and (spelled is None or set(t) <= spelled)
    ]
    tok.add_special_tokens(special)
    known = tok.get_vocab(with_added_tokens=True)
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(vocab.tokens, types)
        if ty == TOKEN_USER_DEFINED and t in known
    ]
    tok.add_tokens(user)


def bos_eos_post_processor(settings: TokenizerSettings, tok: Tokenizer) -> processors.TemplateProcessing:
    """transformers' `update_post_processor`: BOS/EOS around each sequence as the config asks."""
    add_bos = settings.add_bos_token and settings.bos_token is not None
    add_eos = settings.add_eos_token and settings.eos_token is not None
    bos, eos = settings.bos_token, settings.eos_token
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    special = []
    if add_bos:
        special.append((bos, tok.token_to_id(bos)))
    if add_eos:
        special.append((eos, tok.token_to_id(eos)))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def settings_for(vocab: GGUFVocab) -> TokenizerSettings:
    add_bos = vocab.add_bos_token
    if add_bos is None:
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
        add_bos = vocab.model == "llama"
    eos_ids = [i for i in (vocab.eos_token_id, vocab.eot_token_id, vocab.eom_token_id) if i is not None]
    if vocab.token_types is not None:
        eos_ids += [
            i
            for i, (t, ty) in enumerate(zip(vocab.tokens, vocab.token_types))
            if ty == TOKEN_CONTROL and t in END_OF_GENERATION_TEXTS
        ]
    return TokenizerSettings(
        architecture=vocab.architecture,
        bos_token=vocab.token(vocab.bos_token_id),
        eos_token=vocab.token(vocab.eos_token_id),
        unk_token=vocab.token(vocab.unk_token_id),
        pad_token=vocab.token(vocab.pad_token_id),
        add_bos_token=bool(add_bos),
        add_eos_token=bool(vocab.add_eos_token),
        chat_template=vocab.chat_template,
        eos_token_ids=sorted(set(eos_ids)),
    )


def build_tokenizer(vocab: GGUFVocab) -> tuple[Tokenizer, TokenizerSettings]:
    settings = settings_for(vocab)
    if vocab.model == "llama":
        tok = _sentencepiece_bpe(vocab)
    elif vocab.model == "gpt2":
        tok = _byte_level_bpe(vocab)
    else:
        raise ValueError(f"unsupported GGUF tokenizer model {vocab.model!r} (supported: llama, gpt2)")
    _add_special_tokens(tok, vocab, settings)
    tok.post_processor = bos_eos_post_processor(settings, tok)
    return tok, settings


# -- cache --------------------------------------------------------------------------------------


def file_cache_key(path: str | os.PathLike) -> str:
    """(size, mtime, header hash) of a GGUF file, without parsing it."""
    st = os.stat(path)
    h = hashlib.sha256(f"v{CONVERTER_VERSION}:{st.st_size}:{st.st_mtime_ns}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(HEADER_HASH_BYTES))
    return h.hexdigest()[:32]


def _write_cache(folder: Path, tok: Tokenizer, settings: TokenizerSettings) -> None:
    """Best effort: a cache that cannot be written only costs the next start the conversion."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
        tok.save(str(tmp / "tokenizer.json"), pretty=False)
        (tmp / "tokenizer_config.json").write_text(json.dumps(settings.to_json(), ensure_ascii=False))
        if folder.exists():  # a damaged entry (we only write after a failed read)
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)  # atomic: readers see a whole folder or none
        except OSError:  # another process won the race; its folder is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass


def _read_cache(folder: Path) -> tuple[Tokenizer, TokenizerSettings] | None:
    try:
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        settings = TokenizerSettings.from_json(json.loads((folder / "tokenizer_config.json").read_text()))
    except Exception:  # missing or damaged (the Rust side raises plain Exception): rebuild
        return None
    return tok, settings


def load_gguf_tokenizer(
    source: str | os.PathLike | Mapping[str, Any], cache_dir: str | os.PathLike | None = None
) -> tuple[Tokenizer, TokenizerSettings]:
    """The tokenizer of a GGUF file (a path) or of its already-read metadata (a mapping).

    With a cache_dir, a path is keyed without parsing the file, so a warm start skips both the
    metadata read and the conversion.
    """
    if isinstance(source, Mapping):
        vocab = GGUFVocab.from_metadata(source)
        key = f"meta-{vocab.content_hash()[:32]}"
        stem = "gguf"
    else:
        path = Path(source)
        if not path.is_file():
            raise ModelLoadError(str(path), "no such file")
        vocab = None
        key = file_cache_key(path)
        stem = path.stem
    folder = Path(cache_dir) / f"{stem}-{key}" if cache_dir is not None else None
    if folder is not None and (hit := _read_cache(folder)) is not None:
        return hit
    if vocab is None:
        vocab = GGUFVocab.read(source)  # type: ignore[arg-type]
    try:
        tok, settings = build_tokenizer(vocab)
    except ValueError as e:
        raise ModelLoadError(str(source) if not isinstance(source, Mapping) else "<gguf metadata>", str(e)) from e
    if folder is not None:
        _write_cache(folder, tok, settings)
    return tok, settings
