"""Tokenizer: text <-> token ids, special tokens, and the model's chat template.

Wraps a `tokenizers.Tokenizer` (HF's Rust library) built from a GGUF file
(`localserve.models.gguf_tokenizer`) or read from a Hugging Face folder (tokenizer.json +
tokenizer_config.json). Encoding and decoding match transformers' tokenizer for the same files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from localserve.errors import ModelLoadError
from localserve.models.chat_template import ChatTemplate, fallback_template_name
from localserve.models.gguf_tokenizer import TokenizerSettings, bos_eos_post_processor, load_gguf_tokenizer


class Tokenizer:
    __slots__ = ("backend", "settings", "chat_template", "bos_token_id", "eos_token_ids", "pad_token_id",
                 "special_token_ids", "byte_fallback_ids", "vocab_size")

    def __init__(self, backend: tokenizers.Tokenizer, settings: TokenizerSettings) -> None:
        self.backend = backend
        self.settings = settings
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = self._id(settings.bos_token)
        self.pad_token_id = self._id(settings.pad_token)
        eos = set(settings.eos_token_ids)
        if (eos_id := self._id(settings.eos_token)) is not None:
            eos.add(eos_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special
        )
        self.byte_fallback_ids: frozenset[int] = self._byte_fallback_ids()
        self.chat_template = self._chat_template(settings)

    # -- constructors -----------------------------------------------------------------------

    @classmethod
    def from_gguf(
        cls, path_or_metadata: str | os.PathLike | Mapping[str, Any], cache_dir: str | os.PathLike | None = None
    ) -> Tokenizer:
        """From a GGUF path (or its metadata already read into a {key: value} mapping). With a
        cache_dir the converted tokenizer is stored there and later starts skip the conversion."""
        backend, settings = load_gguf_tokenizer(path_or_metadata, cache_dir)
        return cls(backend, settings)

    @classmethod
    def from_hf_folder(cls, path: str | os.PathLike) -> Tokenizer:
        """tokenizer.json plus, where present, tokenizer_config.json (special tokens, add_bos_token,
        chat_template), chat_template.jinja, generation_config.json and config.json (EOS ids,
        architecture)."""
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelLoadError(str(folder), "no tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises plain Exception on bad JSON
            raise ModelLoadError(str(tok_file), f"unreadable tokenizer: {e}") from e
        cfg = _read_json(folder / "tokenizer_config.json")
        gen = _read_json(folder / "generation_config.json")
        model_cfg = _read_json(folder / "config.json")
        settings = TokenizerSettings(
            architecture=str(cfg.get("architecture") or model_cfg.get("model_type") or ""),
            bos_token=_token_text(cfg.get("bos_token")),
            eos_token=_token_text(cfg.get("eos_token")),
            unk_token=_token_text(cfg.get("unk_token")),
            pad_token=_token_text(cfg.get("pad_token")),
            add_bos_token=bool(cfg.get("add_bos_token", False)),
            add_eos_token=bool(cfg.get("add_eos_token", False)),
            chat_template=_hf_chat_template(folder, cfg),
            eos_token_ids=sorted(
                set(_ids(cfg.get("eos_token_ids"))) | set(_ids(gen.get("eos_token_id"))) | set(_ids(model_cfg.get("eos_token_id")))
            ),
        )
        # transformers (v5) rebuilds the BOS/EOS post-processor when the config names the flags;
        # otherwise tokenizer.json's own post-processor stands.
        if "add_bos_token" in cfg or "add_eos_token" in cfg or backend.post_processor is None:
            backend.post_processor = bos_eos_post_processor(settings, backend)
        return cls(backend, settings)

    # -- ids <-> text ------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token texts in it (e.g. "<start_of_turn>") become their
        ids. add_special_tokens adds BOS/EOS as the model asks; a prompt rendered by a chat
        template already holds them, so encode those with add_special_tokens=False."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str | None:
        """The vocabulary entry (e.g. "▁world", "<0xF0>", "Ġworld"), not its decoded text."""
        return self.backend.id_to_token(token_id)

    def piece_to_id(self, piece: str) -> int | None:
        return self.backend.token_to_id(piece)

    def _byte_fallback_ids(self) -> frozenset[int]:
        """Ids of the <0x00>..<0xFF> pieces when the model falls back to bytes (SentencePiece)."""
        if not getattr(self.backend.model, "byte_fallback", False):
            return frozenset()
        ids = (self.backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
        return frozenset(i for i in ids if i is not None)

    def _id(self, piece: str | None) -> int | None:
        return None if piece is None else self.backend.token_to_id(piece)

    # -- chat --------------------------------------------------------------------------------

    @property
    def special_tokens_map(self) -> dict[str, str]:
        s = self.settings
        pairs = {"bos_token": s.bos_token, "eos_token": s.eos_token, "unk_token": s.unk_token, "pad_token": s.pad_token}
        return {k: v for k, v in pairs.items() if v is not None}

    def _chat_template(self, settings: TokenizerSettings) -> ChatTemplate:
        if settings.chat_template:
            return ChatTemplate(settings.chat_template, self.special_tokens_map)
        name = fallback_template_name(settings.architecture, _VocabView(self.backend))
        return ChatTemplate.builtin(name, self.special_tokens_map)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Prompt ids of a conversation: the template writes BOS itself, so none is added."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)
        return self.encode(text, add_special_tokens=False)


class _VocabView:
    """`piece in vocab` without materialising a 262k-entry dict."""

    __slots__ = ("backend",)

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        self.backend = backend

    def __contains__(self, piece: object) -> bool:
        return isinstance(piece, str) and self.backend.token_to_id(piece) is not None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ModelLoadError(str(path), f"unreadable JSON: {e}") from e


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens as strings or AddedToken dicts."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _hf_chat_template(folder: Path, cfg: Mapping[str, Any]) -> str | None:
    """chat_template.jinja (newer layout) wins over tokenizer_config.json; a list of named
    templates means the one called "default"."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    tpl = cfg.get("chat_template") or _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, Mapping)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) else None
