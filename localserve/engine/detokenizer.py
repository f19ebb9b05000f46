"""Incremental detokenization and stop handling for one output sequence.

Text comes from decoding a short window of ids (vLLM's prefix_offset/read_offset scheme):

    prefix_text = decode(ids[prefix_offset:read_offset])   # already emitted
    new_text    = decode(ids[prefix_offset:])
    delta       = new_text[len(prefix_text):]

The window's leading token gives the decoder its context, so SentencePiece's leading-space
rules come out as in a full decode, and a window whose text ends in U+FFFD (a UTF-8 character
split across byte tokens) is held until the character completes. SentencePiece byte-fallback
pieces are decoded per run (an invalid byte turns the whole run into U+FFFD), so text that ends
in such a run waits for the token after it; windows therefore never split a run.

Stop strings are searched in the decoded text, so they may span tokens. While the text ends with
something that could still grow into a stop string, that tail is held back; it is released when
it can no longer match, or at the end (`flush`, or a stop token).

Invariant: the concatenation of every `text_delta` plus `flush()` equals
`decode(output ids)` cut at the first stop string (the stop string kept only with
include_stop_str_in_output). A stop token is decoded only with include_stop_str_in_output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from localserve.engine.sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"


class TokenDecoder(Protocol):
    """What the detokenizer needs from a tokenizer (localserve.models.tokenizer.Tokenizer fits)."""

    eos_token_ids: frozenset[int]
    # SentencePiece byte-fallback pieces (<0x00>..<0xFF>); empty for byte-level BPE
    byte_fallback_ids: frozenset[int]
    special_token_ids: frozenset[int]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(slots=True)
class StepText:
    text_delta: str
    stopped: bool = False
    # the matched stop string, or the stop token id from stop_token_ids; None with
    # stopped=True means an EOS token ended the sequence
    stop_reason: str | int | None = None


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: TokenDecoder,
        params: SamplingParams,
        prompt_token_ids: Sequence[int] | None = None,
    ) -> None:
        # prompt_token_ids is accepted for the engine's call but deliberately not used as decode
        # context: the output text must equal decode(output ids) on its own.
        del prompt_token_ids
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.include_stop = params.include_stop_str_in_output
        self.stop_strings = tuple(s for s in params.stop if s)
        self.max_stop_len = max(map(len, self.stop_strings), default=0)
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self.eos_token_ids = frozenset() if params.ignore_eos else frozenset(tokenizer.eos_token_ids)
        # ids whose arrival cannot make held text final (see _decode_step)
        self._hold_ids: frozenset[int] = frozenset()
        if tokenizer.byte_fallback_ids:
            self._hold_ids = tokenizer.byte_fallback_ids
            if params.skip_special_tokens:
                self._hold_ids |= tokenizer.special_token_ids
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # decoded so far (cut at a stop string once stopped)
        self.num_emitted = 0  # chars of self.text handed out
        self.finished = False

    @property
    def output_text(self) -> str:
        return self.text

    def feed(self, token_id: int) -> StepText:
        assert not self.finished, "feed() after the sequence stopped"
        if token_id in self.stop_token_ids or token_id in self.eos_token_ids:
            if self.include_stop:
                self.token_ids.append(token_id)
            self.text += self._decode_rest()
            self.finished = True
            reason = token_id if token_id in self.stop_token_ids else None
            return StepText(self._emit(len(self.text)), stopped=True, stop_reason=reason)
        self.token_ids.append(token_id)
        new = self._decode_step()
        if not new:
            return StepText("")
        self.text += new
        if self.stop_strings:
            hit = self._find_stop(len(new))
            if hit is not None:
                end, stop = hit
                self.text = self.text[:end]
                self.finished = True
                return StepText(self._emit(end), stopped=True, stop_reason=stop)
        return StepText(self._emit(len(self.text) - self._held_back()))

    def flush(self) -> str:
        """The held-back tail, for a sequence that ended without a stop (length, abort)."""
        if self.finished:
            return ""
        self.finished = True
        rest = self._decode_rest()
        if rest:
            self.text += rest
            if self.stop_strings and (hit := self._find_stop(len(rest))) is not None:
                self.text = self.text[: hit[0]]
        return self._emit(len(self.text))

    # -- internals -------------------------------------------------------------------------

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_step(self) -> str:
        if self.token_ids[-1] in self._hold_ids:
            # A run of byte pieces decodes as one unit (all U+FFFD if any byte is invalid), so
            # its text is final only once a token with text of its own closes the run; skipped
            # special tokens add no text and do not close it.
            return ""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing printable yet, or a character still incomplete
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return new_text[len(prefix_text) :]

    def _decode_rest(self) -> str:
        """Whatever the window still holds (incomplete characters decode as U+FFFD)."""
        if self.read_offset == len(self.token_ids):
            return ""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset :])
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return new_text[len(prefix_text) :]

    def _find_stop(self, num_new: int) -> tuple[int, str] | None:
        """(end of kept text, stop string) of the earliest stop string that uses new text."""
        start = max(0, len(self.text) - num_new - self.max_stop_len + 1)
        best: tuple[int, str] | None = None
        for stop in self.stop_strings:
            i = self.text.find(stop, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, stop)
        if best is None:
            return None
        i, stop = best
        return (i + len(stop) if self.include_stop else i), stop

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string.

        With include_stop_str_in_output nothing is held: a later match only cuts text that
        comes after the stop string, never text already emitted."""
        if self.include_stop or not self.stop_strings:
            return 0
        tail_max = min(self.max_stop_len - 1, len(self.text) - self.num_emitted)
        for n in range(tail_max, 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return n
        return 0

    def _emit(self, upto: int) -> str:
        assert upto >= self.num_emitted, "emitted text never shrinks"
        delta = self.text[self.num_emitted : upto]
        self.num_emitted = upto
        return delta
