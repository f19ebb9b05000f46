"""Grammar-constrained decoding on the host, with xgrammar.

`TokenizerGrammar` (one per tokenizer, cached) turns a GuidedDecoding spec into an xgrammar
CompiledGrammar; `GrammarState` (one per sequence, held by its Request) follows the sequence's
output through a GrammarMatcher, fills the packed token bitmask for its next sample, finds the
text the grammar forces next (jump-forward) and keeps the output closable within its token
budget (close_within, from localserve/engine/grammar_close.py).

xgrammar imports torch, so it is imported only when the first constrained request arrives:
an engine that never sees one never loads it (tests/test_layers.py checks the engine imports
without torch).

Bitmask layout (xgrammar's): int32 [ceil(V / 32)]; token t is allowed iff bit t % 32 of word
t // 32 is set. Backends unpack it on the device.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Sequence

import numpy as np

from localserve.engine.grammar_close import BudgetClosing, JumpForward
from localserve.engine.guided import GuidedDecoding
from localserve.engine.schema_bounds import MAX_WHITESPACE, bounded_schema
from localserve.errors import InvalidRequestError


# forced text ending in one of these closes a token for sure in the tokenizers we serve; any
# other last forced token may merge with what the model writes next, so it is left to the model
_HARD_END = frozenset('{}[],:')


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class TokenizerGrammar:
    """The xgrammar view of one tokenizer: its TokenizerInfo and a GrammarCompiler, whose own
    cache makes a repeated spec free."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(set(stop_token_ids))
        self.byte_fallback_ids: frozenset[int] = frozenset(getattr(tokenizer, "byte_fallback_ids", ()))
        self.special_token_ids: frozenset[int] = frozenset(getattr(tokenizer, "special_token_ids", ()))
        vocab_type, add_prefix_space = _vocab_kind(tokenizer, xgr)
        self.info = xgr.TokenizerInfo(
            _encoded_vocab(tokenizer, vocab_size, self.special_token_ids),
            vocab_type,
            vocab_size=vocab_size,
            stop_token_ids=self.stop_token_ids,
            add_prefix_space=add_prefix_space,
        )
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2)
        # spellings are checked after this token, as text in the middle of an output: decoders
        # that strip a leading space (Llama 2) only do so at the start of a decode
        self.context_id = tokenizer.encode(".", add_special_tokens=False)[-1]
        self.context_text = tokenizer.decode([self.context_id], skip_special_tokens=False)
        self._vocab_bytes: list[bytes] | None = None  # xgrammar's decoded vocabulary, on first use
        self._pieces: dict[bytes, int] | None = None  # decoded piece -> id, for longest_match
        self._longest = 0
        self._stop_words = np.zeros(bitmask_words(vocab_size), dtype=np.int32)
        for t in self.stop_token_ids:
            self._stop_words[t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))

    def compile(self, spec: GuidedDecoding) -> Any:
        """The CompiledGrammar of `spec`; InvalidRequestError says what is wrong with it."""
        kind = spec.kind
        what = {"json_schema": "JSON schema", "json_object": "JSON object constraint",
                "regex": "regex", "ebnf": "EBNF grammar", "choice": "choice"}[kind]
        try:
            if kind in ("json_schema", "json_object"):
                schema = spec.schema_dict() if kind == "json_schema" else {"type": "object"}
                ws = MAX_WHITESPACE if spec.any_whitespace else None
                return self.compiler.compile_json_schema(bounded_schema(schema), any_whitespace=spec.any_whitespace,
                                                         max_whitespace_cnt=ws, strict_mode=True)
            if kind == "regex":
                return self.compiler.compile_regex(spec.regex)
            if kind == "ebnf":
                return self.compiler.compile_grammar(spec.ebnf)
            return self.compiler.compile_grammar(_choice_ebnf(spec.choice or []))
        except (RuntimeError, ValueError, TypeError) as e:
            raise InvalidRequestError(f"invalid {what}: {_xgr_message(e)}") from None

    def text_in_context(self, ids: Sequence[int]) -> str | None:
        """The text `ids` add after other output; None if it does not start cleanly."""
        full = self.tokenizer.decode([self.context_id, *ids], skip_special_tokens=False)
        if not full.startswith(self.context_text):
            return None
        return full[len(self.context_text):]

    def token_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes the grammar sees for `ids` (xgrammar's decoded vocabulary)."""
        vocab = self._decoded()
        return b"".join(vocab[i] for i in ids)

    def longest_match(self, data: bytes) -> list[int] | None:
        """`data` as the longest vocabulary pieces, left to right (xgrammar's way of spelling
        forced text); None if some byte has no piece."""
        if self._pieces is None:
            self._pieces = {}
            for i, piece in enumerate(self._decoded()):
                if piece and i not in self.special_token_ids:
                    self._pieces.setdefault(piece, i)
            self._longest = max(map(len, self._pieces), default=0)
        ids, pos = [], 0
        while pos < len(data):
            for end in range(min(len(data), pos + self._longest), pos, -1):
                i = self._pieces.get(data[pos:end])
                if i is not None:
                    ids.append(i)
                    pos = end
                    break
            else:
                return None
        return ids

    def _decoded(self) -> list[bytes]:
        if self._vocab_bytes is None:
            self._vocab_bytes = [bytes(p) for p in self.info.decoded_vocab]
        return self._vocab_bytes

    def new_state(self, compiled: Any) -> GrammarState:
        return GrammarState(self, self.xgr.GrammarMatcher(compiled))

    def only_stops(self, bitmask: np.ndarray) -> bool:
        """True when the mask allows stop tokens and nothing else."""
        return not np.any(bitmask & ~self._stop_words)


class GrammarState(BudgetClosing):
    """One sequence's position in its grammar. Owned by the Request; only the engine thread
    touches it (in Scheduler.update and Scheduler.schedule)."""

    __slots__ = ("grammar", "matcher", "bitmask", "masked", "num_accepted", "_closing", "_closing_at")

    def __init__(self, grammar: TokenizerGrammar, matcher: Any) -> None:
        self.grammar = grammar
        self.matcher = matcher
        self.bitmask = np.empty(bitmask_words(grammar.vocab_size), dtype=np.int32)
        self.masked = True  # False when the mask allows every token (nothing to apply)
        self.num_accepted = 0
        # a completion known to fit the budget from where the matcher was after _closing_at
        # accepted tokens (close_within falls back to it)
        self._closing: bytes | None = None
        self._closing_at = -1
        self.fill_bitmask()

    @property
    def terminated(self) -> bool:
        """The grammar accepted a stop token: the sequence is over."""
        return self.matcher.is_terminated()

    @property
    def done(self) -> bool:
        """Terminated, or complete with only stop tokens allowed next: no forward pass can
        add anything, so the sequence stops here."""
        if self.matcher.is_terminated():
            return True
        return self.matcher.is_completed() and self.grammar.only_stops(self.bitmask)

    def accept(self, token_id: int) -> bool:
        ok = self.matcher.accept_token(int(token_id))
        self.num_accepted += ok
        return ok

    def fill_bitmask(self) -> None:
        """The mask for the next sample; call after the last accept."""
        if self.matcher.is_terminated():
            self.masked = False
            return
        self.masked = self.matcher.fill_next_token_bitmask(self.bitmask)

    def rollback(self, num_tokens: int) -> None:
        """Forgets the last `num_tokens` accepted tokens (rejected speculative drafts)."""
        assert 0 <= num_tokens <= self.num_accepted, (num_tokens, self.num_accepted)
        if num_tokens:
            self.matcher.rollback(num_tokens)
            self.num_accepted -= num_tokens
            self._closing_at = -1
            self.fill_bitmask()

    def jump_forward(self, last_token: int, max_new: int) -> JumpForward | None:
        """The forced continuation after `last_token` (just accepted, not yet in the KV cache),
        tokenized the way the tokenizer writes last_token's text plus the forced text, and
        already accepted by the matcher. At most `max_new` tokens are added. None: nothing
        forced, or no tokenization of it that the grammar accepts.

        The sampled token is re-spelled with the forced text ('"' + ': "' is '":' + ' "', not
        '"' + ':' + ' "'), so the model sees the tokens it would have seen in training. The
        last forced token is left to the model unless the forced text ends at a structural
        character: a token like ' "' may merge with the text that follows it.
        """
        forced = self.matcher.find_jump_forward_string()
        if not forced or max_new <= 0:
            return None
        g = self.grammar
        if last_token not in g.byte_fallback_ids and last_token not in g.special_token_ids:
            head = g.text_in_context([last_token])
            if head is not None and self._spell(head, hold_back=False) == [last_token]:
                ids = self._spell(head + forced)
                if ids is not None:
                    ids = ids[: max_new + 1]
                    if ids == [last_token]:
                        return None  # all of the forced text is held back
                    if self._accept_replacing(ids, [last_token]):
                        return self._kept(JumpForward(1, ids), [last_token], max_new)
        ids = self._spell(forced)
        if ids is None:
            return None
        ids = ids[:max_new]
        if ids and self._accept_replacing(ids, []):
            return self._kept(JumpForward(0, ids), [], max_new)
        return None

    def _spell_all(self, data: bytes) -> list[int] | None:
        """Tokens that write `data` (UTF-8) here, all of it: as the tokenizer spells it, else
        (a tokenizer that prefixes a space, a split character) by longest vocabulary match."""
        try:
            ids = self._spell(data.decode(), hold_back=False)
        except UnicodeDecodeError:
            ids = None
        return ids if ids is not None else self.grammar.longest_match(data)

    def _spell(self, text: str, hold_back: bool = True) -> list[int] | None:
        """How the tokenizer writes `text` in the middle of an output; None where those tokens
        do not decode back to it there (e.g. a tokenizer that prefixes a space)."""
        ids = self.grammar.tokenizer.encode(text, add_special_tokens=False)
        if not ids or self.grammar.text_in_context(ids) != text:
            return None
        if hold_back and len(ids) > 1 and text[-1] not in _HARD_END:
            ids = ids[:-1]
        return ids

    def _accept_replacing(self, ids: Sequence[int], replaced: Sequence[int]) -> bool:
        """Accepts ids in place of the last accepted tokens `replaced`; all or nothing."""
        if replaced:
            self.matcher.rollback(len(replaced))
            self.num_accepted -= len(replaced)
        n = 0
        while n < len(ids) and self.accept(ids[n]):
            n += 1
        if n == len(ids):
            return True
        self._restore(n, replaced)
        return False

    def _restore(self, num_tokens: int, replaced: Sequence[int]) -> None:
        """Forgets the last num_tokens accepted tokens and accepts `replaced` again."""
        if num_tokens:
            self.matcher.rollback(num_tokens)
            self.num_accepted -= num_tokens
        restored = all(self.accept(t) for t in replaced)
        assert restored, "the grammar refused tokens it had accepted"


_cache: dict[tuple[int, int, tuple[int, ...]], TokenizerGrammar] = {}
_cache_lock = threading.Lock()


def tokenizer_grammar(tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> TokenizerGrammar:
    """The TokenizerGrammar of a tokenizer, built once (~1 s for a 262k vocabulary)."""
    key = (id(tokenizer), vocab_size, tuple(sorted(set(stop_token_ids))))
    with _cache_lock:
        tg = _cache.get(key)
        if tg is None or tg.tokenizer is not tokenizer:
            tg = _cache[key] = TokenizerGrammar(tokenizer, vocab_size, stop_token_ids)
        return tg


# ----------------------------------------------------------------------------- helpers


def _encoded_vocab(tokenizer: Any, vocab_size: int, special: frozenset[int]) -> list[str]:
    """Pieces by id. Special tokens (control tokens, <unusedN>) become "" so that xgrammar
    never allows them as text: the detokenizer drops them, so they would break the output."""
    vocab = [""] * vocab_size
    for piece, i in tokenizer.backend.get_vocab(with_added_tokens=True).items():
        if i < vocab_size and i not in special:
            vocab[i] = piece
    return vocab


def _vocab_kind(tokenizer: Any, xgr: Any) -> tuple[Any, bool]:
    """(VocabType, add_prefix_space), from the tokenizer's pieces and its behaviour."""
    if getattr(tokenizer, "byte_fallback_ids", None):
        vocab_type, space = xgr.VocabType.BYTE_FALLBACK, "\u2581"
    elif "ByteLevel" in repr(tokenizer.backend.decoder):
        vocab_type, space = xgr.VocabType.BYTE_LEVEL, "\u0120"
    else:
        return xgr.VocabType.RAW, False
    ids = tokenizer.encode("a", add_special_tokens=False)
    first = tokenizer.id_to_piece(ids[0]) if ids else None
    return vocab_type, bool(first and first.startswith(space))


def _choice_ebnf(choices: Sequence[str]) -> str:
    # EBNF string literals take C-style escapes, which a JSON string literal also is
    import json

    alts = sorted({c for c in choices if c})
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in alts)


_XGR_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


def _xgr_message(e: BaseException) -> str:
    """xgrammar's message without its '[time] file.cc:line:' prefix."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return _XGR_PREFIX.sub("", msg)
